"""The streamed conflict statistics from per-row products and Gram sums (geffect.engine.gram)
against their slow twin, the forget part's gradient formed module by module (parts.part_scalars,
itself tested against autograd's split path in test_parts.py)."""
import copy

import pytest
import torch
from helpers import method_of, micro_batch, models, setup, tiny_data
from transformers.pytorch_utils import Conv1D

import geffect.step
from geffect.engine import Due, Engine, gram, gramrows, instanceform, normrows
from geffect.engine.engine import Captured
from geffect.engine.parts import part_scalars
from geffect.step import Step

SPECS = ["gd", "npo+gd", "idkdpo+gd"]     # forget rows alone, and idk rows on the forget side


def perturb(model, ref):
    """θ_o ≠ θ (NPO's weights away from their trivial point)."""
    if ref is not None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for q in ref.model.parameters():
                q.add_(0.05 * torch.randn(q.shape, generator=gen))


def streamed_calls(monkeypatch, model, tok, spec):
    """Run one profiled step; for every streamed call, (names, fast statistics, exact statistics,
    the modules the fast path handed to the exact one)."""
    method = method_of(spec)
    ctx, ref = setup(model, method)
    perturb(model, ref)
    calls = []

    def twin(model, names, cap, segments, products, span):
        handed = []

        def exact(model, assignment, captured, world=None):
            handed.extend(assignment)
            return part_scalars(model, assignment, captured, world)
        monkeypatch.setattr(gram, "part_scalars", exact)
        fast = gram.streamed_part_scalars(model, names, cap, segments, products, span)
        monkeypatch.setattr(gram, "part_scalars", part_scalars)
        slow = part_scalars(model, {n: cap.assignment[n] for n in names}, [Captured(cap, segments, [], [])])
        calls.append((names, fast, slow, handed))
        return fast
    monkeypatch.setattr(geffect.step, "streamed_part_scalars", twin)
    mb = micro_batch(tok, method, tiny_data())
    res = Step(model, method, ref, ctx, Engine(model))([mb], Due(effects=True, conflicts=True))
    assert res.path == "reuse"
    return calls


@pytest.mark.parametrize("gram_form", [False, True, "rows", "instance"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2", "tied-llama"])
def test_streamed_statistics_equal_the_formed_forget_gradient(monkeypatch, kind, spec, gram_form):
    """Every streamed call's statistics against the formed forget gradient's; ‖g_X‖² in Gram form
    or formed (the tiny models' few features make forming the cheaper one by default), every
    eligible layer's statistics taken with its products ("rows", geffect.engine.gramrows), or the
    Linear layers' in the training backward ("instance", geffect.engine.instanceform)."""
    monkeypatch.setattr(gram, "FORCE", gram_form if gram_form in (False, True) else None)
    monkeypatch.setattr(gramrows, "FORCE", gram_form == "rows")
    monkeypatch.setattr(instanceform, "ENABLED", gram_form == "instance")
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    calls = streamed_calls(monkeypatch, model, tok, spec)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fast_names = set()
    for names, fast, slow, handed in calls:
        assert fast.keys() == slow.keys()
        for pid in slow:
            (dfr, ff, rr), (dfr0, ff0, rr0) = fast[pid], slow[pid]
            assert ff == pytest.approx(ff0, rel=1e-4, abs=1e-10) and rr == pytest.approx(rr0, rel=1e-4, abs=1e-10)
            assert dfr == pytest.approx(dfr0, abs=1e-4 * (ff0 * rr0) ** 0.5 + 1e-10)
        fast_names |= set(names) - set(handed)
    # every Linear layer (GPT-2's blocks are Conv1D, with biases: only its tied output projection,
    # unless in Gram form with their products) took the fast path
    if gram_form in ("rows", "instance"):
        linear |= {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    # and every normalisation layer (its rows' gradients, geffect.engine.normrows)
    norms = {n for n, m in model.named_modules() if isinstance(m, normrows._NORMS)}
    assert norms
    assert fast_names and fast_names <= linear | norms | {n for n, m in model.named_modules()
                                                          if isinstance(m, torch.nn.Embedding)}
    assert linear | norms <= fast_names


def _captured_step(model, tok, spec):
    """A streamed step whose capture is kept at the moment the output projection completes."""
    method = method_of(spec)
    ctx, ref = setup(model, method)
    perturb(model, ref)
    kept = {}

    def keep(model, names, cap, segments, products, span):
        if "lm_head" in names:
            kept.update(names=list(names), cap=cap, segments=segments, products=dict(products), span=span,
                        slow=part_scalars(model, {n: cap.assignment[n] for n in names},
                                          [Captured(cap, segments, [], [])]),
                        seen={n: [copy.copy(r) for r in cap.seen[n]] for n in names})   # (release clears them)
        return part_scalars(model, {n: cap.assignment[n] for n in names}, [Captured(cap, segments, [], [])])
    mp = pytest.MonkeyPatch()
    mp.setattr(geffect.step, "streamed_part_scalars", keep)
    try:
        Step(model, method, ref, ctx, Engine(model))([micro_batch(tok, method, tiny_data())],
                                                     Due(effects=True, conflicts=True))
    finally:
        mp.undo()
    kept["cap"].seen.update(kept["seen"])       # (released after the call; restored to compute again)
    return kept


@pytest.mark.parametrize("formed", ["forget", "retain"])
def test_either_part_formed_gives_the_statistics_unless_the_difference_cancels(formed):
    """Forming the forget part and differencing for the retain part's norm cancels on NPO+GD (the
    retain gradient is a few percent of the forget one): refused there, accepted for GD's comparable
    parts; forming the retain part is accepted for both and exact."""
    model, tok = next((m, t) for k, m, t in models() if k == "tiny-llama")
    for spec, cancels in (("gd", False), ("npo+gd", formed == "forget")):
        k = _captured_step(model, tok, spec)
        segs, span, prod = k["segments"], k["span"], k["products"]
        rows = {formed: segs[formed]}
        dots = {formed: prod["lm_head"][rows[formed].start - span.start:rows[formed].stop - span.start].double().sum()}
        got = gram._unit_scalars(k["cap"], ("lm_head",), rows, dots, model.lm_head.weight)
        if cancels:
            assert got is None
            continue
        want = k["slow"][id(model.lm_head.weight)]
        assert got == pytest.approx(want, rel=1e-4), (spec, formed)


def test_gram_and_formed_norms_agree_and_cancelling_gram_is_refused():
    gen = torch.Generator().manual_seed(0)
    for K in (3, 8, 400):                   # Gram for few positions, formed for many
        d, a = torch.randn(K, 24, generator=gen), torch.randn(K, 16, generator=gen)
        want = ((d.double().T @ a.double()) ** 2).sum()
        assert gram._outer_sum_sq(d, a) == pytest.approx(want.item(), rel=1e-5)
    # two positions that almost cancel: the Gram sum is rounding noise of its terms, so g is formed
    a = torch.randn(1, 64, generator=gen, dtype=torch.float64).repeat(2, 1)
    d = torch.randn(1, 64, generator=gen, dtype=torch.float64)
    d = torch.cat([d, -d * (1 - 1e-6)])
    P = (d @ d.T) * (a @ a.T)
    assert P.double().sum() < gram.CANCEL_GRAM * P.abs().double().sum()
    want = ((d.sum(0, keepdim=True).T @ a[:1]) ** 2).sum()       # (d₁ + d₂) aᵀ, summed first
    got = gram._outer_sum_sq(d, a)
    assert got == pytest.approx(want.item(), rel=1e-6)
    assert got == gram.squared_norm(d.T @ a)          # the formed product's norm, not the Gram sum


@pytest.mark.parametrize("spec", ["npo+gd", "idkdpo+gd"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2", "tied-llama"])
def test_pairs_in_gram_form_equal_the_formed_risk_gradients_per_group(monkeypatch, kind, spec):
    """Fig. 5b pairs, every instance and group: Linear layers and a tied output projection with its
    embedding (each use's share to its own group) in Gram form against ∇R formed per module."""
    import geffect.engine.pairs as pairs_mod
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    method = method_of(spec)
    ctx, ref = setup(model, method)
    perturb(model, ref)
    mb = micro_batch(tok, method, tiny_data())
    taken = []
    tied = pairs_mod.PairsAccumulator._tied_gram

    def spy(self, names):
        done = tied(self, names)
        taken.extend(done)
        return done
    monkeypatch.setattr(pairs_mod.PairsAccumulator, "_tied_gram", spy)
    got = {}
    for gram_form in (False, True):
        monkeypatch.setattr(gram, "FORCE", gram_form)
        got[gram_form] = Step(model, method, ref, ctx, Engine(model))([mb], Due(effects=True, pairs=True)).pairs[0]
    for risk in ("unlearn", "retain"):
        want, have = getattr(got[False], risk), getattr(got[True], risk)
        assert (have - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7, risk
    is_tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert bool(taken) == is_tied
