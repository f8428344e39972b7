"""Objectives against their formulas at analytic points and their gradients against autograd."""
import math

import pytest
import torch
from helpers import method_of, micro_batch, setup, tiny_data

from geffect.data.batching import collate
from geffect.forward import forward
from geffect.objectives import functional as fn
from geffect.objectives import parse_method


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
               "idkdpo+gd", "rmu", "rmu-wmdp", "rmu-full", "llmu", "tvn"]


def _setup(tiny, spec):
    method = method_of(spec)
    ctx, ref = setup(tiny.model, method)
    return method, micro_batch(tiny.tokenizer, method, tiny_data()).batch, ref, ctx


@pytest.mark.parametrize("spec", ALL_METHODS)
def test_every_method_runs_and_gradient_matches_torch_func(tiny, spec):
    """The loss gradient of each method agrees with torch.func.grad of a functional re-evaluation."""
    from torch.func import functional_call, grad

    method, batch, ref, ctx = _setup(tiny, spec)
    model = tiny.model
    fo = forward(model, ref, batch, method, ctx)
    parts = method.parts(fo, ctx)
    assert torch.isfinite(parts.total)
    model.zero_grad()
    parts.total.backward()
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(ps):
        class Shim:
            def __call__(self, **kw):
                return functional_call(model, ps, (), kw)
        fo2 = forward(Shim(), ref, batch, method, ctx)
        return method.parts(fo2, ctx).total

    g = grad(loss_fn)(params)
    for n in names:
        p = dict(model.named_parameters())[n]
        if not p.requires_grad:     # frozen by the objective's setup (RMU): not trained, no .grad
            continue
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
    method, batch, ref, _ = _setup(tiny, spec)
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


def test_every_registered_objective_has_a_gradient_test():
    from geffect.objectives import FORGET, RETAIN
    covered = {(e.role, e.name) for spec in ALL_METHODS for e in parse_method(spec).entries}
    assert covered == {("forget", n) for n in FORGET} | {("retain", n) for n in RETAIN}


# ---- every registry entry against its formula, written out independently on hand-made inputs ----

def _synthetic_out():
    """A ForwardOut with random values: rows 0-1 forget, 2-3 retain, 4-5 idk, 6-7 mismatch."""
    from geffect.objectives import ForwardOut, ObjectiveContext
    g = torch.Generator().manual_seed(0)
    N, T, V, d = 8, 6, 7, 5
    mask = (torch.rand(N, T - 1, generator=g) > 0.3).float()
    mask[:, 0] = 1                                                        # every row has an answer token
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, 1:][mask == 0] = -100
    labels[:, 0] = -100
    logits = torch.randn(N, T, V, generator=g)
    nll, m = fn.token_nll(logits, labels)
    assert torch.equal(m, mask)
    segs = {"forget": slice(0, 2), "retain": slice(2, 4), "idk": slice(4, 6), "mismatch": slice(6, 8)}
    ref_logits, ref_hidden = torch.randn(N, T, V, generator=g), torch.randn(N, T, d, generator=g)
    attention = torch.ones(N, T)
    attention[1, -2:] = attention[3, -1:] = 0                             # padding on a forget and a retain row
    out = ForwardOut(nll, mask, logits, labels, segs, hidden=torch.randn(N, T, d, generator=g), attention=attention,
                     ref_nll=torch.rand(N, T - 1, generator=g) * 3 * mask,
                     ref_logits={"retain": ref_logits[segs["retain"]]}, ref_hidden={"retain": ref_hidden[segs["retain"]]})
    out.full_ref = ref_logits, ref_hidden   # the twins index the full tensors by row
    return out, ObjectiveContext(hidden_layer=0, control=torch.rand(d, generator=g))


def _rows(out, seg):
    s = out.segments[seg]
    return range(s.start, s.stop)


def _lp(out, i, ref=False):       # sequence log-probability Σ_t log p_t over answer tokens
    nll = out.ref_nll if ref else out.nll
    return -sum(nll[i, t].item() for t in range(nll.shape[1]) if out.mask[i, t])


def _mean_nll(out, i):
    ts = [t for t in range(out.mask.shape[1]) if out.mask[i, t]]
    return sum(out.nll[i, t].item() for t in ts) / len(ts)


def _weighted(out, i, w):          # (1/|y|) Σ_t w_t·log p_t
    ts = [t for t in range(out.mask.shape[1]) if out.mask[i, t]]
    return sum(w(math.exp(-out.nll[i, t].item()), math.exp(-out.ref_nll[i, t].item())) * -out.nll[i, t].item()
               for t in ts) / len(ts)


def _mse(out, i, target):          # mean over answer positions (hidden t predicts token t+1) of mean_d (h − c)²
    ts = [t for t in range(out.mask.shape[1]) if out.mask[i, t]]
    return sum(((out.hidden[i, t] - target(i, t)) ** 2).mean().item() for t in ts) / len(ts)


def _mse_text(out, i, target):     # mean over every real token position (prompt and answer) of mean_d (h − c)²
    ts = [t for t in range(out.attention.shape[1]) if out.attention[i, t]]
    return sum(((out.hidden[i, t] - target(i, t)) ** 2).mean().item() for t in ts) / len(ts)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def _logsig(x):
    return -math.log1p(math.exp(-x))


def _kl_row(out, i):
    ts = [t for t in range(out.mask.shape[1]) if out.mask[i, t]]
    total = 0.0
    for t in ts:
        p = torch.softmax(out.full_ref[0][i, t].double(), -1)
        q = torch.softmax(out.logits[i, t].double(), -1)
        total += (p * (p.log() - q.log())).sum().item()
    return total / len(ts)


def _formulas():
    from geffect.config import Hyper
    h = Hyper(npo_beta=0.7, simnpo_beta=2.0, simnpo_delta=0.3, wga_alpha=2.0, tnpo_beta=3.0, wtnpo_alpha=1.5,
              wtnpo_beta=2.0, dpo_beta=0.4, llmu_ga=0.5, llmu_mismatch=2.0)

    def ln(seg):
        return lambda o, c: _mean(_mean_nll(o, i) for i in _rows(o, seg))
    return h, {
        ("forget", "ga"): lambda o, c: -ln("forget")(o, c),
        ("forget", "npo"): lambda o, c: _mean(-(2 / h.npo_beta) * _logsig(-h.npo_beta * (_lp(o, i) - _lp(o, i, True)))
                                              for i in _rows(o, "forget")),
        ("forget", "simnpo"): lambda o, c: _mean(
            -(2 / h.simnpo_beta) * _logsig(-h.simnpo_beta * _lp(o, i) / o.mask[i].sum().item() - h.simnpo_delta)
            for i in _rows(o, "forget")),
        ("forget", "wga"): lambda o, c: _mean(_weighted(o, i, lambda p, po: p ** h.wga_alpha) for i in _rows(o, "forget")),
        ("forget", "tnpo"): lambda o, c: _mean(_weighted(
            o, i, lambda p, po: 2 * p ** h.tnpo_beta / (p ** h.tnpo_beta + po ** h.tnpo_beta)) for i in _rows(o, "forget")),
        ("forget", "wtnpo"): lambda o, c: _mean(_weighted(
            o, i, lambda p, po: 2 * p ** (h.wtnpo_beta + h.wtnpo_alpha) / (p ** h.wtnpo_beta + po ** h.wtnpo_beta))
            for i in _rows(o, "forget")),
        ("forget", "po"): ln("idk"),
        ("forget", "idkdpo"): lambda o, c: _mean(
            -(2 / h.dpo_beta) * _logsig(h.dpo_beta * ((_lp(o, w) - _lp(o, w, True)) - (_lp(o, lo) - _lp(o, lo, True))))
            for w, lo in zip(_rows(o, "idk"), _rows(o, "forget"))),
        ("forget", "rmu"): lambda o, c: _mean(_mse(o, i, lambda i, t: c.control) for i in _rows(o, "forget")),
        ("forget", "rmu-full"): lambda o, c: _mean(_mse(o, i, lambda i, t: c.control) for i in _rows(o, "forget")),
        ("forget", "rmu-wmdp"): lambda o, c: _mean(_mse_text(o, i, lambda i, t: c.control) for i in _rows(o, "forget")),
        ("forget", "tvn"): ln("forget"),
        ("forget", "llmu"): lambda o, c: -h.llmu_ga * ln("forget")(o, c) + h.llmu_mismatch * ln("mismatch")(o, c),
        ("retain", "gd"): ln("retain"),
        ("retain", "kl"): lambda o, c: _mean(_kl_row(o, i) for i in _rows(o, "retain")),
        ("retain", "rmu"): lambda o, c: _mean(_mse(o, i, lambda i, t: o.full_ref[1][i, t]) for i in _rows(o, "retain")),
        ("retain", "rmu-wmdp"): lambda o, c: _mean(_mse_text(o, i, lambda i, t: o.full_ref[1][i, t])
                                                   for i in _rows(o, "retain")),
    }


def test_every_registered_objective_against_its_formula():
    from geffect.objectives import FORGET, RETAIN
    h, formulas = _formulas()
    assert set(formulas) == {("forget", n) for n in FORGET} | {("retain", n) for n in RETAIN}
    out, ctx = _synthetic_out()
    for (role, name), formula in formulas.items():
        entry = (FORGET if role == "forget" else RETAIN)[name]
        got = entry.loss(out, h, ctx).value.item()
        assert got == pytest.approx(formula(out, ctx), rel=1e-5, abs=1e-6), (role, name)


@pytest.mark.parametrize("kind,proj", [("tiny-llama", "mlp.down_proj.weight"), ("tiny-gpt2", "mlp.c_proj.weight")])
def test_rmu_variants_train_what_their_references_train(kind, proj):
    """rmu-wmdp: only the MLP output projections of blocks ℓ−2..ℓ (ℓ = 7 of 32, scaled); rmu-full:
    every parameter, c = 2; rmu: whole blocks ℓ−2..ℓ, c = 6.5."""
    from geffect.config import Hyper
    from geffect.layers import find_blocks
    from geffect.models import tiny_model
    from geffect.objectives.registry import FORGET, rmu_layer
    assert [rmu_layer(Hyper(), n, of_32=7) for n in (32, 24, 30, 8)] == [7, 5, 7, 2]
    assert rmu_layer(Hyper(rmu_layer=3), 32, of_32=7) == 3
    model = tiny_model(kind, seed=0, layers=8).model
    prefix, _blocks = find_blocks(model)
    ctx = FORGET["rmu-wmdp"].setup(model, Hyper(), 0)
    assert ctx.hidden_layer == 2
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{prefix}.{i}.{proj}" for i in (0, 1, 2)}
    assert ctx.control.norm().item() == pytest.approx(6.5)
    model = tiny_model(kind, seed=0, layers=8).model
    ctx = FORGET["rmu-full"].setup(model, Hyper(), 0)         # freezes nothing: every trained parameter trains
    assert all(p.requires_grad for p in model.parameters())
    assert ctx.control.norm().item() == pytest.approx(2.0) and ctx.hidden_layer == 2
    ctx = FORGET["rmu"].setup(model, Hyper(rmu_coeff=3.0), 0)
    assert ctx.control.norm().item() == pytest.approx(3.0)
    trained = {n.split(".")[len(prefix.split("."))] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"0", "1", "2"}


def test_rmu_losses_at_known_points():
    """At h = c·u on every counted token the forget part is 0; a prompt token far from c·u moves
    rmu-wmdp's loss (every token) but not rmu's (answer tokens)."""
    from geffect.config import Hyper
    from geffect.objectives import ForwardOut, ObjectiveContext
    from geffect.objectives.registry import FORGET
    d, T = 4, 5
    control = torch.full((d,), 0.5)
    labels = torch.tensor([[-100, -100, 3, 1, -100]])
    nll, mask = fn.token_nll(torch.zeros(1, T, 6), labels)
    hidden = control.expand(1, T, d).clone()
    out = ForwardOut(nll, mask, None, labels, {"forget": slice(0, 1)}, hidden=hidden,
                     attention=torch.tensor([[1, 1, 1, 1, 0]]))
    ctx = ObjectiveContext(hidden_layer=0, control=control)
    assert FORGET["rmu"].loss(out, Hyper(), ctx).value.item() == 0
    assert FORGET["rmu-wmdp"].loss(out, Hyper(), ctx).value.item() == 0
    out.hidden[0, 0] += 2.0                        # a prompt position: (2²) per unit, 1 of 4 real tokens
    assert FORGET["rmu"].loss(out, Hyper(), ctx).value.item() == 0
    assert FORGET["rmu-wmdp"].loss(out, Hyper(), ctx).value.item() == pytest.approx(4.0 / 4)
    out.hidden[0, 4] += 9.0                        # padding counts for neither
    assert FORGET["rmu-wmdp"].loss(out, Hyper(), ctx).value.item() == pytest.approx(1.0)
