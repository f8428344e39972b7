"""Conflict statistics, PCGrad and Fig. 5b pairs from one backward, against the split path: the two
parts' gradients taken separately by autograd (the slow twin), at every scope."""
import random

import pytest
import torch
from helpers import method_of, micro_batch, setup, tiny_data

from geffect.engine import Due, Engine
from geffect.engine.gradients import grad_rule_for, vjp_grad
from geffect.forward import forward
from geffect.step import Step
from geffect.surgery import combine, param_groups

SPECS = ["gd", "npo+gd", "npo+kl", "wga+kl", "po+gd", "idkdpo+gd", "rmu", "llmu", "tnpo+gd"]


def perturbed_reference(model, method):
    """θ_o ≠ θ, so that KL, RMU's retain part and the NPO weights are not at their trivial point
    (at θ = θ_o the KL gradient is 0 and every cosine with it is rounding noise)."""
    ctx, ref = setup(model, method)
    if ref is not None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for q in ref.model.parameters():
                q.add_(0.05 * torch.randn(q.shape, generator=gen))
    return ctx, ref


def split_twin(model, method, batch, ref, ctx):
    """g_f = ∇(γ·L_f) and g_r = ∇(α·L_r) by two separate backward passes (id(param) -> tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts = method.parts(forward(model, ref, batch, method, ctx), ctx)
    out = []
    for loss in (method.gamma * parts.forget, method.alpha * parts.retain):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out.append({id(p): (g if g is not None else torch.zeros_like(p)).double() for p, g in zip(params, gs)})
    return out


@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("spec", SPECS)
def test_conflicts_and_pcgrad_from_one_backward_equal_the_split_path(tiny, spec, scope):
    model = tiny.model
    method = method_of(spec + "+pcgrad")
    ctx, ref = perturbed_reference(model, method)
    mb = micro_batch(tiny.tokenizer, method, tiny_data())
    gf, gr = split_twin(model, method, mb.batch, ref, ctx)
    eng = Engine(model)
    groups = param_groups(model, eng.assignment)
    want_update, want_rows = combine(gf, gr, groups, scope, apply=True)
    for profiled in (True, False):    # with the engine, and PCGrad alone (its own capture)
        step = Step(model, method, ref, ctx, eng if profiled else None, pcgrad_scope=scope)
        res = step([mb], Due(effects=True, conflicts=True) if profiled else Due())
        got = {r["group"]: r for r in res.conflicts}
        for row in want_rows:   # float32 one-backward path against the twin (float64 sums of its gradients)
            g, nf, nr = got[row["group"]], row["norm_forget"], row["norm_retain"]
            for k in ("norm_forget", "norm_retain", "magnitude_similarity"):
                assert g[k] == pytest.approx(row[k], rel=1e-4, abs=1e-9), (row["group"], k)
            assert g["cosine"] == pytest.approx(row["cosine"], abs=2e-5), row["group"]
            assert g["dot"] == pytest.approx(row["dot"], abs=1e-4 * nf * nr + 1e-12), row["group"]
            assert g["removed_norm"] == pytest.approx(row["removed_norm"], abs=1e-4 * (nf + nr)), row["group"]
            assert g["conflict"] == row["conflict"] and g["pcgrad_applied"] == row["pcgrad_applied"]
        for p in step.params:   # float32 against the twin: to 1e-4 of the parts' scale (projections cancel)
            f, r = gf[id(p)], gr[id(p)]
            want, scale = want_update[id(p)], f.norm() + r.norm()
            # per tensor, a part far smaller than the other is known only to float32's error of the larger
            # (one backward): projecting onto it turns that into an error of the direction removed,
            # |⟨f, r⟩|/‖r‖ · (error of r)/‖r‖, and likewise for f. (On an AMD EPYC CPU a layer norm's
            # ‖g_r‖ = 1e-3·‖g_f‖ missed the plain bound by 20%; about 16 ulps of the larger part here)
            cond = (f * r).sum().abs() * scale * (1 / r.norm().clamp_min(1e-30) ** 2 + 1 / f.norm().clamp_min(1e-30) ** 2)
            tol = 1e-4 * scale + (1e-6 * cond if scope == "tensor" else 0.0)
            assert (p.grad.double() - want).norm() <= tol + 1e-9, (spec, scope)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_conflict_statistics_streamed_in_the_backward_equal_the_split_path(tiny, spec, stream):
    """Without PCGrad the statistics are taken module by module as the backward completes each
    module's gradient (streaming), or after it: both equal the twin's."""
    from geffect.config import ProfileConfig
    model = tiny.model
    method = method_of(spec)
    ctx, ref = perturbed_reference(model, method)
    mb = micro_batch(tiny.tokenizer, method, tiny_data())
    gf, gr = split_twin(model, method, mb.batch, ref, ctx)
    eng = Engine(model, ProfileConfig(stream=stream))
    _, want_rows = combine(gf, gr, param_groups(model, eng.assignment), "global", apply=False)
    res = Step(model, method, ref, ctx, eng)([mb], Due(effects=True, conflicts=True))
    got = {r["group"]: r for r in res.conflicts}
    for row in want_rows:
        g, nf, nr = got[row["group"]], row["norm_forget"], row["norm_retain"]
        assert g["norm_forget"] == pytest.approx(nf, rel=1e-4) and g["norm_retain"] == pytest.approx(nr, rel=1e-4)
        assert g["cosine"] == pytest.approx(row["cosine"], abs=2e-5), row["group"]
    for p in step_params(model):            # no PCGrad: .grad is the plain ∇L
        assert (p.grad.double() - gf[id(p)] - gr[id(p)]).norm() <= 1e-4 * (gf[id(p)] + gr[id(p)]).norm() + 1e-9


def step_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_pcgrad_is_exercised_both_ways():
    """The comparison above means something only if the tiny models' parts both conflict and not."""
    seen = set()
    for kind in ("tiny-llama", "tiny-gpt2"):
        from geffect.models import tiny_model
        for spec in SPECS:
            lm = tiny_model(kind)
            method = method_of(spec)
            ctx, ref = perturbed_reference(lm.model, method)
            gf, gr = split_twin(lm.model, method, micro_batch(lm.tokenizer, method, tiny_data()).batch, ref, ctx)
            seen.add(sum((gf[i] * gr[i]).sum().item() for i in gf) < 0)
    assert seen == {True, False}


def _one_instance_batch(tok, method, data, i, extra):
    from geffect.data.batching import collate, qa
    segs = {"forget": qa([data.forget[i]]), "retain": qa(data.retain)}
    segs |= {name: [rows[i]] for name, rows in extra.items()}
    return collate(tok, segs, 96)


@pytest.mark.parametrize("gram_form", [False, True])
@pytest.mark.parametrize("spec", ["idkdpo+gd", "po+gd", "llmu", "npo+kl"])
def test_pairs_include_the_instances_idk_and_mismatch_rows(tiny, spec, gram_form, monkeypatch):
    """Fig. 5b pairs of objectives whose instance term spans several rows (IdkDPO, PO: the idk row;
    LLMU: the mismatch row) against one instance's term alone, by autograd (the Linear layers'
    risk gradients formed, or in Gram form)."""
    from geffect.engine import gram
    monkeypatch.setattr(gram, "FORCE", gram_form)
    from geffect.data.sampling import extra_segments
    from geffect.engine.parts import forget_side  # noqa: F401  (the rows the pairs read)
    from geffect.objectives import functional as fn
    model, tok, data = tiny.model, tiny.tokenizer, tiny_data()
    method = method_of(spec)
    ctx, ref = perturbed_reference(model, method)
    mb = micro_batch(tok, method, data)
    extra = extra_segments(method.segments, data.forget, data, random.Random(0))   # the rows micro_batch drew
    eng = Engine(model)
    res = Step(model, method, ref, ctx, eng)([mb], Due(effects=True, pairs=True))
    pairs = res.pairs[0]
    params = [p for p in model.parameters() if p.requires_grad]
    fo = forward(model, ref, mb.batch, method, ctx)
    risk = {r: torch.autograd.grad(fn.nll_loss(*fo.seg(s)), params, retain_graph=True, allow_unused=True)
            for r, s in (("unlearn", "forget"), ("retain", "retain"))}
    for i in range(len(data.forget)):
        one = _one_instance_batch(tok, method, data, i, extra)
        term = method.gamma * method.parts(forward(model, ref, one, method, ctx), ctx).forget
        g_i = torch.autograd.grad(term, params, allow_unused=True)
        for r in ("unlearn", "retain"):
            want = sum(torch.dot(a.flatten().double(), b.flatten().double()).item()
                       for a, b in zip(risk[r], g_i) if a is not None and b is not None)
            got = getattr(pairs, r)[i].sum().item()
            assert got == pytest.approx(want, rel=2e-3, abs=1e-6), (spec, i, r)


def test_gradient_rules_match_autograd():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    mods = [(torch.nn.Linear(5, 4), torch.randn(2, 3, 5)), (Conv1D(4, 5), torch.randn(2, 3, 5)),
            (torch.nn.Embedding(7, 3, padding_idx=0), torch.randint(0, 7, (2, 6))),
            (torch.nn.LayerNorm(5), torch.randn(2, 3, 5)), (LlamaRMSNorm(5, eps=1e-5), torch.randn(2, 3, 5))]
    for mod, x in mods:
        for p in mod.parameters():
            torch.nn.init.normal_(p)
        out = mod(x)
        g = torch.randn_like(out)
        g[0, 1] = 0                                      # a position without cotangent
        names = tuple(n for n, _ in mod.named_parameters())
        want = torch.autograd.grad(out, [getattr(mod, n) for n in names], g)
        fast, slow = grad_rule_for(mod)(mod, (x,), g, names), vjp_grad(mod, (x,), g, names)
        assert grad_rule_for(mod) is not vjp_grad
        for n, w in zip(names, want):
            assert torch.allclose(fast[n], w, atol=1e-5), (type(mod).__name__, n)
            assert torch.allclose(slow[n], w, atol=1e-5), (type(mod).__name__, n)
