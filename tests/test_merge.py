"""geffect.merge (TIES, task arithmetic, negation) against values by hand and against PEFT; the
streaming merge against the in-memory one; ``geffect merge``; Spunge's splits and a tiny run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from geffect.errors import ConfigError, DataError
from geffect.merge import (
    MergeError,
    SafetensorsSource,
    merged_tensors,
    negation,
    task_arithmetic,
    ties,
    trim_mask,
    write_merged,
)

T1 = [3., -2., 0., 1., 1., -5.]
T2 = [-3., 2., 0., 1., 4., 1.]


def _sd(**tensors):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}


def test_ties_by_hand():
    base = _sd(w=[1.] * 6)
    m1, m2 = _sd(w=[1 + t for t in T1]), _sd(w=[1 + t for t in T2])
    # density 0.5 keeps 3 of 6: τ1 → [3,-2,0,0,0,-5], τ2 → [-3,2,0,0,4,0]; mass [0,0,0,0,4,-5]:
    # coordinates 0 and 1 cancel (mass 0 elects +), coordinate 2 has no entry, 5 elects −
    out = ties(base, [m1, m2], density=0.5)["w"]
    assert out.tolist() == [1 + 3, 1 + 2, 1, 1, 1 + 4, 1 - 5]
    half = ties(base, [m1, m2], density=0.5, lam=0.5)["w"]
    assert half.tolist() == [1 + 1.5, 1 + 1, 1, 1, 1 + 2, 1 - 2.5]


def test_ties_disjoint_mean_divides_by_agreeing_count():
    base = _sd(w=[0., 0.])
    ms = [_sd(w=[2., -1.]), _sd(w=[4., -3.]), _sd(w=[-1., 5.])]
    # density 1: coordinate 0 mass 5 → + : mean(2, 4) = 3; coordinate 1 mass 1 → + : only 5 agrees
    assert ties(base, ms, density=1.0)["w"].tolist() == [3., 5.]


def test_trim_keeps_ties_in_index_order():
    tau = torch.tensor([1., 1., 1., 1., 0., 0.])
    assert trim_mask(tau, 0.5).tolist() == [True, True, True, False, False, False]
    base = _sd(w=[0.] * 6)
    assert ties(base, [_sd(w=tau.tolist())], density=0.5)["w"].tolist() == [1., 1., 1., 0., 0., 0.]
    assert trim_mask(tau, 0.1).sum() == 0          # int(0.6) = 0 entries kept


def test_zero_task_vector_changes_nothing():
    base = _sd(w=[1.] * 6)
    m1 = _sd(w=[1 + t for t in T1])
    alone = ties(base, [m1], density=0.5)["w"]
    assert alone.tolist() == [4., -1., 1., 1., 1., -4.]
    assert torch.equal(ties(base, [m1, base], density=0.5)["w"], alone)   # zeros agree with no sign
    assert torch.equal(ties(base, [base], density=0.3)["w"], base["w"])


def test_one_model_and_lambda_zero():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(5, 4, generator=g, dtype=torch.float64), "b": torch.randn(7, generator=g, dtype=torch.float64)}
    m = {k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
    for merged in (ties(base, [m], density=1.0), task_arithmetic(base, [m])):
        for k in base:
            torch.testing.assert_close(merged[k], m[k], rtol=0, atol=1e-15)
    for merged in (ties(base, [m, m], density=0.3, lam=0.0), task_arithmetic(base, [m, m], lam=0.0)):
        assert all(torch.equal(merged[k], base[k]) for k in base)


def test_task_arithmetic_and_negation_by_hand():
    base, m1, m2 = _sd(w=[1., 2.]), _sd(w=[2., 2.]), _sd(w=[1., 5.])
    assert task_arithmetic(base, [m1, m2], lam=0.5)["w"].tolist() == [1.5, 3.5]
    assert negation(base, m2, lam=2.0)["w"].tolist() == [1., -4.]


def test_ties_matches_peft_per_tensor():
    from peft.utils.merge_utils import ties as peft_ties
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 9, generator=g), "v": torch.randn(13, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    ours = ties(base, models, density=0.4, lam=1.0)
    for k, b in base.items():
        taus = [m[k] - b for m in models]
        ref = b + peft_ties(taus, torch.ones(3), density=0.4, majority_sign_method="total")
        torch.testing.assert_close(ours[k], ref, rtol=1e-6, atol=1e-6)


def test_trim_over_the_whole_model():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    m = {"a": torch.tensor([4., 1.]), "b": torch.tensor([1., 1., 3.])}
    out = ties(base, [m], density=0.4, trim="model")       # k = int(0.4·5) = 2: the 4 and the 3
    assert out["a"].tolist() == [4., 0.] and out["b"].tolist() == [0., 0., 3.]
    per_tensor = ties(base, [m], density=0.4)                # per tensor: int(0.8) = 0 of a, int(1.2) = 1 of b
    assert per_tensor["a"].tolist() == [0., 0.] and per_tensor["b"].tolist() == [0., 0., 3.]
    tied = {"a": torch.tensor([2., 1.]), "b": torch.tensor([1., 2., 2.])}
    out = ties(base, [tied], density=0.4, trim="model")     # three 2s at the cut: the first two in order
    assert out["a"].tolist() == [2., 0.] and out["b"].tolist() == [0., 2., 0.]


def test_bad_input_names_model_and_tensor():
    base = {"w": torch.zeros(3), "v": torch.zeros(2)}
    with pytest.raises(MergeError, match=r"model 2: tensor w has shape \[4\]"):
        ties(base, [base, {"w": torch.zeros(4), "v": torch.zeros(2)}])
    with pytest.raises(MergeError, match=r"model 1: lacks \['v'\]"):
        task_arithmetic(base, [{"w": torch.zeros(3)}])
    for kw in ({"density": 0.0}, {"density": 1.5}, {"lam": -1.0}):
        with pytest.raises(ConfigError):
            ties(base, [base], **kw)
    with pytest.raises(ConfigError, match="at least one model"):
        ties(base, [])


def _tiny_dirs(tmp_path, kind="tiny-llama", n=3):
    from geffect.models import tiny_model
    base = tiny_model(kind, seed=0)
    base.model.save_pretrained(tmp_path / "base")
    dirs = []
    for i in range(n):
        m = tiny_model(kind, seed=0).model
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"m{i}")
        dirs.append(tmp_path / f"m{i}")
    return base, dirs


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_streaming_merge_equals_in_memory(tmp_path, kind):
    from safetensors.torch import load_file
    base, dirs = _tiny_dirs(tmp_path, kind)
    in_memory = ties(load_file(tmp_path / "base" / "model.safetensors"),
                     [load_file(d / "model.safetensors") for d in dirs], density=0.3)
    out = write_merged(merged_tensors(tmp_path / "base", dirs, "ties", 0.3), tmp_path / "merged",
                       like=dirs[0], shard_bytes=20_000)                     # several shards and an index
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    streamed = SafetensorsSource(out)
    assert sorted(streamed.names()) == sorted(in_memory)
    for k, v in in_memory.items():
        assert torch.equal(streamed.get(k), v), k
    # the base as the module in memory (tied weights once) gives the same merge
    from_module = ties(base.model, dirs, density=0.3)
    assert sorted(from_module) == sorted(in_memory)
    assert all(torch.equal(from_module[k], in_memory[k]) for k in in_memory)


def test_cli_merge_writes_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from geffect.cli import main
    _, dirs = _tiny_dirs(tmp_path, n=2)
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "base"), *map(str, dirs), "--method", "task-arithmetic", "--lambda", "0.5",
                 "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    want = task_arithmetic(SafetensorsSource(tmp_path / "base"), dirs, lam=0.5)
    for k, v in model.state_dict().items():
        if k in want:
            assert torch.equal(v, want[k]), k
    assert main(["merge", str(tmp_path / "base"), *map(str, dirs), "--out", str(out)]) == 2      # no overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "base"), str(dirs[0]), "--density", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- Spunge

def _rec(i, **attrs):
    from geffect.data.records import QARecord
    return QARecord(f"q{i}?", f"a{i}.", attributes=attrs, source=f"f.json:{i}")


def test_split_records():
    from geffect.apps.spunge import split_records
    recs = [_rec(1, g="x"), _rec(2, g="y"), _rec(3, g="x"), _rec(4, g="z"), _rec(5, g="y")]
    assert {v: [r.question for r in rs] for v, rs in split_records(recs, "g", 1).items()} == \
        {"x": ["q1?", "q3?"], "y": ["q2?", "q5?"], "z": ["q4?"]}
    with pytest.raises(DataError, match="'z': 1"):
        split_records(recs, "g", 2)
    pooled = split_records(recs + [_rec(6, g="w")], "g", 2, "pool")
    assert [r.question for r in pooled["pooled"]] == ["q4?", "q6?"]
    with pytest.raises(DataError, match="f.json:2: no field 'h'"):
        split_records([_rec(1, h="x"), _rec(2, g="y")], "h")
    with pytest.raises(DataError, match="one value only"):
        split_records([_rec(1, g="x"), _rec(2, g="x")], "g")


def test_spunge_on_a_tiny_model(tmp_path):
    """Split the bundled forget set by genre, unlearn each split, TIES-merge; the merged folder is the
    in-memory TIES of the split runs' models onto the base, and the table is complete."""
    import pandas as pd

    from geffect.apps.spunge import spunge
    from geffect.config import SpungeConfig, UnlearnConfig
    from geffect.models import tiny_model
    cfg = UnlearnConfig(method="ga+gd", model="tiny-llama", memorize="no", steps=2, lr=1e-3, forget_batch=2,
                        retain_batch=2, warmup_steps=0, max_length=160, progress=False)
    loaded = tiny_model("tiny-llama", seed=0)
    base_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = spunge(cfg, SpungeConfig(split_by="genre", density=0.5, profile=True), tmp_path / "sp", loaded=loaded)
    out = tmp_path / "sp"
    assert set(res["splits"]) == {"mystery", "science fiction", "poetry", "historical fiction"}
    assert all(n == 5 for n in res["splits"].values())
    for v in res["splits"]:
        assert (out / "runs" / v.replace(" ", "-") / "geffect.csv").is_file()
    assert (out / "runs" / "all" / "summary.json").is_file()
    assert all(torch.equal(v, base_state[k]) for k, v in loaded.model.state_dict().items())   # base restored
    merged = SafetensorsSource(out / "merged")
    split_models = [SafetensorsSource(out / "runs" / v.replace(" ", "-") / "model") for v in res["splits"]]
    want = ties(base_state, split_models, density=0.5)
    for k in merged.names():
        assert torch.equal(merged.get(k), want[k]), k
    table = pd.read_csv(out / "spunge.csv")
    assert set(table["model"]) == {"base", "plain", "spunge"} | {f"split:{v}" for v in res["splits"]}
    assert len(table[(table["model"] == "spunge") & (table["split"] == "forget")]) == 4
    assert (out / "figures" / "spunge_attributes.png").is_file() and (out / "figures" / "spunge_groups.png").is_file()
    from geffect.data.sampling import load_data
    from geffect.eval.nll import evaluate_nll
    mystery = [r for r in load_data(None, None).forget if r.attributes["genre"] == "mystery"]
    row = table[(table["model"] == "base") & (table["split"] == "forget") & (table["value"] == "mystery")]
    assert row["nll"].item() == pytest.approx(evaluate_nll(loaded.model, loaded.tokenizer, mystery, 160), rel=1e-6)
    one_at_a_time = [math.exp(-evaluate_nll(loaded.model, loaded.tokenizer, [r], 160)) for r in mystery]
    assert row["probability"].item() == pytest.approx(sum(one_at_a_time) / len(one_at_a_time), rel=1e-5)
    assert json.loads((out / "spunge.json").read_text())["merge"]["density"] == 0.5


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_lora_delta_matches_peft_merged_weights(kind):
    from peft import LoraConfig, get_peft_model

    from geffect.merge import lora_delta, tvn
    from geffect.models import tiny_model
    base = tiny_model(kind, seed=0).model
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    targets = ["q_proj", "v_proj"] if kind == "tiny-llama" else ["c_attn"]
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                 fan_in_fan_out=kind == "tiny-gpt2"))
    delta = lora_delta(peft_model)
    assert len(delta) == 2 * (2 if kind == "tiny-llama" else 1)
    merged = peft_model.merge_and_unload().state_dict()
    for k, d in delta.items():
        torch.testing.assert_close(merged[k] - base_state[k], d, rtol=1e-5, atol=1e-6)
    negated = tvn(base_state, delta, lam=1.0)
    for k, b in base_state.items():
        want = 2 * b - merged[k] if k in delta else b
        torch.testing.assert_close(negated[k], want, rtol=1e-5, atol=1e-6)


def test_tvn_negates_the_fine_tuned_adapters(tmp_path):
    """--method tvn: LoRA fine-tune on the forget set, then θ_base − λ·ΔW; the saved model has no
    adapters and differs from the base only in the adapted weights."""
    from safetensors.torch import load_file

    from geffect.config import Hyper, UnlearnConfig
    from geffect.errors import ConfigError, MethodError
    from geffect.eval.nll import evaluate_nll
    from geffect.loop import unlearn
    from geffect.models import load_model, tiny_model
    from geffect.objectives import parse_method
    base = {k: v.clone() for k, v in tiny_model("tiny-llama", seed=0).model.state_dict().items()}
    cfg = UnlearnConfig(method="tvn", model="tiny-llama", memorize="no", steps=3, lr=1e-2, forget_batch=2,
                        retain_batch=2, progress=False, lora="r=4,alpha=8,targets=q_proj,v_proj", max_length=160)
    s = unlearn(cfg, str(tmp_path / "run"), Hyper(tvn_lambda=2.0))
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert not any("lora" in k for k in saved)
    changed = {k for k in base if not torch.equal(saved[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    m = load_model(str(tmp_path / "run" / "model"))
    from geffect.data.sampling import load_data
    assert evaluate_nll(m.model, m.tokenizer, load_data(None, None).forget, 160) == \
        pytest.approx(s["after"]["nll_forget"], rel=1e-5)
    with pytest.raises(ConfigError, match="pass --lora"):
        unlearn(UnlearnConfig(method="tvn", model="tiny-llama", memorize="no", progress=False))
    with pytest.raises(MethodError, match="no retain part"):
        parse_method("tvn+gd")


def test_negate_adapters_against_peft_merge():
    from peft import LoraConfig, get_peft_model

    from geffect.lora import negate_adapters
    from geffect.models import tiny_model
    base = tiny_model("tiny-gpt2", seed=0).model
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn"], init_lora_weights=False,
                                         fan_in_fan_out=True))
    import copy
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    out = negate_adapters(pm, lam=0.5).state_dict()
    for k, v in w0.items():
        torch.testing.assert_close(out[k], v - 0.5 * (merged[k] - v), rtol=1e-5, atol=1e-6)


def test_rmu_stops_early_on_the_activation_cosine():
    """--rmu-stop-cosine (Spunge, App. C): the run stops after the first step whose forget-row
    activations under θ have a mean cosine to θ_o's below the threshold; the check's value is the
    formula's, recomputed here from two separate forwards."""
    import torch.nn.functional as F

    from geffect.config import Hyper, UnlearnConfig
    from geffect.errors import ConfigError
    from geffect.loop import unlearn
    cfg = UnlearnConfig(method="rmu-full", model="tiny-llama", memorize="no", steps=30, lr=5e-2, optimizer="sgd",
                        forget_batch=2, retain_batch=2, progress=False, save_model=False, max_length=160)
    free = unlearn(cfg, hyper=Hyper(rmu_coeff=20.0))
    assert free["stopped_early"] is None and free["steps"] == 30
    s = unlearn(cfg, hyper=Hyper(rmu_coeff=20.0, rmu_stop_cosine=0.99))     # 0.995 after step 0, then falls
    assert s["stopped_early"] is not None and 1 < s["steps"] < 30, s["stopped_early"]
    assert len(s["records"]) == s["steps"]
    with pytest.raises(ConfigError, match="rmu-stop-cosine"):
        unlearn(UnlearnConfig(method="ga", model="tiny-llama", memorize="no", progress=False),
                hyper=Hyper(rmu_stop_cosine=0.5))
    # the criterion itself: mean over real tokens of cos(h, h_o)
    from geffect.objectives import functional as fn
    h, h0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, count = fn.activation_cosine(h, h0, mask)
    want = [F.cosine_similarity(h[i, t], h0[i, t], dim=0).item() for i, t in ((0, 0), (0, 1), (1, 0))]
    assert count == 3 and total == pytest.approx(sum(want), rel=1e-5)
