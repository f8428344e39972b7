"""Objectives against their formulas at analytic points and their gradients against autograd."""
import math
import random

import pytest
import torch

from geffect.data.batching import collate
from geffect.data.synthetic import default_splits, idk_answers
from geffect.models import frozen_reference
from geffect.objectives import Hyper, parse_method
from geffect.objectives import functional as fn
from geffect.unlearn import Data, forward, make_batch


def test_token_nll_matches_hf_loss(tiny):
    b = collate(tiny.tokenizer, {"x": [("What is x?", "It is y.", ""), ("Q", "a longer answer here", "")]}, 64)
    out = tiny.model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
    nll, mask = fn.token_nll(out.logits, b.labels)
    # HF's loss is the token mean over all answer tokens
    assert torch.allclose((nll * mask).sum() / mask.sum(), out.loss, atol=1e-5)


def test_answer_only_masking(tiny):
    tok = tiny.tokenizer
    b = collate(tok, {"x": [("What is the capital?", "Paris.", "")]}, 64)
    labels = b.labels[0]
    answer_ids = tok("Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kept = labels[labels != -100].tolist()
    assert kept == answer_ids
    # prompt tokens are masked out
    n_prompt = int((labels == -100).sum())
    assert n_prompt == len(b.input_ids[0]) - len(answer_ids)


def test_ga_is_minus_nll():
    nll = torch.rand(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    per = [(nll[i] * mask[i]).sum() / mask[i].sum() for i in range(3)]
    assert torch.allclose(fn.ga(nll, mask), -torch.stack(per).mean())


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_at_reference_equals_2_over_beta_ln2(beta):
    logp = torch.tensor([-3.0, -10.0, -0.5])
    loss, w = fn.npo(logp, logp.clone(), beta)
    assert math.isclose(loss.item(), 2 / beta * math.log(2), rel_tol=1e-6)
    assert torch.allclose(w, torch.ones(3))


def test_npo_weight_formula_and_gradient():
    logp = torch.tensor([-2.0, -5.0], requires_grad=True)
    ref = torch.tensor([-3.0, -4.0])
    beta = 0.7
    loss, w = fn.npo(logp, ref, beta)
    pt, po = logp.detach().exp(), ref.exp()
    assert torch.allclose(w, 2 * pt**beta / (pt**beta + po**beta), atol=1e-6)
    loss.backward()
    # ∇L = w·∇log π / N  (mean over samples)
    assert torch.allclose(logp.grad, w / 2, atol=1e-6)


def test_simnpo_formula():
    logp, n = torch.tensor([-4.0, -9.0]), torch.tensor([2.0, 3.0])
    loss, w = fn.simnpo(logp, n, beta=4.5, delta=0.3)
    x = logp / n
    expect = (-(2 / 4.5) * torch.log(torch.sigmoid(-4.5 * x - 0.3))).mean()
    assert torch.allclose(loss, expect)
    assert torch.allclose(w, 2 * torch.sigmoid(4.5 * x + 0.3))


def test_token_weights_formulas():
    nll = torch.tensor([[0.5, 2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    p, po = torch.exp(-nll.detach()), torch.exp(-ref)
    _, w = fn.wga(nll, mask, alpha=2.0)
    assert torch.allclose(w, p**2 * mask)
    _, w = fn.tnpo(nll, ref, mask, beta=4.0)
    assert torch.allclose(w, 2 * p**4 / (p**4 + po**4) * mask, atol=1e-6)
    loss, w = fn.wtnpo(nll, ref, mask, alpha=1.5, beta=4.0)
    assert torch.allclose(w, 2 * p**5.5 / (p**4 + po**4) * mask, atol=1e-6)
    loss.backward()  # weights are detached: ∂L/∂nll_t = −w_t / |y| (L = Σ w_t log p_t)
    assert torch.allclose(nll.grad, -w / 2)


def test_kl_of_model_with_itself_is_zero_and_padding_ignored():
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 1, 2, 3, 4, 5]])
    assert fn.forward_kl(logits, logits, labels).abs().item() < 1e-6
    other = logits.clone()
    other[0, 4:] += 10 * torch.randn(2, 11)  # changes only padding positions of row 0
    assert fn.forward_kl(logits, other, labels).abs().item() < 1e-6
    assert fn.forward_kl(logits, torch.randn(2, 6, 11), labels).item() > 0


def test_idkdpo_at_init():
    lw, ll = torch.tensor([-5.0, -2.0]), torch.tensor([-1.0, -7.0])
    assert math.isclose(fn.idkdpo(lw, lw, ll, ll, 0.1).item(), 20 * math.log(2), rel_tol=1e-6)


def test_rmu_parts():
    h = torch.randn(2, 4, 8)
    c = fn.rmu_control(8, 6.5, seed=1)
    assert math.isclose(c.norm().item(), 6.5, rel_tol=1e-5)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float)
    expect = torch.stack([((h[i] - c) ** 2).mean(-1)[mask[i] > 0].mean() for i in range(2)]).mean()
    assert torch.allclose(fn.rmu_forget(h, c, mask), expect)
    assert fn.rmu_retain(h, h, mask).item() == 0


ALL_METHODS = ["ga", "gd", "npo", "npo+gd", "npo+kl", "simnpo+gd", "wga+kl", "tnpo", "wtnpo+gd", "po+gd",
               "idkdpo+gd", "rmu", "llmu"]


def _setup(tiny, spec):
    method = parse_method(spec, Hyper(rmu_layer=1))
    sp = default_splits(0)
    data = Data(sp["forget"][:3], sp["retain"][:2], [], idk_answers(), True)
    batch = make_batch(tiny.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
    ref = frozen_reference(tiny.model)
    return method, batch, ref


@pytest.mark.parametrize("spec", ALL_METHODS)
def test_every_method_runs_and_gradient_matches_torch_func(tiny, spec):
    """The loss gradient of each method agrees with torch.func.grad of a functional re-evaluation."""
    from torch.func import functional_call, grad

    method, batch, ref = _setup(tiny, spec)
    model = tiny.model
    control = fn.rmu_control(model.config.hidden_size, 6.5) if method.needs_hidden else None
    fo = forward(model, ref, batch, method, 1 if method.needs_hidden else None)
    parts = method.parts(fo, control)
    assert torch.isfinite(parts.total)
    model.zero_grad()
    parts.total.backward()
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, **kw):
            return self.m(**kw)

    def loss_fn(ps):
        class Shim:
            def __call__(self, **kw):
                return functional_call(model, ps, (), kw)
        fo2 = forward(Shim(), ref, batch, method, 1 if method.needs_hidden else None)
        return method.parts(fo2, control).total

    g = grad(loss_fn)(params)
    for n in names:
        p = dict(model.named_parameters())[n]
        if p.grad is None:
            assert g[n].abs().max() < 1e-7
            continue
        assert torch.allclose(p.grad, g[n], atol=1e-6, rtol=1e-4), n


def test_methods_parse_and_reject():
    from geffect.objectives import MethodError
    assert parse_method("gd").name == "ga+gd"
    assert parse_method("npo+kl").needs_ref_logits
    for bad in ["foo", "npo+bar", "npo+gd+kl", "rmu+gd", ""]:
        with pytest.raises(MethodError):
            parse_method(bad)


@pytest.mark.parametrize("spec", ["npo+gd", "wga+kl", "tnpo", "simnpo", "idkdpo+gd"])
def test_padding_changes_no_loss_or_weight(tiny, spec):
    method, batch, ref = _setup(tiny, spec)
    model = tiny.model
    fo = forward(model, ref, batch, method)
    parts = method.parts(fo)
    pad = tiny.tokenizer.pad_token_id
    k = 7
    wide = type(batch)(torch.cat([batch.input_ids, torch.full((len(batch.input_ids), k), pad)], 1),
                       torch.cat([batch.attention_mask, torch.zeros(len(batch.input_ids), k, dtype=torch.long)], 1),
                       torch.cat([batch.labels, torch.full((len(batch.input_ids), k), -100)], 1),
                       batch.segments)
    parts2 = method.parts(forward(model, ref, wide, method))
    assert torch.allclose(parts.total, parts2.total, atol=1e-5)
    if parts.instance_weight is not None:
        assert torch.allclose(parts.instance_weight, parts2.instance_weight, atol=1e-5)
    if parts.token_weight is not None:
        assert torch.allclose(parts.token_weight, parts2.token_weight[:, : parts.token_weight.shape[1]], atol=1e-5)
        assert parts2.token_weight[:, parts.token_weight.shape[1]:].abs().max() == 0
