"""Per-row G-effect products and the parts' statistics of Linear layers in Gram form
(geffect.engine.gramrows) against the matmul form they replace (rules.linear_rule, itself tested
against one-sample autograd in test_engine.py) and the formed forget gradient (parts.part_scalars)."""
import pytest
import torch
from helpers import method_of, micro_batch, models, setup, tiny_data
from test_gram import perturb

from geffect.engine import Due, Engine, gramrows, instanceform
from geffect.engine.capture import Capture
from geffect.engine.rules import _CONV1D
from geffect.step import Step

SPECS = ["gd", "npo+gd", "idkdpo+gd", "ga"]     # GA: retain rows in their own chunk, never eligible


EFFECTS_AND_CONFLICTS = Due(effects=True, conflicts=True)


@pytest.fixture(autouse=True)
def _gram_form_not_instance_form(monkeypatch):
    """The Linear layers here take the Gram or the matmul form (the instance form, which would take
    them first, has its own tests in test_instanceform.py)."""
    monkeypatch.setattr(instanceform, "ENABLED", False)


def profiled(model, tok, spec, force, monkeypatch, taken=None, due=EFFECTS_AND_CONFLICTS):
    """One profiled step (effects and conflict statistics by default) with the Gram form forced on or off."""
    monkeypatch.setattr(gramrows, "FORCE", force)
    method = method_of(spec)
    ctx, ref = setup(model, method)
    perturb(model, ref)
    if taken is not None:
        take = gramrows.GramRows.take

        def spy(self, names, products, skip=()):
            done = take(self, names, products, skip)
            taken.extend(done)
            return done
        monkeypatch.setattr(gramrows.GramRows, "take", spy)
    mb = micro_batch(tok, method, tiny_data())
    res = Step(model, method, ref, ctx, Engine(model))([mb], due)
    monkeypatch.setattr(gramrows.GramRows, "take", take if taken is not None else gramrows.GramRows.take)
    return res


def record_instances(monkeypatch) -> list:
    """Every GramRows made from here on (one per streamed backward), to look inside."""
    made: list[gramrows.GramRows] = []
    init = gramrows.GramRows.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(gramrows.GramRows, "__init__", spy)
    return made


def blocks_layout(rows: gramrows.GramRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (live, dead) positions of the blocks' layout, every row's N·T positions (the output
    projection's answer window may have its own, fewer)."""
    return rows._shared[max(rows._shared)]


def _linear_names(model) -> set[str]:
    kinds = (torch.nn.Linear,) + ((_CONV1D,) if _CONV1D is not None else ())
    return {n for n, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2", "tied-llama"])
def test_gram_form_gives_the_matmul_forms_effects_and_conflicts(monkeypatch, kind, spec):
    """Per-instance, per-group G-effects and every conflict record: Gram form on every eligible layer
    (GPT-2's Conv1D with biases included, a tied output projection with its embedding's rows, none on
    GA's chunked rows) against the matmul form."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    taken: list[str] = []
    res = {force: profiled(model, tok, spec, force, monkeypatch, taken if force else None)
           for force in (False, True)}
    assert set(taken) == (set() if spec == "ga" else _linear_names(model))
    a, b = res[False].effects[0], res[True].effects[0]
    for split in ("forget", "retain"):
        x, y = getattr(a, split), getattr(b, split)
        assert (x - y).abs().max() <= 1e-5 * x.abs().max() + 1e-8, split
    assert (len(res[True].conflicts) > 0) == (spec != "ga")          # global and per group (GA: no retain part)
    assert_same_conflicts(res[False].conflicts, res[True].conflicts)


def padded(mb, tok, k: int):
    """The micro-batch with k more padding columns (no token, no label, no attention)."""
    from dataclasses import replace
    batch, pad = mb.batch, tok.pad_token_id
    n = len(batch.input_ids)
    wide = type(batch)(torch.cat([batch.input_ids, torch.full((n, k), pad)], 1),
                       torch.cat([batch.attention_mask, torch.zeros(n, k, dtype=torch.long)], 1),
                       torch.cat([batch.labels, torch.full((n, k), -100)], 1), batch.segments)
    return replace(mb, batch=wide)


def assert_same_conflicts(want: list[dict], got: list[dict]) -> None:
    """Every conflict record equal, float32 dots to their scale: ⟨g_f, g_r⟩ to a share of
    ‖g_f‖‖g_r‖, not of itself (it may be near 0)."""
    assert len(want) == len(got)
    for c0, c1 in zip(want, got):
        assert c0.keys() == c1.keys()
        for k, v in c0.items():
            if isinstance(v, float):
                n1n2 = c0["norm_forget"] * c0["norm_retain"]
                tol = {"cosine": {"abs": 1e-5}, "dot": {"abs": 1e-5 * n1n2},
                       "removed_norm": {"abs": 1e-3 * n1n2 ** 0.5}}.get(k, {"rel": 1e-4, "abs": 1e-6})
                assert c1[k] == pytest.approx(v, **tol), (k, c0, c1)
            else:
                assert c1[k] == v, k


def test_a_gradient_holding_anything_else_takes_the_matmul_form(monkeypatch):
    """A hook that adds to one layer's ``.grad`` breaks 1ᵀM1 = ‖.grad‖²: that layer falls back to the
    matmul form (along the gradient as it is), every other layer stays in Gram form."""
    model, tok = next((m, t) for k, m, t in models() if k == "tiny-llama")
    victim = model.model.layers[0].mlp.down_proj
    extra = 0.5 * torch.randn(victim.weight.shape, generator=torch.Generator().manual_seed(3))

    def add(p):
        p.grad.add_(extra)
    handle = victim.weight.register_post_accumulate_grad_hook(add)   # runs before the engine's hook
    try:
        taken: list[str] = []
        res = {force: profiled(model, tok, "npo+gd", force, monkeypatch, taken if force else None)
               for force in (False, True)}
    finally:
        handle.remove()
    assert "model.layers.0.mlp.down_proj" not in taken
    assert set(taken) == _linear_names(model) - {"model.layers.0.mlp.down_proj"}
    for split in ("forget", "retain"):
        x, y = getattr(res[False].effects[0], split), getattr(res[True].effects[0], split)
        assert (x - y).abs().max() <= 1e-5 * x.abs().max() + 1e-8, split


def test_layers_reading_one_input_share_its_gram(monkeypatch):
    """A Aᵀ is computed once per input tensor: per block the attention input (q/k/v), the output
    projection's, the MLP input (gate/up) and the down projection's, plus the output projection's.
    The last block's layers see cotangents at the answer-predicting positions only (k/v excepted:
    every key feeds them), and each such layer takes the Gram of its own live positions."""
    model, tok = next((m, t) for k, m, t in models() if k == "tiny-llama")
    made = record_instances(monkeypatch)
    taken: list[str] = []
    profiled(model, tok, "npo+gd", True, monkeypatch, taken)
    assert len(made) == 1 and len(taken) == 7 * len(model.model.layers) + 1
    L = len(model.model.layers)
    assert made[0].input_grams == 4 * (L - 1) + 6 + 1       # last block: q, k/v, o, gate, up, down
    assert not made[0]._gram_a and not made[0]._users       # every shared Gram released


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_padding_changes_nothing_in_gram_form(monkeypatch, kind):
    """Extra padding columns change no per-instance value; the Gram form sums over the positions
    that carry a cotangent only (found once per step, the padding's checked in every layer)."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    monkeypatch.setattr(gramrows, "FORCE", True)
    method = method_of("npo+gd")
    ctx, ref = setup(model, method)
    perturb(model, ref)
    mb = micro_batch(tok, method, tiny_data())
    n, k = len(mb.batch.input_ids), 7
    made = record_instances(monkeypatch)
    res = [Step(model, method, ref, ctx, Engine(model))([b], Due(effects=True, conflicts=True))
           for b in (mb, padded(mb, tok, k))]
    (keep0, _), (keep1, dead1) = (blocks_layout(r) for r in made[:2])
    assert len(dead1) >= n * k and len(keep1) == len(keep0)
    for split in ("forget", "retain"):
        x, y = getattr(res[0].effects[0], split), getattr(res[1].effects[0], split)
        assert (x - y).abs().max() <= 1e-4 * x.abs().max() + 1e-7, split
    for c0, c1 in zip(res[0].conflicts, res[1].conflicts):
        assert c1["cosine"] == pytest.approx(c0["cosine"], abs=1e-4)


def test_positions_are_the_steps_live_set_unless_a_layer_has_more():
    """The first dense layer fixes the step's live positions; a later dense layer gets that shared set
    with its cotangents at the dead positions to be read (the check), and with ``own`` its own live
    set; a sparse layer always its own."""
    rows = object.__new__(gramrows.GramRows)
    rows._shared = {}
    g = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    g[1, 3] = 0                                                    # one dead position (padding)
    idx, shared, check = rows._positions(torch.nn.Linear(5, 3), g, g.reshape(-1, 3))
    assert shared and idx.tolist() == [0, 1, 2, 3, 4, 5, 6] and check is None
    h = g.clone()
    h[0, 2] = 0                                                    # a subset of the live set: shared
    idx, shared, check = rows._positions(torch.nn.Linear(5, 3), h, h.reshape(-1, 3))
    assert shared and idx is rows._shared[8][0] and not bool(check)
    h[1, 3] = 1.0                                                  # live where the step's set is dead
    idx, shared, check = rows._positions(torch.nn.Linear(5, 3), h, h.reshape(-1, 3))
    assert shared and bool(check)                                  # -> taken again with its own
    idx, shared, check = rows._positions(torch.nn.Linear(5, 3), h, h.reshape(-1, 3), own=True)
    assert not shared and idx.tolist() == [0, 1, 3, 4, 5, 6, 7] and check is None
    s = torch.zeros(2, 4, 3)
    s[0, 1] = 1.0                                                  # position-local (1 of 8): its own
    idx, shared, check = rows._positions(torch.nn.Linear(5, 3), s, s.reshape(-1, 3))
    assert not shared and idx.tolist() == [1] and check is None


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2"])
def test_a_layer_live_where_the_shared_set_is_dead_is_taken_with_its_own_positions(monkeypatch, kind):
    """If the step's shared positions miss one where a layer has a cotangent (here: one live position
    moved into the dead set after the first dense layer), that layer is taken again over its own
    positions, and the G-effects still equal the matmul form's."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    positions = gramrows.GramRows._positions
    redone = []

    def tampered(self, mod, g, d, own=False):
        out = positions(self, mod, g, d, own)
        key = max(self._shared, default=None)           # the blocks' layout of positions
        if key is not None and len(self._shared[key][0]) > 1 and not hasattr(self, "_moved"):
            keep, dead = self._shared[key]
            self._moved = keep[0]
            self._shared[key] = keep[1:], torch.cat([dead, keep[:1]])
        redone.append(own)
        return out
    want = profiled(model, tok, "npo+gd", False, monkeypatch)
    monkeypatch.setattr(gramrows.GramRows, "_positions", tampered)
    got = profiled(model, tok, "npo+gd", True, monkeypatch)
    assert any(redone)
    for split in ("forget", "retain"):
        x, y = getattr(want.effects[0], split), getattr(got.effects[0], split)
        assert (x - y).abs().max() <= 1e-5 * x.abs().max() + 1e-8, split


@pytest.mark.parametrize("spec", ["gd", "npo+gd", "idkdpo+gd"])
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gpt2", "tied-llama"])
def test_pairs_taken_with_the_products_equal_the_pairs_path(monkeypatch, kind, spec):
    """Fig. 5b pairs of every layer in Gram form, taken from M with the G-effect products, against
    engine/pairs.py's own (itself against one-instance autograd in test_engine.py)."""
    from geffect.engine.pairs import PairsAccumulator
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    added: list[str] = []
    add = PairsAccumulator.add

    def spy(self, names):
        added.extend(n for n in names if n in self.c.cap.pair_products)
        return add(self, names)
    monkeypatch.setattr(PairsAccumulator, "add", spy)
    due = Due(effects=True, conflicts=True, pairs=True)
    taken: list[str] = []
    res = {force: profiled(model, tok, spec, force, monkeypatch, taken if force else None, due)
           for force in (False, True)}
    assert taken and sorted(added) == sorted(taken)
    for risk in ("unlearn", "retain"):
        x, y = getattr(res[False].pairs[0], risk), getattr(res[True].pairs[0], risk)
        assert (x - y).abs().max() <= 1e-5 * x.abs().max() + 1e-8, risk


@pytest.mark.parametrize("kind", ["tiny-llama", "tied-llama"])
def test_profiled_step_reuses_the_gradient_squares_for_the_same_gradient_norm(monkeypatch, kind):
    """‖∇L‖ of a profiled step (most tensors' ‖.grad‖² taken by the Gram form's check and the conflict
    statistics, reused) equals the plain step's (every gradient read again)."""
    model, tok = next((m, t) for k, m, t in models() if k == kind)
    method = method_of("npo+gd")
    ctx, ref = setup(model, method)
    perturb(model, ref)
    mb = micro_batch(tok, method, tiny_data())
    reused = []
    known = Capture.known_grad_square

    def spy(self, p):
        sq = known(self, p)
        reused.append(sq is not None)
        return sq
    monkeypatch.setattr(Capture, "known_grad_square", spy)
    monkeypatch.setattr(gramrows, "FORCE", True)
    prof = Step(model, method, ref, ctx, Engine(model))([mb], EFFECTS_AND_CONFLICTS)
    plain = Step(model, method, ref, ctx)([mb])
    assert sum(reused) >= len(_linear_names(model)) - 1       # every Linear weight but a tied head's at most
    assert prof.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)


def test_a_gradient_square_is_not_reused_once_the_gradient_changed(tiny):
    """The kept ‖.grad‖² belongs to one gradient tensor at one version: an in-place write to it, or a
    new .grad, makes the capture give nothing."""
    model = tiny.model
    p = next(model.parameters())
    p.grad = torch.ones_like(p)
    cap = Capture(model, {})
    assert cap.grad_square(p).item() == p.numel()
    assert cap.known_grad_square(p).item() == p.numel()
    p.grad.mul_(2)
    assert cap.known_grad_square(p) is None
    assert cap.grad_square(p).item() == 4 * p.numel()
    p.grad = torch.ones_like(p)
    assert cap.known_grad_square(p) is None
    p.grad = None


def test_an_output_projection_dense_in_its_answer_window_gets_a_layout_of_its_own(monkeypatch):
    """The output projection runs on the answer window's N·k positions (``logits_to_keep``), the blocks'
    layers on every row's N·T. Where its cotangents fill most of the window (a dense layer, which takes
    the step's shared live set), that set is kept per layout: no layer is taken twice (a layer given the
    other layout's set would be re-taken over its own positions), every Linear layer takes the Gram form
    and the values equal the matmul form's."""
    from geffect.engine import rules
    model, tok = next((m, t) for k, m, t in models() if k == "tiny-llama")        # untied output projection
    head = model.get_output_embeddings()
    positions, own_calls = gramrows.GramRows._positions, []

    def spy(self, mod, g, d, own=False):
        own_calls.append(own)
        return positions(self, mod, g, d, own)
    made = record_instances(monkeypatch)
    taken: list[str] = []
    rules._DENSE.add(head)                     # as when the answers fill most of the window
    try:
        want = profiled(model, tok, "npo+gd", False, monkeypatch)
        monkeypatch.setattr(gramrows.GramRows, "_positions", spy)
        got = profiled(model, tok, "npo+gd", True, monkeypatch, taken)
    finally:
        rules._DENSE.discard(head)
    assert len(made[-1]._shared) == 2 and own_calls and not any(own_calls)
    assert set(taken) == _linear_names(model)
    for split in ("forget", "retain"):
        x, y = getattr(want.effects[0], split), getattr(got.effects[0], split)
        assert (x - y).abs().max() <= 1e-5 * x.abs().max() + 1e-8, split
    assert_same_conflicts(want.conflicts, got.conflicts)
