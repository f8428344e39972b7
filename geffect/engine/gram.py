"""The two parts' statistics of a Linear layer without forming the forget part's gradient g_f.

For a Linear layer with inputs a_t and training cotangents δ_t, a part's gradient is
g_X = Σ_{t∈X} δ_t a_tᵀ over the positions of its rows (forget or retain; :mod:`parts`). The
conflict statistics need, per tensor, only ⟨g_f, g_r⟩, ‖g_f‖² and ‖g_r‖², with g = g_f + g_r = ∇L
in ``.grad``. Forming one part X and letting Y = g − X:

    ⟨g_X, g⟩  = Σ_{i∈X} p_i, with p_i = Σ_t δ_{i,t}ᵀ g a_{i,t} the per-row products the engine
                has just taken along ``.grad`` for the G-effects (streamed; no extra work),
    ‖g_X‖²    = Σ_{t,s∈X} (δ_t·δ_s)(a_t·a_s)   (Gram form: K²(d_in + d_out) multiply-adds for K
                positions instead of K·d_in·d_out to form g_X; formed when that is cheaper),
    ⟨g_X, g_Y⟩ = ⟨g_X, g⟩ − ‖g_X‖²,   ‖g_Y‖² = ‖g‖² − 2⟨g_X, g⟩ + ‖g_X‖².

The last difference cancels when Y is small against X: on the default run (NPO+GD near θ_o) the
retain part's gradient is about 1/30 of the forget part's in every layer, and ‖g_r‖² by
differencing g_f's terms would keep about two significant digits. So X is the part less aligned
with g (smaller |⟨g_X, g⟩|, known from the products before anything is formed), Y carries most of
g, and ‖g_Y‖² is kept only when it is at least 1 % of the terms it is taken from (else g_f is
formed for that module, as in :func:`geffect.engine.parts.part_scalars`). The Gram sum is kept
only when it is at least 0.1 % of its terms' magnitudes (else g_X is formed).

An output projection tied to the input embedding adds the embedding's rows to the same tensor:
g_X = H_X + E_X with H_X the projection's term and E_X = Σ_{s∈X} onehot(id_s) e_sᵀ, kept compact
as one row per distinct token id (U rows): ‖g_X‖² = ‖H_X‖² + 2⟨H_X, E_X⟩ + ‖E_X‖² with
⟨H_X, E_X⟩ = Σ_{t,u} δ_t[id_u] (a_t·E_u).

Conditions: the captured cotangents are the training ones (the engine's reuse path), X = forget
only when the forget part reads the forget rows alone (no idk or mismatch rows), and the tensors
are float32 or float64 (in half precision the per-row products carry bf16 rounding).
"""
from __future__ import annotations

import torch

from geffect.engine.capture import Capture, squared_norm
from geffect.engine.engine import Captured
from geffect.engine.gramrows import _FAST_DTYPES, embedding_rows
from geffect.engine.parts import part_scalars
from geffect.engine.rules import live_positions

CANCEL_SQ = 1e-2          # ‖Y‖² by differencing: at least this share of |terms|, else g_f is formed
CANCEL_GRAM = 1e-3        # Gram-form ‖g_X‖²: at least this share of Σ|terms|, else g_X is formed
FORCE: bool | None = None  # tests: the Gram form always (True) or never (False); None: where cheaper


def use_gram(gram_cost: int, formed_cost: int) -> bool:
    """Whether to take a sum in Gram form (its multiply-adds against forming the gradient's)."""
    return FORCE if FORCE is not None else gram_cost < formed_cost


def streamed_part_scalars(model: torch.nn.Module, names: list[str], cap: Capture, segments: dict[str, slice],
                          products: dict[str, torch.Tensor], span: slice) -> dict[int, tuple[float, float, float]]:
    """Per tensor (⟨g_f, g_r⟩, ‖g_f‖², ‖g_r‖²) of the modules ``names`` whose gradients the backward
    has just completed: those already taken with their products (``cap.part_stats``, see
    :mod:`geffect.engine.gramrows`), bias-free Linear layers (and a tied embedding with its output projection)
    from the identities above, every other module (and any that would cancel) from g_f formed as in
    :func:`geffect.engine.parts.part_scalars`. ``products``: each module's per-row products along
    its ``.grad`` over the rows ``span`` (training cotangents, see Engine.backward)."""
    out: dict[int, tuple[float, float, float]] = {}
    rest = set(names)
    for n in names:                      # taken with the products (gramrows)
        ps = [p for p in cap.modules[n]._parameters.values() if p is not None and p.grad is not None]
        if ps and all(id(p) in cap.part_stats for p in ps):
            out |= {id(p): cap.part_stats.pop(id(p)) for p in ps}
            rest.discard(n)
    if cap.row_scale is not None:        # reuse path: the captured cotangents are the training ones
        rows = {"retain": segments["retain"]}
        if set(segments) == {"forget", "retain"}:     # the forget part reads the forget rows alone
            rows["forget"] = segments["forget"]
        for unit in _units(model, [n for n in names if n in rest], cap):
            if not all(n in products and _records_eligible(cap, n) for n in unit):
                continue
            dots = {part: sum(products[n][s.start - span.start:s.stop - span.start].double().sum() for n in unit)
                    for part, s in rows.items()}
            weight = cap.modules[unit[0]].weight
            with torch.no_grad():
                stats = _unit_scalars(cap, unit, rows, dots, weight)
            if stats is not None:
                out[id(weight)] = stats
                rest -= set(unit)
    if rest:
        held = [n for n in names if n in rest]
        out |= part_scalars(model, {n: cap.assignment[n] for n in held}, [Captured(cap, segments, [], [])])
    return out


def _records_eligible(cap: Capture, name: str) -> bool:
    """One forward over every row, its training cotangents captured (float32 or float64)."""
    recs = cap.seen.get(name, [])
    return len(recs) == 1 and all(r.rows is None and r.grad is not None and r.train is r.grad
                                  and r.grad.dtype in _FAST_DTYPES for r in recs)


def _units(model, names: list[str], cap: Capture) -> list[tuple[str, ...]]:
    """(linear,) for a bias-free Linear owning its weight alone; (linear, embedding) for an output
    projection whose weight is the input embedding's, both among ``names``."""
    units = []
    for n in names:
        mod = cap.modules[n]
        if not isinstance(mod, torch.nn.Linear) or not mod.weight.requires_grad or mod.weight.grad is None:
            continue
        if (mod.bias is not None and mod.bias.requires_grad) or mod.weight.dtype not in _FAST_DTYPES:
            continue
        owners = cap._owners.get(id(mod.weight), [])
        if owners == [n]:
            units.append((n,))
        elif len(owners) == 2:
            other = owners[0] if owners[1] == n else owners[1]
            emb = cap.modules.get(other)
            if isinstance(emb, torch.nn.Embedding) and other in names and other != n:
                units.append((n, other))
    return units


def _unit_scalars(cap: Capture, unit: tuple[str, ...], rows: dict[str, slice], dots: dict[str, torch.Tensor],
                  weight: torch.nn.Parameter) -> tuple[float, float, float] | None:
    """(⟨g_f, g_r⟩, ‖g_f‖², ‖g_r‖²) of one unit's weight, or None where the difference would cancel.
    The part formed (X) is the one less aligned with g (smaller |⟨g_X, g⟩|): the other, Y = g − X,
    then carries most of g and ‖Y‖² = ‖g‖² − 2⟨g_X, g⟩ + ‖g_X‖² does not cancel."""
    parts = list(dots)
    x = parts[int(torch.stack([dots[k].abs() for k in parts]).argmin())]     # (one host transfer)
    a, d = _positions(cap, unit[0], rows[x])                         # (K, in), (K, out)
    sq_x = _outer_sum_sq(d, a)
    if len(unit) == 2:                                                # + the tied embedding's rows
        ids, E = embedding_rows(cap, unit[1], rows[x])               # (U,), (U, in)
        cross = (d[:, ids].to(E.dtype) * (a.to(E.dtype) @ E.T)).sum()  # ⟨H_X, E_X⟩
        sq_x = sq_x + 2 * cross.double() + squared_norm(E)
    sq_g, dot_xg = cap.grad_square(weight), dots[x]
    sq_y = sq_g - 2 * dot_xg + sq_x
    dot_xy, sq_x, sq_y, terms = torch.stack([dot_xg - sq_x, sq_x, sq_y, sq_g + 2 * dot_xg.abs() + sq_x]).tolist()
    if sq_y < CANCEL_SQ * terms:
        return None
    return (dot_xy, sq_x, sq_y) if x == "forget" else (dot_xy, sq_y, sq_x)


def _positions(cap: Capture, name: str, f: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``f``'s inputs and training cotangents at the positions that carry one (the output
    projection sees only the answer tokens' loss; a module the linear rule found dense keeps every
    position). -> (K, in), (K, out), views where every position is kept"""
    rec = cap.seen[name][0]
    x, g = rec.inputs[0][f], rec.grad[f]                                # (N_X, T, in), (N_X, T, out)
    a, d = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    idx = live_positions(cap.modules[name], g)
    if idx is not None:
        a, d = a[idx], d[idx]
    return a, d


def _outer_sum_sq(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖Σ_t d_t a_tᵀ‖² in float64: the Gram form where it is cheaper, else the formed product."""
    K, d_out, d_in = d.shape[0], d.shape[1], a.shape[1]
    if use_gram(K * K * (d_in + d_out), K * d_in * d_out):
        P = (d @ d.T) * (a @ a.T)                                      # (K, K) (δ_t·δ_s)(a_t·a_s)
        s = P.double().sum()
        if s >= CANCEL_GRAM * P.abs().double().sum():
            return s
    return squared_norm(d.T @ a)
