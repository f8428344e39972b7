"""Normalisation layers' per-row gradients, G-effect products and identity check
(geffect.engine.normrows) against one-row autograd and against the rules they replace (their parts'
statistics against the formed forget gradient: test_gram.py)."""
import pytest
import torch
from helpers import method_of, micro_batch, models, setup, tiny_data
from test_gram import perturb

from geffect.engine import Due, Engine, normrows
from geffect.engine.rules import _RMS
from geffect.step import Step


def _norms():
    yield torch.nn.LayerNorm(6)
    if _RMS is not None:
        yield _RMS(6, eps=1e-6)


@pytest.mark.parametrize("mod", list(_norms()), ids=lambda m: type(m).__name__)
def test_row_grads_are_each_rows_own_gradient(mod):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x, g = torch.randn(3, 5, 6, generator=gen), torch.randn(3, 5, 6, generator=gen)
    rows = normrows.row_grads(mod, x, g)
    assert set(rows) == {n for n, p in mod.named_parameters()}
    for n in range(3):
        mod.zero_grad()
        (mod(x[n]) * g[n]).sum().backward()
        for name, p in mod.named_parameters():
            assert torch.allclose(rows[name][n], p.grad, rtol=1e-5, atol=1e-6), (name, n)


def _streamed(monkeypatch, kind, spec, spy):
    """One streamed step with conflict statistics; ``spy(cap, names, products, span, taken)`` sees
    each call of normrows.take with the capture still live."""
    real = normrows.take

    def take(cap, names, products, span, retain, stats):
        taken = real(cap, names, products, span, retain, stats)
        spy(cap, names, products, span, taken)
        return taken
    monkeypatch.setattr(normrows, "take", take)
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    method = method_of(spec)
    ctx, ref = setup(model, method)
    perturb(model, ref)
    return Step(model, method, ref, ctx, Engine(model))([micro_batch(tok, method, tiny_data())],
                                                        Due(effects=True, conflicts=True))


@pytest.mark.parametrize("spec", ["gd", "npo+gd"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_products_equal_the_rules(monkeypatch, kind, spec):
    """Each taken layer's per-row products against the rule's (Capture.inner_products along .grad)."""
    seen = []

    def spy(cap, names, products, span, taken):
        for n in taken:
            V = {id(p): p.grad for p in cap.modules[n].parameters() if p.grad is not None}
            slow: dict = {}
            cap.inner_products(V, span, [n], slow)
            assert torch.allclose(products[n].float(), slow[n], rtol=1e-5, atol=1e-6 * slow[n].abs().max()), n
            seen.append(n)
    _streamed(monkeypatch, kind, spec, spy)
    model = next(m for k, m, _ in models() if k == kind)
    assert set(seen) == {n for n, m in model.named_modules() if isinstance(m, normrows._NORMS)}


def test_a_gradient_holding_anything_else_is_left_to_the_rule(monkeypatch):
    """A norm whose .grad is not the sum of its rows' gradients fails the identity check."""
    real, altered, taken_all = normrows.take, [], []

    def take(cap, names, products, span, retain, stats):
        for n in names:
            mod = cap.modules[n]
            if isinstance(mod, normrows._NORMS) and not altered:
                mod.weight.grad.mul_(1.01)
                altered.append(n)
        taken = real(cap, names, products, span, retain, stats)
        taken_all.extend(taken)
        return taken
    monkeypatch.setattr(normrows, "take", take)
    model, tok = next((m, t) for k, m, t in models() if k == "tiny-llama")
    method = method_of("gd")
    ctx, ref = setup(model, method)
    Step(model, method, ref, ctx, Engine(model))([micro_batch(tok, method, tiny_data())],
                                                 Due(effects=True, conflicts=True))
    assert altered and altered[0] not in taken_all
    assert len(taken_all) == sum(isinstance(m, normrows._NORMS) for m in model.modules()) - 1
