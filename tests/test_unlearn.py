"""The unlearning loop and the CLI on tiny models."""
import json

import pandas as pd
import pytest
import torch

from geffect.cli import main
from geffect.config import UnlearnConfig
from geffect.loop import unlearn


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return str(p)


@pytest.fixture
def small_data(tmp_path):
    from geffect.data import default_splits
    sp = default_splits(0)
    f = _write(tmp_path, "forget.jsonl", [{"question": r.question, "answer": r.answer} for r in sp["forget"][:4]])
    r = _write(tmp_path, "retain.jsonl", [{"question": r.question, "answer": r.answer} for r in sp["retain"][:4]])
    return f, r


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_loop_lowers_forget_likelihood(small_data, model):
    f, r = small_data
    cfg = UnlearnConfig(method="ga", model=model, forget=f, retain=r, steps=8, lr=1e-3, warmup_steps=0,
                        progress=False, save_model=False)
    s = unlearn(cfg)
    assert s["after"]["nll_forget"] > s["before"]["nll_forget"] + 0.1


def test_determinism(small_data):
    f, r = small_data
    cfg = UnlearnConfig(method="npo+gd", model="tiny-llama", forget=f, retain=r, steps=3, progress=False,
                        save_model=False, lr=1e-3)
    a, b = unlearn(cfg), unlearn(cfg)
    assert [x["loss"] for x in a["records"]] == [x["loss"] for x in b["records"]]


def test_grad_accum_and_clip_and_sgd(small_data):
    f, r = small_data
    cfg = UnlearnConfig(method="wga+kl", model="tiny-gpt2", forget=f, retain=r, steps=2, grad_accum=2,
                        clip=0.5, optimizer="sgd", progress=False, save_model=False)
    s = unlearn(cfg)
    assert len(s["records"]) == 2 and "weight_mean" in s["records"][0]


def test_cli_unlearn_writes_run_dir(small_data, tmp_path, capsys):
    f, r = small_data
    out = tmp_path / "run"
    rc = main(["unlearn", "--model", "tiny-llama", "--method", "npo+gd", "--forget", f, "--retain", r,
               "--steps", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "forget NLL" in capsys.readouterr().out
    df = pd.read_csv(out / "records.csv")
    for col in ["step", "loss", "loss_forget", "loss_retain", "nll_forget", "nll_retain", "lr", "weight_mean"]:
        assert col in df.columns
    assert len(df) == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"]["method"] == "npo+gd" and cfg["run"]["steps"] == 3
    assert (out / "model" / "model.safetensors").exists()
    # never overwritten silently
    rc = main(["unlearn", "--model", "tiny-llama", "--method", "ga", "--forget", f, "--retain", r,
               "--steps", "1", "--out", str(out), "--no-progress"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert len(pd.read_csv(out / "records.csv")) == 3


def test_cli_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q"}\n')
    assert main(["unlearn", "--model", "tiny-llama", "--forget", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:1: missing field 'answer'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert main(["unlearn", "--model", "tiny-llama", "--method", "nope"]) == 2


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ["--method", "--model", "--forget", "--retain", "--steps", "--lr", "--npo-beta", "--grad-accum",
                "--clip", "--optimizer", "--warmup-steps", "--memorize"]:
        assert opt in text


def test_memorize_teaches_facts(tmp_path):
    """The memorise stage makes the true answers far more likely than the perturbed ones."""
    from geffect.data import default_splits
    from geffect.eval.nll import evaluate_nll, perturbed_nll
    from geffect.memorize import memorize
    from geffect.models import tiny_model
    recs = default_splits(0, n_forget=1, n_retain=0, n_holdout=0)["forget"][:2]
    loaded = tiny_model("tiny-llama", seed=0)
    tok = loaded.tokenizer
    before = evaluate_nll(loaded.model, tok, recs)
    tuned = memorize(loaded, recs, epochs=30, lr=1e-2, batch_size=2, progress=False)
    after = evaluate_nll(tuned.model, tok, recs)
    assert after < 0.5 * before
    assert after < perturbed_nll(tuned.model, tok, recs) - 0.3
    # cached: a second call loads the saved model
    again = memorize(tiny_model("tiny-llama", seed=0), recs, epochs=30, lr=1e-2, batch_size=2, progress=False)
    assert abs(evaluate_nll(again.model, tok, recs) - evaluate_nll(tuned.model, tok, recs)) < 1e-5


def test_cached_memorised_model_skips_base_load(small_data, monkeypatch):
    """With the memorise cache filled, prepare() loads the cached model and never the base model."""
    import geffect.session as S
    cfg = UnlearnConfig(method="ga", model="tiny-llama", steps=1, progress=False, save_model=False,
                        memorize="yes")
    first = S.prepare(cfg)  # fills the cache
    calls = []
    monkeypatch.setattr(S, "load_model", lambda *a, **k: calls.append(a))
    second = S.prepare(cfg)
    assert calls == []
    for (n, p), (_, q) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def test_clipping_leaves_the_grad_direction_raw_and_scales_the_update(small_data):
    """Direction 'grad' is the paper's raw ∇L: clipping must not change it (records are taken before
    clipping). Direction 'update' is the step taken: with SGD and an active clip it is ∇L times one
    factor min(1, c/‖∇L‖), the same for every group, risk and instance."""
    from geffect.config import ProfileConfig
    f, r = small_data

    def run(clip, direction):
        cfg = UnlearnConfig(method="npo+gd", model="tiny-llama", forget=f, retain=r, steps=1, lr=1e-2,
                            warmup_steps=0, optimizer="sgd", clip=clip, progress=False, save_model=False)
        prof = ProfileConfig(direction=direction, conflicts=False, pairs_every=0, tokens_every=0)
        s = unlearn(cfg, profile=prof)
        eff = pd.DataFrame(s["geffect"]).set_index(["risk", "group"])["value"]
        inst = pd.DataFrame(s["instances"]).set_index(["split", "index"])["value"]
        return pd.concat([eff, inst]).to_numpy()

    raw = run(None, "grad")                 # ‖∇L‖ ≈ 50 on this model and batch
    live = raw != 0                         # an empty group (a 2-block model has no 'deep') is 0
    assert live.sum() > 10
    assert torch.allclose(torch.tensor(run(10.0, "grad")), torch.tensor(raw), rtol=1e-6, atol=0)
    ratio = run(10.0, "update")[live] / raw[live]
    assert 0 < ratio.min() and ratio.max() < 0.5           # the clip is active
    assert ratio.max() - ratio.min() <= 1e-5 * ratio.max()  # one factor for everything


def test_the_steps_run_with_the_setup_frozen_out_of_the_collector(small_data, monkeypatch):
    """gc.freeze() around the loop: every step sees the setup's objects frozen, and they are
    unfrozen after (as they were before the run), also when the run fails."""
    import gc

    from geffect.step import Step
    counts, call = [], Step.__call__

    def spy(self, *a, **k):
        counts.append(gc.get_freeze_count())
        return call(self, *a, **k)
    monkeypatch.setattr(Step, "__call__", spy)
    f, r = small_data
    before = gc.get_freeze_count()
    unlearn(UnlearnConfig(method="ga", model="tiny-llama", forget=f, retain=r, steps=2, progress=False,
                          save_model=False))
    assert len(counts) == 2 and all(c > before + 1000 for c in counts)
    assert gc.get_freeze_count() == before

    def fail(self, *a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(Step, "__call__", fail)
    with pytest.raises(RuntimeError, match="boom"):
        unlearn(UnlearnConfig(method="ga", model="tiny-llama", forget=f, retain=r, steps=2, progress=False,
                              save_model=False))
    assert gc.get_freeze_count() == before


def test_a_callers_own_freeze_is_left_alone(small_data):
    """Objects the caller froze before the run stay frozen after it (an unfreeze would empty it)."""
    import gc
    f, r = small_data
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        unlearn(UnlearnConfig(method="ga", model="tiny-llama", forget=f, retain=r, steps=1, progress=False,
                              save_model=False))
        assert gc.get_freeze_count() > 0.9 * frozen     # (frozen objects freed by refcount leave it)
    finally:
        gc.unfreeze()


def test_adamw_takes_the_fused_kernel_where_torch_has_it_with_the_default_paths_update():
    """make_optimizer's fused AdamW (CPU here) against torch's default per-tensor AdamW from the same
    start: three steps with weight decay, equal to float rounding; the meta device, which has no fused
    kernel, gets the default path."""
    from geffect.optim import fusable, make_optimizer
    cfg = UnlearnConfig(lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g, dtype=torch.float64)]
    grads = [[torch.randn(t.shape, generator=g, dtype=t.dtype) for t in start] for _ in range(3)]

    def run(opt_of):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = opt_of(ps)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        return opt, ps

    ours, got = run(lambda ps: make_optimizer(cfg, ps))
    _, want = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=False))
    assert ours.param_groups[0]["fused"] is True
    for a, b, s in zip(got, want, start):
        assert not torch.equal(a, s)                         # the steps moved the parameters
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not fusable(meta) and not make_optimizer(cfg, meta).param_groups[0]["fused"]
    assert not fusable([]) and not fusable([{"params": meta}])
    assert fusable([{"params": [torch.nn.Parameter(torch.zeros(2))]}])     # param groups too
