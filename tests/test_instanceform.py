"""Per-row G-effect products and the parts' statistics of Linear layers formed in the training
backward (geffect.engine.instanceform) against brute-force per-row gradients and against the matmul
form they replace (rules.linear_rule, itself tested against one-sample autograd in test_engine.py)."""
import json

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


# ---- which form a run takes (FormChoice) -------------------------------------------------------------

def _run_choice(choice, cost: dict[bool, float], steps: int = 9, pair_step: int = 3) -> list[bool]:
    """Offers ``steps`` steps to ``choice``, each costing ``cost[form]`` seconds per position (one pair
    step among them); returns the form each step took."""
    taken = []
    for k in range(steps):
        use = choice.use()
        taken.append(use)
        positions = 100 + 10 * k                     # batches of varying length: compared per position
        choice.observe(use, cost[use] * positions, positions, pairs=k == pair_step)
    return taken


@pytest.mark.parametrize("faster, close", [(True, False), (False, False), (True, True), (False, True)])
def test_auto_times_both_forms_on_the_runs_steps_and_keeps_the_faster(monkeypatch, faster, close):
    """auto on CPU: the first step takes the instance form unmeasured; then on, off, and where those two
    differ by under 20% per position, off and on as well (the pair step between them takes the next in
    that order, not compared); then every step takes the form with the lower mean seconds per position."""
    monkeypatch.setattr(instanceform, "ENABLED", None)
    choice = instanceform.FormChoice("auto", torch.device("cpu"), weights=10 ** 8)
    if close:
        cost = {True: 1.9e-6 if faster else 2.1e-6, False: 2e-6}
    else:
        cost = {True: 1e-6 if faster else 3e-6, False: 2e-6}
    taken = _run_choice(choice, cost)
    assert taken == ([True, True, False, False, False, True] + [faster] * 3 if close
                     else [True, True, False] + [faster] * 6)
    assert choice.chosen is faster and not choice.timing
    assert choice.report() == {"setting": "auto", "chosen": "on" if faster else "off",
                               "us_per_position": {"on": pytest.approx(cost[True] * 1e6),
                                                   "off": pytest.approx(cost[False] * 1e6)}}


def test_a_resumed_choice_goes_on_where_the_checkpoint_left_it(monkeypatch):
    """state() / restore(): mid-way through the timing the restored choice takes the same next forms
    and reaches the same decision as the uninterrupted one; once decided it keeps the decision."""
    monkeypatch.setattr(instanceform, "ENABLED", None)
    cost = {True: 2.1e-6, False: 2e-6}              # close: the whole on, off, off, on
    whole = instanceform.FormChoice("auto", torch.device("cpu"), weights=10 ** 8)
    first = instanceform.FormChoice("auto", torch.device("cpu"), weights=10 ** 8)
    expected = _run_choice(whole, cost, steps=9)
    head = _run_choice(first, cost, steps=3)
    resumed = instanceform.FormChoice("auto", torch.device("cpu"), weights=10 ** 8)
    resumed.restore(json.loads(json.dumps(first.state())))          # through the checkpoint's JSON
    tail = []
    for k in range(3, 9):
        use = resumed.use()
        tail.append(use)
        resumed.observe(use, cost[use] * 100, 100, pairs=k == 3)
    assert head + tail == expected and resumed.chosen is False


@pytest.mark.parametrize("setting, device, weights, want", [
    ("on", "cpu", 10 ** 8, True), ("off", "cpu", 10 ** 8, False),
    ("auto", "meta", 10 ** 8, False),                 # off the CPU: the other forms, untimed
    ("auto", "cpu", 10 ** 4, True),                   # a tiny model: not timed, the CPU's default
])
def test_fixed_settings_and_small_models_are_never_timed(monkeypatch, setting, device, weights, want):
    monkeypatch.setattr(instanceform, "ENABLED", None)
    choice = instanceform.FormChoice(setting, torch.device(device), weights=weights)
    assert not choice.timing
    assert _run_choice(choice, {True: 1e-6, False: 1e-6}) == [want] * 9
    assert choice.report() == {"setting": setting, "chosen": "on" if want else "off"}


def test_a_profiled_runs_steps_take_the_form_the_timing_chose(monkeypatch, tmp_path):
    """Through the loop (tiny Llama, NPO+GD, the size threshold lowered so that it is timed, the off
    form made to time faster): the steps take the forms in the timing's order, then off; summary.json
    says so; a checkpoint keeps the choice."""
    from geffect.config import ProfileConfig, UnlearnConfig
    from geffect.data import default_splits
    from geffect.loop import unlearn
    sp = default_splits(0)
    files = []
    for name, rows in (("forget", sp["forget"][:4]), ("retain", sp["retain"][:4])):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(json.dumps({"question": r.question, "answer": r.answer}) for r in rows))
        files.append(str(f))
    monkeypatch.setattr(instanceform, "ENABLED", None)
    monkeypatch.setattr(instanceform.FormChoice, "MIN_WEIGHTS", 0)
    used = []
    observe = instanceform.FormChoice.observe

    def timed(self, use, seconds, positions, pairs=False):
        used.append(use)
        observe(self, use, (2e-6 if use else 1e-6) * positions, positions, pairs)
    monkeypatch.setattr(instanceform.FormChoice, "observe", timed)
    made = []                                        # the steps that routed their Linear layers through the form
    init = instanceform.InstanceForm.__init__

    def spy(self, *a):
        made.append(len(used))
        init(self, *a)
    monkeypatch.setattr(instanceform.InstanceForm, "__init__", spy)
    from geffect import checkpoint
    kept, save = [], checkpoint.save

    def keep(path, k, model, optimizer, stream, carry):
        kept.append(json.loads(json.dumps(carry["instance_form"])))
        return save(path, k, model, optimizer, stream, carry)
    monkeypatch.setattr(checkpoint, "save", keep)
    cfg = UnlearnConfig(method="npo+gd", model="tiny-llama", forget=files[0], retain=files[1], steps=7,
                        memorize="no", progress=False, save_model=False, checkpoint_every=6)
    out = tmp_path / "run"
    summary = unlearn(cfg, str(out), profile=ProfileConfig(pairs_every=0, tokens_every=0))
    assert used == [True, True, False, False, False, False, False]      # a clear difference: decided after two
    assert made == [k for k, u in enumerate(used) if u]
    written = json.loads((out / "summary.json").read_text())
    assert written["instance_form"] == summary["instance_form"]
    assert summary["instance_form"]["setting"] == "auto" and summary["instance_form"]["chosen"] == "off"
    assert summary["instance_form"]["us_per_position"] == {"on": pytest.approx(2.0), "off": pytest.approx(1.0)}
    assert len(kept) == 1 and kept[0]["chosen"] is False and len(kept[0]["on"]) == len(kept[0]["off"]) == 1
