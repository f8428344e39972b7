"""Group-only G-effects (``--no-instances``) and their two-pass conflict statistics against their twins:
the per-instance engine's group means (itself tested against autograd), autograd's ⟨∇R, ∇L⟩ for
the totals, and the split path's statistics; tied and untied embeddings."""
import pytest
import torch
from helpers import method_of, micro_batch, models, setup, tied_llama, tiny_data

from geffect.config import ProfileConfig
from geffect.engine import Due, Engine
from geffect.engine.parts import TwoPassDots
from geffect.forward import forward
from geffect.objectives import functional as fn
from geffect.step import Step


def autograd_totals(model, method, batch, ctx):
    """⟨∇R_u, ∇L⟩ and ⟨∇R_r, ∇L⟩ over every trainable tensor, by autograd (float64 dots)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fo = forward(model, None, batch, method, ctx)
    loss = method.parts(fo, ctx).total
    grads = []
    for x in (loss, fn.nll_loss(*fo.seg("forget")), fn.nll_loss(*fo.seg("retain"))):
        gs = torch.autograd.grad(x, params, retain_graph=True, allow_unused=True)
        grads.append([(g if g is not None else torch.zeros_like(p)).double() for p, g in zip(params, gs)])
    gL, gu, gr = grads
    return (sum((a * b).sum() for a, b in zip(gu, gL)).item(), sum((a * b).sum() for a, b in zip(gr, gL)).item())


@pytest.mark.parametrize("spec", ["ga", "gd"])
def test_group_only_effects_equal_the_per_instance_means_and_autograd(spec):
    """GA (retain risk's own pass, dropped) and GD (forget part, then retain part): every group's
    e_u and e_r equal the per-instance engine's means; the totals equal autograd's ⟨∇R, ∇L⟩."""
    for kind, model, tok in models():
        method = method_of(spec)
        ctx, ref = setup(model, method)
        mb = micro_batch(tok, method, tiny_data(3, 2))
        want_u, want_r = autograd_totals(model, method, mb.batch, ctx)
        full = Step(model, method, ref, ctx, Engine(model))([mb], Due(effects=True))
        step = Step(model, method, ref, ctx, Engine(model, ProfileConfig(instances=False)))
        res = step([mb], Due(effects=True, conflicts=True))
        assert res.path == "one-pass", kind
        got, want = res.effects[0].summary(), full.effects[0].summary()
        assert len(res.effects[0].forget) == 0 and res.effects[0].forget_index == []
        for risk in ("unlearn", "retain"):
            scale = max(abs(v) for v in want[risk].values())
            for g, v in want[risk].items():
                assert got[risk][g] == pytest.approx(v, abs=1e-4 * scale + 1e-9), (kind, spec, risk, g)
        assert got["unlearn"]["total"] == pytest.approx(want_u, rel=1e-4, abs=1e-9), kind
        assert got["retain"]["total"] == pytest.approx(want_r, rel=1e-4, abs=1e-9), kind
        if spec == "ga":                     # no retain part: no conflict statistics
            assert res.conflicts == [] and full.conflicts == []
        # .grad is ∇L (GA: the retain risk's pass left nothing behind)
        params = [p for p in model.parameters() if p.requires_grad]
        fo = forward(model, None, mb.batch, method, ctx)
        gL = torch.autograd.grad(method.parts(fo, ctx).total, params, allow_unused=True)
        for p, g in zip(params, gL):
            want_g = g if g is not None else torch.zeros_like(p)
            assert torch.allclose(p.grad, want_g, rtol=1e-4, atol=1e-7), (kind, spec)


def test_group_only_conflicts_equal_the_per_instance_path():
    """GD with --no-instances: the same conflict statistics as with per-instance values."""
    for kind, model, tok in models():
        method = method_of("gd")
        mb = micro_batch(tok, method, tiny_data(3, 2))
        a = Step(model, method, None, None, Engine(model))([mb], Due(effects=True, conflicts=True))
        b = Step(model, method, None, None, Engine(model, ProfileConfig(instances=False)))(
            [mb], Due(effects=True, conflicts=True))
        assert b.path == "one-pass" and a.path not in ("one-pass", "two-pass")
        for ra, rb in zip(a.conflicts, b.conflicts):
            assert ra["group"] == rb["group"] and ra["conflict"] == rb["conflict"]
            for k in ("cosine", "norm_forget", "norm_retain"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-7), (kind, k)


@pytest.mark.parametrize("spec", ["npo+gd", "npo", "wga+kl"])
def test_no_instances_elsewhere_writes_the_per_instance_means(spec):
    """Objectives outside GA/GD: --no-instances keeps the per-instance computation and drops its rows."""
    model, tok = tied_llama()
    method = method_of(spec)
    ctx, ref = setup(model, method)
    mb = micro_batch(tok, method, tiny_data(3, 2))
    full = Step(model, method, ref, ctx, Engine(model))([mb], Due(effects=True, conflicts=True))
    res = Step(model, method, ref, ctx, Engine(model, ProfileConfig(instances=False)))(
        [mb], Due(effects=True, conflicts=True))
    assert res.path != "two-pass"
    e = res.effects[0]
    assert e.means is not None and len(e.forget) == 0 and len(e.retain) == 0
    want = full.effects[0].summary()
    for risk in want:
        for g, v in want[risk].items():
            assert e.summary()[risk][g] == pytest.approx(v, rel=1e-5, abs=1e-9)


def test_conflict_statistics_leave_the_effects_unchanged():
    """Taking the conflict statistics (the training cotangents kept, streamed) changes no G-effect."""
    for kind, model, tok in models():
        method = method_of("npo+gd")
        ctx, ref = setup(model, method)
        mb = micro_batch(tok, method, tiny_data(3, 2))
        a = Step(model, method, ref, ctx, Engine(model))([mb], Due(effects=True))
        b = Step(model, method, ref, ctx, Engine(model))([mb], Due(effects=True, conflicts=True))
        scale = a.effects[0].forget.abs().max()
        assert torch.allclose(a.effects[0].forget, b.effects[0].forget, atol=1e-5 * scale), kind
        assert torch.allclose(a.effects[0].retain, b.effects[0].retain, atol=1e-5 * scale), kind


def test_two_pass_dots_by_hand():
    """X from the first pass, Y from the second: the three dots; keep_first off leaves Y in .grad; a
    tensor only the first pass reached has Y = 0 (and is dropped with keep_first off)."""
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))
    for keep in (True, False):
        a.grad = b.grad = None
        with TwoPassDots([a, b], keep_first=keep) as dots:
            (a * torch.tensor([1.0, -1.0])).sum().add(b.sum() * 2).backward()     # X_a = (1, -1), X_b = 2
            dots.arm()
            (a * torch.tensor([3.0, 5.0])).sum().backward()                        # Y_a = (3, 5)
        out = dots.result()
        assert out[id(a)] == pytest.approx((3 - 5, 2, 34)) and out[id(b)] == pytest.approx((0, 4, 0))
        assert a.grad.tolist() == ([4.0, 4.0] if keep else [3.0, 5.0])
        assert (b.grad.tolist() == [2.0]) if keep else b.grad is None


def test_no_instances_cli_writes_group_records_only(tmp_path):
    """``geffect profile --no-instances``: geffect.csv and conflicts.csv, no instance, pair or token rows."""
    import pandas as pd

    from geffect.cli import main
    out = tmp_path / "run"
    rc = main(["profile", "--model", "tiny-llama", "--method", "gd", "--steps", "2", "--no-instances",
               "--no-progress", "--no-report", "--memorize", "no", "--out", str(out)])
    assert rc == 0
    ge = pd.read_csv(out / "geffect.csv")
    assert set(ge["risk"]) == {"unlearn", "retain"} and ge["value"].notna().all() and len(ge) == 2 * 2 * 6
    assert len(pd.read_csv(out / "conflicts.csv")) > 0
    for table in ("instances", "pairs", "tokens"):
        f = out / f"{table}.csv"
        assert not f.exists() or len(pd.read_csv(f)) == 0, table


@pytest.mark.parametrize("tile_bytes", [None, 256])
@pytest.mark.parametrize("spec", ["gd", "ga"])
def test_one_pass_equals_two_passes(monkeypatch, spec, tile_bytes):
    """--no-instances: the parts formed in the one backward (geffect.engine.partsform; weight
    gradients in tiles of a few rows with ``tile_bytes``, a tied projection's rows picked across
    tiles, its answer positions gathered) give the two-pass path's G-effects, conflict statistics
    and training gradient (GA: the retain risk's part kept out of ``.grad``)."""
    from geffect.engine import partsform
    if tile_bytes is not None:
        monkeypatch.setattr(partsform, "TILE_BYTES", tile_bytes)
    for kind, model, tok in models():
        method = method_of(spec)
        mb = micro_batch(tok, method, tiny_data(3, 2))
        res, grads = {}, {}
        for path in ("one-pass", "two-pass"):
            with monkeypatch.context() as m:
                if path == "two-pass":
                    m.setattr(Step, "_parts_linear", lambda self: None)
                step = Step(model, method, None, None, Engine(model, ProfileConfig(instances=False)))
                res[path] = step([mb], Due(effects=True, conflicts=True))
                assert res[path].path == path, kind
                grads[path] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        a, b = res["two-pass"], res["one-pass"]
        for risk in ("unlearn", "retain"):
            want, got = a.effects[0].summary()[risk], b.effects[0].summary()[risk]
            scale = max(abs(v) for v in want.values())
            for g, v in want.items():
                assert got[g] == pytest.approx(v, abs=1e-5 * scale + 1e-9), (kind, risk, g)
        assert len(a.conflicts) == len(b.conflicts) and (len(a.conflicts) > 0) == (spec == "gd")
        for ra, rb in zip(a.conflicts, b.conflicts):
            assert ra["group"] == rb["group"] and ra["conflict"] == rb["conflict"], kind
            for k in ("cosine", "norm_forget", "norm_retain"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (kind, k)
        for ga, gb in zip(grads["two-pass"], grads["one-pass"]):
            assert torch.allclose(gb, ga, rtol=1e-5, atol=1e-7), kind


def test_a_linear_call_outside_the_parts_form_is_an_error(monkeypatch):
    """A Linear layer whose call did not take the parts form (its gradient formed by autograd alone)
    would be missing from the groups' sums: the step says which, instead of returning short sums."""
    from geffect.engine import partsform
    model, tok = tied_llama()
    method = method_of("gd")
    hook = partsform.PartsForm._hook

    def skip_one(self, name):
        return (lambda mod, inputs, output: None) if name.endswith("layers.0.mlp.up_proj") else hook(self, name)
    monkeypatch.setattr(partsform.PartsForm, "_hook", skip_one)
    step = Step(model, method, None, None, Engine(model, ProfileConfig(instances=False)))
    with pytest.raises(RuntimeError, match=r"layers\.0\.mlp\.up_proj\.weight has a gradient but took no parts"):
        step([micro_batch(tok, method, tiny_data(3, 2))], Due(effects=True))


@pytest.mark.parametrize("spec", ["gd", "ga"])
def test_group_only_gradient_norm_from_the_parts_dots(spec, monkeypatch):
    """‖∇L‖ of a group-only step, every tensor's ‖.grad‖² taken from its parts' dots (GD:
    ‖g_f‖² + 2⟨g_f, g_r⟩ + ‖g_r‖²; GA: ‖g_f‖²), equals the plain step's (every gradient read)."""
    from helpers import tiny_model

    import geffect.step
    lm = tiny_model("tiny-llama", seed=0)
    model, method = lm.model, method_of(spec)
    ctx, ref = setup(model, method)
    mb = micro_batch(lm.tokenizer, method, tiny_data())
    made = []
    squares = geffect.step.known_squares

    def spy(*a):
        out = squares(*a)
        made.append(out)
        return out
    monkeypatch.setattr(geffect.step, "known_squares", spy)
    grouped = Step(model, method, ref, ctx, Engine(model, ProfileConfig(instances=False)))(
        [mb], Due(effects=True, conflicts=True))
    plain = Step(model, method, ref, ctx)([mb])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(made) == 1 and len(made[0]) == len(trainable)        # every tensor's square from its dots
    assert grouped.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
