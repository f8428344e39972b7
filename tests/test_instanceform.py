"""Per-row G-effect products and the parts' statistics of Linear layers formed in the training
backward (geffect.engine.instanceform) against brute-force per-row gradients and against the matmul
form they replace (rules.linear_rule, itself tested against one-sample autograd in test_engine.py)."""
import pytest
import torch
from helpers import method_of, micro_batch, models, setup, tiny_data
from test_gram import perturb
from test_gramrows import assert_same_conflicts, padded

from geffect.engine import Due, Engine, gramrows, instanceform
from geffect.engine.rules import _CONV1D
from geffect.step import Step

SPECS = ["gd", "npo+gd", "idkdpo+gd", "ga"]     # GA: retain rows in their own chunk, never taken
EFFECTS_AND_CONFLICTS = Due(effects=True, conflicts=True)


def _brute(D, A, conv1d, retain, w):
    """Each row's gradient g_n = D_nᵀ A_n (Conv1D: A_nᵀ D_n) formed alone, and from them G, p, the
    parts' statistics and the pairs' ⟨g_n, Σ_m w_mk g_m⟩."""
    g = torch.stack([(A[n].T @ D[n]) if conv1d else (D[n].T @ A[n]) for n in range(D.shape[0])]).double()
    G = g.sum(0)
    p = torch.stack([(gn * G).sum() for gn in g])
    r = torch.zeros(D.shape[0], dtype=torch.bool)
    r[retain] = True
    Gf, Gr = g[~r].sum(0), g[r].sum(0)
    risks = [(w[:, k, None, None].double() * g).sum(0) for k in range(2)]
    pairs = torch.tensor([[(gn * Rk).sum().item() for Rk in risks] for gn in g], dtype=torch.float64)
    return G, p, torch.stack([(Gf * Gr).sum(), (Gf * Gf).sum(), (Gr * Gr).sum()]), pairs


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("retain", [slice(3, 5), slice(0, 2), slice(5, 5)])
@pytest.mark.parametrize("tile_bytes", [instanceform.TILE_BYTES, 3 * 5 * 7 * 8])   # one tile; many, a partial last
def test_rows_grad_against_each_rows_own_gradient(monkeypatch, conv1d, retain, tile_bytes):
    """G = Σ_n g_n, p_n = ⟨g_n, G⟩, the parts' (⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖²) and the pairs' products
    against the rows' gradients formed one at a time (float64), with or without the statistics and
    the pairs, in one tile or many."""
    monkeypatch.setattr(instanceform, "TILE_BYTES", tile_bytes)
    gen = torch.Generator().manual_seed(1)
    N, T, d_in, d_out = 5, 6, 7, 11
    D, A = torch.randn(N, T, d_out, generator=gen), torch.randn(N, T, d_in, generator=gen)
    D[1, 4:] = 0                                           # padding: no cotangent
    w = torch.rand(N, 2, generator=gen)
    w[retain, 0] = 0
    w[:retain.start, 1] = w[retain.stop:, 1] = 0
    G0, p0, s0, q0 = _brute(D, A, conv1d, retain, w)

    def buffer(numel, dtype, device):
        return torch.empty(numel, dtype=dtype, device=device)
    for stats in (False, True):
        for pair_w in (None, w):
            G, p, s, q = instanceform._rows_grad(D, A, conv1d, retain, stats, buffer, pair_w)
            assert G.shape == G0.shape and torch.allclose(G.double(), G0, rtol=1e-5, atol=1e-5)
            assert torch.allclose(p, p0, rtol=1e-5, atol=1e-4 * p0.abs().max().item())
            if stats:
                assert torch.allclose(s, s0, rtol=1e-5, atol=1e-4 * s0[1:].max().item())
            else:
                assert s is None
            if pair_w is not None:
                assert torch.allclose(q, q0, rtol=1e-5, atol=1e-4 * q0.abs().max().item())
            else:
                assert q is None


def _linear_names(model) -> set[str]:
    kinds = (torch.nn.Linear,) + ((_CONV1D,) if _CONV1D is not None else ())
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, kinds) and m is not head}


_WARMED: set[int] = set()


def profiled(model, tok, spec, instance: bool, monkeypatch, taken=None, batch=None, due=EFFECTS_AND_CONFLICTS):
    """One profiled step (``.grad`` left in place, no optimizer): the instance form on, or off with
    every Linear layer in the matmul form; ``taken`` receives the layers the instance form took.

    A model's first step in the process runs once before, unmeasured: measured, the first step of a
    process that has run other tests can differ from every later one in its attention output (~2e-6)
    and so in the attention projections' q/k gradients (~1e-4 of the tiny models' small values), the
    instance form's own products exact for the cotangents it was given (to 1e-7 in float64)."""
    if id(model) not in _WARMED:
        _WARMED.add(id(model))
        profiled(model, tok, spec, False, monkeypatch, batch=batch, due=due)
    monkeypatch.setattr(instanceform, "ENABLED", instance)
    monkeypatch.setattr(gramrows, "FORCE", None if instance else False)
    method = method_of(spec)
    ctx, ref = setup(model, method)
    perturb(model, ref)
    take = instanceform.InstanceForm.take
    if taken is not None:
        def spy(self, cap, names, products, span):
            done = take(self, cap, names, products, span)
            taken.extend(done)
            return done
        monkeypatch.setattr(instanceform.InstanceForm, "take", spy)
    mb = micro_batch(tok, method, tiny_data()) if batch is None else batch
    res = Step(model, method, ref, ctx, Engine(model))([mb], due)
    monkeypatch.setattr(instanceform.InstanceForm, "take", take)
    return res, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_effects(a, b, tol=1e-5):
    for split in ("forget", "retain"):
        x, y = getattr(a.effects[0], split), getattr(b.effects[0], split)
        assert (x - y).abs().max() <= tol * x.abs().max() + 1e-8, split


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2", "tied-llama"])
def test_instance_form_gives_the_matmul_forms_effects_conflicts_and_gradient(monkeypatch, kind, spec):
    """Per-instance, per-group G-effects, every conflict record and ``.grad`` itself: the instance
    form on every Linear layer but the output projection (GPT-2's Conv1D with biases included; none
    on GA's chunked rows) against the matmul form and autograd's gradient."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    taken: list[str] = []
    (fast, g1), (slow, g0) = (profiled(model, tok, spec, inst, monkeypatch, taken if inst else None)
                              for inst in (True, False))
    assert set(taken) == (set() if spec == "ga" else _linear_names(model))
    assert fast.path == slow.path
    assert_same_effects(slow, fast)
    assert g1.keys() == g0.keys()
    for n in g0:      # float32 sums in another order: to 1e-5 of the tensor's largest entry
        assert torch.allclose(g1[n], g0[n], rtol=1e-5, atol=1e-5 * g0[n].abs().max().item()), n
    assert fast.grad_norm == pytest.approx(slow.grad_norm, rel=1e-5)
    assert (len(fast.conflicts) > 0) == (spec != "ga")
    assert_same_conflicts(slow.conflicts, fast.conflicts)


def test_a_gradient_holding_anything_else_is_left_to_the_other_forms(monkeypatch):
    """A hook that adds to one layer's ``.grad`` breaks Σ_n p_n = ‖.grad‖²: that layer is not taken
    (the matmul form takes it along the gradient as it is), every other layer is."""
    model, tok = next((m, t) for k, m, t in models() if k == "tiny-llama")
    victim = model.model.layers[0].mlp.down_proj
    extra = 0.5 * torch.randn(victim.weight.shape, generator=torch.Generator().manual_seed(3))

    def add(p):
        p.grad.add_(extra)
    handle = victim.weight.register_post_accumulate_grad_hook(add)
    try:
        taken: list[str] = []
        (fast, _), (slow, _) = (profiled(model, tok, "npo+gd", inst, monkeypatch, taken if inst else None)
                                for inst in (True, False))
    finally:
        handle.remove()
    assert set(taken) == _linear_names(model) - {"model.layers.0.mlp.down_proj"}
    assert_same_effects(slow, fast)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_padding_changes_nothing_in_the_instance_form(monkeypatch, kind):
    """Extra padding columns (no cotangent) change no per-instance value and no conflict record."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    method = method_of("npo+gd")
    mb = micro_batch(tok, method, tiny_data())
    taken: list[str] = []
    res = [profiled(model, tok, "npo+gd", True, monkeypatch, taken, batch=b)[0] for b in (mb, padded(mb, tok, 7))]
    assert set(taken) == _linear_names(model)          # (each layer taken in both steps)
    assert_same_effects(res[0], res[1], tol=1e-4)
    for c0, c1 in zip(res[0].conflicts, res[1].conflicts):
        assert c1["cosine"] == pytest.approx(c0["cosine"], abs=1e-4)


@pytest.mark.parametrize("spec", ["npo+gd", "idkdpo+gd"])      # IdkDPO: an instance's forget and idk rows
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_pairs_equal_the_matmul_forms(monkeypatch, kind, spec):
    """A step that takes the Fig. 5b pairs: the instance form's (every Linear layer but the output
    projection; GPT-2's with biases) against the matmul form's, with the same G-effects."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    taken: list[str] = []
    due = Due(effects=True, conflicts=True, pairs=True)
    (fast, _), (slow, _) = (profiled(model, tok, spec, inst, monkeypatch, taken if inst else None, due=due)
                            for inst in (True, False))
    assert set(taken) == _linear_names(model)
    assert_same_effects(slow, fast)
    assert len(fast.pairs) == len(slow.pairs) == 1
    for risk in ("unlearn", "retain"):
        x, y = getattr(slow.pairs[0], risk), getattr(fast.pairs[0], risk)
        assert x.shape == y.shape and (x - y).abs().max() <= 1e-5 * x.abs().max() + 1e-8, risk
