"""Data-parallel (DDP) and sharded (FSDP2) runs on 2 CPU processes (gloo) against one process on the
same global batches: every record and the updated weights, to float tolerance."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_cases import CASES, TABLES, run_case

HERE = Path(__file__).parent


def _torchrun(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single():
    """Every case in this one process (the reference)."""
    return {case: run_case(*case) for case in CASES}


def _key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ("step", "source", "risk", "group", "split", "index", "position", "scope"))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))
    return a == b


CONFLICT_SCALE = {"dot": lambda nf, nr: nf * nr, "removed_norm": lambda nf, nr: nf + nr}


def _compare(want: dict, got: dict, case, sharded: bool) -> None:
    for table in TABLES:
        w, g = sorted(want[table], key=_key), sorted(got[table], key=_key)
        token_scale = {}
        for r in w if table == "tokens" else []:
            token_scale[r["step"]] = max(token_scale.get(r["step"], 0.0), abs(r["geffect"]))
        assert len(w) == len(g), (case, table)
        assert len(w) > 0 or table == "pairs", (case, table)
        for rw, rg in zip(w, g):
            for col, v in rw.items():
                if col == "time_s" or col.startswith("t_") or (sharded and table == "tokens" and col == "geffect"):
                    continue
                if table == "conflicts" and col in CONFLICT_SCALE:
                    # g_r = ∇L − g_f: where the retain part is small, its float32 rounding is relative to
                    # ‖g_f‖ (the tolerance of the one-backward path against its twin, test_parts.py)
                    nf, nr = rw["norm_forget"], rw["norm_retain"]
                    assert abs(v - rg[col]) <= 1e-4 * CONFLICT_SCALE[col](nf, nr) + 1e-9, (case, col, _key(rw))
                    continue
                if table == "tokens" and col == "geffect":
                    # a token's effect is a sum of many signed terms: the tolerance is of the step's scale
                    scale = token_scale[rw["step"]]
                    assert abs(v - rg[col]) <= 1e-4 * scale, (case, _key(rw), v, rg[col], scale)
                    continue
                assert _same(v, rg[col]), (case, table, col, _key(rw), v, rg[col])
        if sharded and table == "tokens":     # per-token jvp is not taken sharded: NaN, said in a note
            assert all(math.isnan(r["geffect"]) for r in g)
    from geffect.models import tiny_model
    start = tiny_model(case[1], seed=0).model.state_dict()
    for name, tensor in want["weights"].items():     # to 1e-4 of how far the three steps moved the tensor
        moved = (tensor - start[name]).abs().max().item()
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-4, atol=1e-4 * moved + 1e-7,
                                   msg=lambda m, name=name: f"{case} {name}: {m}")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(single, mode, tmp_path):
    out = tmp_path / "results.pt"
    proc = _torchrun([str(HERE / "dist_worker.py"), mode, str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    for case in CASES:
        _compare(single[case], got[case], case, sharded=mode == "fsdp")

def test_the_cases_move_the_weights(single):
    """The equality above is of trained weights, not of the starting ones."""
    from geffect.models import tiny_model
    for case in CASES:
        start = tiny_model(case[1], seed=0).model.state_dict()
        moved = max((single[case]["weights"][n] - start[n]).abs().max().item() for n in start)
        assert moved > 1e-4, case


TINY = ["--model", "tiny-llama", "--memorize", "no", "--max-length", "96", "--steps", "2", "--lr", "1e-3",
        "--forget-batch", "4", "--retain-batch", "4", "--no-progress", "--no-report", "--no-save-model"]


def test_torchrun_cli_writes_one_run_directory_equal_to_one_process(tmp_path):
    """``torchrun -m geffect profile``: rank 0 writes the run directory, the records are the single
    process's; a bad option is reported once and nothing is written."""
    from geffect.cli import main
    assert main(["profile", *TINY, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun(["-m", "geffect", "profile", *TINY, "--out", "two"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    import pandas as pd
    for table in ("geffect", "instances", "conflicts"):
        a, b = pd.read_csv(one / f"{table}.csv"), pd.read_csv(two / f"{table}.csv")
        pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-7, check_dtype=False)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert a["after"] == pytest.approx(b["after"], rel=1e-5)
    bad = _torchrun(["-m", "geffect", "profile", *TINY, "--forget-batch", "1", "--out", "three"], tmp_path)
    assert bad.returncode != 0
    assert bad.stderr.count("geffect: error: --forget-batch 1 with 2 processes") == 1
    assert not (tmp_path / "three").exists() and not (tmp_path / "three.partial").exists()


def adamw_steps(wrap=lambda m: m) -> tuple[bool, dict[str, torch.Tensor]]:
    """Three steps of ``make_optimizer``'s AdamW on a tiny Llama (``wrap``: FSDP2 in the worker), each
    on the gradient of a fixed loss; (whether it took the fused kernel, the full weights after)."""
    from geffect.config import UnlearnConfig
    from geffect.models import tiny_model
    from geffect.optim import make_optimizer
    model = tiny_model("tiny-llama", seed=0).model
    wrapped = wrap(model)
    opt = make_optimizer(UnlearnConfig(lr=1e-2, weight_decay=0.1), [p for p in model.parameters() if p.requires_grad])
    ids = torch.arange(24).reshape(2, 12) % model.config.vocab_size
    for _ in range(3):
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    return bool(opt.param_groups[0]["fused"]), full


def test_fused_adamw_on_fsdp2_shards_gives_the_default_adamws_weights(tmp_path):
    """Under FSDP2 (2 processes) make_optimizer takes AdamW's fused kernel over the DTensor parameters,
    and three steps give the weights torch's default AdamW gives on the same sharded gradients, to
    float rounding. (Against one process, Adam would turn gradients that are rounding noise, e.g.
    unused embedding rows, into steps of ±lr: the records' equality is tested with SGD above.)"""
    out = tmp_path / "adamw.pt"
    proc = _torchrun([str(HERE / "dist_adamw_worker.py"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    (fused, ours), (default_fused, want) = got["make_optimizer"], got["default"]
    assert fused and not default_fused
    from geffect.models import tiny_model
    start = dict(tiny_model("tiny-llama", seed=0).model.named_parameters())
    for name, w in want.items():
        moved = (w - start[name]).abs().max().item()
        assert moved > 1e-3, name                                   # the steps moved every tensor
        torch.testing.assert_close(ours[name], w, rtol=1e-5, atol=1e-5 * moved,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_the_cli_leaves_a_process_group_it_did_not_make_alone(tmp_path, capsys):
    """``geffect.cli.main`` destroys the process group at its end only when it made it (a torchrun run
    of the CLI); a caller's own group outlives the call, here one whose verb fails on bad input."""
    import torch.distributed as dist

    from geffect.cli import main
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        code = main(["unlearn", "--model", "tiny-llama", "--forget", str(tmp_path / "missing.json"),
                     "--out", str(tmp_path / "run"), "--no-progress"])
        assert code != 0 and "missing.json" in capsys.readouterr().err
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
