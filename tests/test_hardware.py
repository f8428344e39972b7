"""Devices, dtypes, gradient checkpointing, θ_o without a copy, LoRA, and the memory check (issue 12).

All on CPU: bf16 against float32, the meta device to catch tensors placed on the wrong device,
checkpointing against no checkpointing, the cached reference against the per-step one, LoRA
against brute-force autograd over the adapters.
"""
import copy

import pytest
import torch
from helpers import engine_step, method_of, micro_batch, per_split, setup, tiny_data
from meta import meta_host_reads
from twins import assert_matches_twin

from geffect.engine import Due
from geffect.models import tiny_model

ALL = Due(effects=True, conflicts=True, pairs=True, tokens=True)


@pytest.mark.parametrize("spec", ["npo+gd", "gd", "wga+kl"])
def test_bf16_effects_agree_with_float32(tiny, spec):
    """The same step on a bf16 copy of the model: the G-effects (accumulated in float32) agree with
    the float32 model's to 2% of their norm; the difference is the bf16 model's own rounding (its
    forward and gradients), not the engine's sums."""
    vals = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(tiny.model).to(dtype)
        method = method_of(spec)
        ctx, ref = setup(model, method)
        _, res = engine_step(model, method, micro_batch(tiny.tokenizer, method, tiny_data()), ref, ctx=ctx)
        vals[dtype] = (per_split(res), res.effects[0].summary())
        assert res.effects[0].forget.dtype == torch.float32
    (a, sa), (b, sb) = vals[torch.float32], vals[torch.bfloat16]
    for split in a:
        assert (a[split] - b[split]).norm() <= 0.02 * a[split].norm(), split
    for risk in ("unlearn", "retain"):
        assert sb[risk]["total"] == pytest.approx(sa[risk]["total"], rel=0.02)


@pytest.mark.parametrize("truth", [True, False])
@pytest.mark.parametrize("spec", ["npo+gd", "npo+kl", "rmu", "wga+kl", "ga", "idkdpo+gd+pcgrad", "llmu"])
def test_the_whole_profiled_step_runs_on_the_meta_device(tiny, spec, truth):
    """Every tensor follows the parameters: on the meta device any tensor made elsewhere and mixed in
    raises. Both sides of each data-dependent branch run (placeholders all true, then all false)."""
    tiny.model.to("meta")
    method = method_of(spec)
    ctx, ref = setup(tiny.model, method)
    with meta_host_reads(truth):
        _, res = engine_step(tiny.model, method, micro_batch(tiny.tokenizer, method, tiny_data()), ref, ctx=ctx,
                             due=ALL)
    assert res.effects and res.pairs and res.tokens and (res.conflicts or not method.has_retain_part)


@pytest.mark.parametrize("truth", [True, False])
def test_the_instance_form_runs_on_the_meta_device(tiny, truth, monkeypatch):
    """The instance form (off by default off the CPU) forced on: its tiles, weights and pairs follow
    the parameters' device too."""
    from geffect.engine import instanceform
    monkeypatch.setattr(instanceform, "ENABLED", True)
    taken = []
    take = instanceform.InstanceForm.take

    def spy(self, *a):
        done = take(self, *a)
        taken.extend(done)
        return done
    monkeypatch.setattr(instanceform.InstanceForm, "take", spy)
    tiny.model.to("meta")
    method = method_of("npo+gd")
    ctx, ref = setup(tiny.model, method)
    with meta_host_reads(truth):
        _, res = engine_step(tiny.model, method, micro_batch(tiny.tokenizer, method, tiny_data()), ref, ctx=ctx,
                             due=ALL)
    assert res.effects and res.pairs and res.tokens and res.conflicts
    # (all-ones placeholders fail tiny-gpt2's proportionality check: the extra-backward path, no form)
    assert bool(taken) == (res.path == "reuse") and (truth or res.path == "reuse")


def test_meta_harness_catches_a_tensor_on_the_wrong_device(tiny, monkeypatch):
    """The check can fail: a zeros() that ignores its device argument breaks the meta step."""
    real = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: real(*a, **{**k, "device": "cpu"}))
    tiny.model.to("meta")
    method = method_of("gd")
    with meta_host_reads(False), pytest.raises((RuntimeError, NotImplementedError)):
        engine_step(tiny.model, method, micro_batch(tiny.tokenizer, method, tiny_data()))


@pytest.mark.parametrize("truth", [True, False])
def test_measure_and_diagnose_run_on_the_meta_device(truth):
    from geffect.apps.diagnose import diagnose
    from geffect.apps.measure import measure
    from geffect.config import DiagnoseConfig, UnlearnConfig
    lm = tiny_model("tiny-gpt2")
    lm.model.to("meta")
    with meta_host_reads(truth):
        assert set(measure("npo+gd", "tiny-gpt2", memorize="no", loaded=lm)["unlearn"]) >= {"embed", "total"}
        if not truth:    # diagnose verifies the restored weights bit for bit: placeholders must compare equal
            res = diagnose(UnlearnConfig(model="tiny-gpt2", memorize="no"),
                           DiagnoseConfig(methods=["ga", "npo+kl", "gd+pcgrad", "rmu", "idkdpo+gd"], steps=2),
                           progress=False, loaded=lm)
            assert len(res["candidates"]) == 5


@pytest.mark.parametrize("spec", ["npo+gd", "gd", "wga+kl", "rmu", "ga"])
def test_gradient_checkpointing_gives_the_same_values(tiny, spec):
    from geffect.session import enable_checkpointing
    vals = []
    for ckpt in (False, True):
        model = copy.deepcopy(tiny.model).train()
        if ckpt:
            enable_checkpointing(model)
        method = method_of(spec)
        ctx, ref = setup(model, method)
        mb = micro_batch(tiny.tokenizer, method, tiny_data())
        _, res = engine_step(model, method, mb, ref, ctx=ctx, due=ALL)
        vals.append((res, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = vals
    assert a.path == b.path and len(ga) == len(gb)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6)
    for k, v in per_split(a).items():
        assert torch.allclose(v, per_split(b)[k], rtol=1e-5, atol=1e-7)
    assert torch.allclose(a.pairs[0].unlearn, b.pairs[0].unlearn, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.tokens[0].geffect, b.tokens[0].geffect, rtol=1e-4, atol=1e-6)


def test_checkpointing_really_recomputes(tiny):
    """The comparison above is meaningful: with checkpointing on, the hooks see the blocks' modules
    again inside the backward (and ignore them)."""
    from geffect.engine import Engine
    from geffect.forward import forward
    from geffect.session import enable_checkpointing
    model = tiny.model.train()
    enable_checkpointing(model)
    method = method_of("gd")
    mb = micro_batch(tiny.tokenizer, method, tiny_data())
    eng = Engine(model)
    with eng.capture() as cap:
        fo = forward(model, None, mb.batch, method)
        eng.backward(cap, fo, method.parts(fo).total)
    assert cap.recomputed > 0


@pytest.mark.parametrize("spec", ["npo+gd", "tnpo", "wtnpo+gd", "idkdpo+gd"])
def test_cached_reference_gives_the_per_step_values(tiny, spec):
    """θ_o's per-token NLL from the cache equals a reference forward on the same rows (and the cache
    keeps no model)."""
    from geffect.data.sampling import Data
    from geffect.reference import Reference, make_reference
    method = method_of(spec)
    data = tiny_data(4, 3)
    data = Data(data.forget, data.retain, [], data.idk[:4], True)
    cached = make_reference(tiny.model, method, "cache", tiny.tokenizer, data, 96)
    assert cached.model is None and cached.cache
    copy_ = Reference.frozen_copy(tiny.model)
    mb = micro_batch(tiny.tokenizer, method, data)
    rows = [i for s in method.reference_rows("nll") for i in range(mb.batch.segments[s].start,
                                                                     mb.batch.segments[s].stop)]
    a, b = cached.values(mb.batch, rows), copy_.values(mb.batch, rows)
    assert torch.allclose(a.nll, b.nll, atol=1e-6, rtol=1e-6) and a.nll.abs().sum() > 0


def test_cached_reference_run_equals_the_copy_run(tmp_path):
    """A whole NPO+GD run with θ_o cached gives the run with a frozen copy, record for record."""
    from geffect.config import ProfileConfig, UnlearnConfig
    from geffect.loop import unlearn
    runs = {}
    for mode in ("cache", "copy"):
        cfg = UnlearnConfig(method="npo+gd", model="tiny-llama", steps=3, memorize="no", progress=False,
                            save_model=False, lr=1e-3, reference=mode)
        runs[mode] = unlearn(cfg, profile=ProfileConfig(pairs_every=0, tokens_every=0))
    for a, b in zip(runs["cache"]["records"], runs["copy"]["records"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["weight_mean"] == pytest.approx(b["weight_mean"])
    for a, b in zip(runs["cache"]["geffect"], runs["copy"]["geffect"]):
        assert a["value"] == pytest.approx(b["value"], rel=1e-4, abs=1e-7)


LORA_TARGETS = {"tiny-llama": "q_proj,v_proj,down_proj", "tiny-gpt2": "c_attn,c_fc"}


@pytest.mark.parametrize("spec", ["npo+gd", "gd", "wga+kl"])
def test_lora_effects_match_autograd_over_the_adapters(tiny, spec):
    from geffect.lora import apply_lora, parse_lora
    from geffect.reference import Reference
    peft = apply_lora(tiny.model, parse_lora(f"r=4,alpha=8,targets={LORA_TARGETS[tiny.name]}"))
    with torch.no_grad():   # B starts at zero; give the adapters an effect
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    method = method_of(spec)
    ref = Reference.adapters_disabled(peft)
    mb = micro_batch(tiny.tokenizer, method, tiny_data())
    eng, res = engine_step(peft, method, mb, ref)
    assert set(eng.assignment.values()) <= {"shallow", "middle", "deep"}      # adapters sit in blocks
    assert_matches_twin(peft, tiny.tokenizer, method, mb, ref, None, per_split(res), eng.groups, tiny_data())


def test_disabled_adapters_are_the_base_model():
    """A LoRA run trains the adapters only, and θ_o (the same model, adapters disabled) still equals
    the base model after the training steps."""
    from geffect.config import UnlearnConfig
    from geffect.loop import unlearn
    from geffect.session import prepare
    cfg = UnlearnConfig(method="npo+kl", model="tiny-llama", steps=3, memorize="no", progress=False,
                        save_model=False, lr=1e-2, lora="r=4,alpha=8,targets=q_proj,v_proj")
    base = tiny_model("tiny-llama").model
    s = prepare(cfg, loaded=tiny_model("tiny-llama"))
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
    unlearn(cfg, loaded=s.loaded, reference=s.reference)
    assert all(torch.equal(p, frozen[n]) for n, p in s.model.named_parameters() if not p.requires_grad)
    b = micro_batch(s.tokenizer, s.method, tiny_data()).batch
    with torch.no_grad():
        ref_logits, _ = s.reference._run(b, list(range(len(b.input_ids))), None)
        trained = s.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        want = base(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=b.window).logits
    assert ref_logits.shape[1] == b.window < b.input_ids.shape[1]       # θ_o's logits: the answer window
    assert torch.equal(ref_logits, want)
    assert not torch.allclose(trained[:, -b.window:], want, atol=1e-4)


# ---- what bad input gets: one line, exit code 2, no run directory -------------------------------

def _cli_fails(tmp_path, capsys, *args):
    from geffect.cli import main
    out = tmp_path / "run"
    rc = main(["profile", "--model", "tiny-llama", "--memorize", "no", "--steps", "1", "--no-progress",
               "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("geffect: error:") and len(err.splitlines()) == 1, err
    assert not out.exists() and not out.with_name("run.partial").exists()
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(tmp_path, capsys):
    assert "--device cuda" in _cli_fails(tmp_path, capsys, "--device", "cuda")


def test_float16_with_adamw_is_refused(tmp_path, capsys):
    assert "bfloat16" in _cli_fails(tmp_path, capsys, "--dtype", "float16")


def test_an_op_missing_in_the_dtype_is_reported_before_the_run(tmp_path, capsys, monkeypatch):
    import transformers
    real = transformers.LlamaForCausalLM.forward

    def forward(self, *a, **k):
        if self.dtype == torch.bfloat16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')
        return real(self, *a, **k)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", forward)
    err = _cli_fails(tmp_path, capsys, "--dtype", "bfloat16")
    assert "--dtype bfloat16" in err and "not implemented" in err


def test_lora_targets_that_match_no_module(tmp_path, capsys):
    err = _cli_fails(tmp_path, capsys, "--lora", "r=4,targets=nope_proj")
    assert "nope_proj" in err and "q_proj" in err          # names the module names it has


def test_lora_spec_syntax(tmp_path, capsys):
    assert "--lora" in _cli_fails(tmp_path, capsys, "--lora", "r=x")


def test_checkpointing_a_model_that_cannot(tmp_path, capsys, monkeypatch):
    import transformers
    monkeypatch.setattr(transformers.LlamaForCausalLM, "supports_gradient_checkpointing", False)
    assert "--gradient-checkpointing" in _cli_fails(tmp_path, capsys, "--gradient-checkpointing")


def test_a_run_that_will_not_fit_is_refused_saying_what_to_change(tmp_path, capsys, monkeypatch):
    import geffect.hardware as H
    monkeypatch.setattr(H, "available_memory", lambda device: 2 ** 20)
    err = _cli_fails(tmp_path, capsys)
    for hint in ("--dtype bfloat16", "--lora", "--gradient-checkpointing", "GiB"):
        assert hint in err


def test_memory_estimate_counts_what_a_run_holds():
    from geffect.hardware import estimate_memory
    lm = tiny_model("tiny-llama")
    n = sum(p.numel() for p in lm.model.parameters())
    plain = estimate_memory(lm.model, "adamw", False, 8, 64, profiled=False, checkpointing=False)
    assert plain.weights == plain.gradients == 4 * n and plain.optimizer == 8 * n and plain.reference == 0
    more = estimate_memory(lm.model, "adamw", True, 8, 64, profiled=True, checkpointing=False)
    assert more.reference == 4 * n and more.engine > 0 and more.total > plain.total
    ckpt = estimate_memory(lm.model, "adamw", False, 8, 64, profiled=False, checkpointing=True)
    assert ckpt.activations < plain.activations
