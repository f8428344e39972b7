"""Group-only G-effects of GA and GD from three dot products per tensor (``--no-instances``).

When every part of L weights the NLL uniformly (GA: L_f = −R_u; GD adds L_r = R_r), each part's
gradient is a constant multiple of its risk's: with per-row factors c_i = ∂L/∂ℓ_i (all equal on a
split, checked at the NLL), g_f = Σ_{i∈forget} c_i∇ℓ_i = c_f·n_f·∇R_u and g_r = c_r·n_r·∇R_r. The
training backward gives per tensor ⟨g_f, g_r⟩, ‖g_f‖², ‖g_r‖²: in one pass, its Linear layers'
weight gradients formed as their two parts (:mod:`geffect.engine.partsform`), or in two passes
over the two parts' forward chunks (:class:`~geffect.engine.parts.TwoPassDots`, where a Linear
weight is shared otherwise); and along V = ∇L = g_f + g_r (Wang et al. 2025, Definition 1)

    e_u = ∇R_uᵀ∇L = (‖g_f‖² + ⟨g_f, g_r⟩) / (c_f·n_f),   e_r = ∇R_rᵀ∇L = (⟨g_f, g_r⟩ + ‖g_r‖²) / (c_r·n_r).

GA alone has no retain part: the backward also carries the retain risk (X = n_r·∇R_r, one pass:
kept out of ``.grad`` by the parts form; two passes: its own backward over the retain rows first,
dropped from ``.grad`` as the loss's gradient Y = g_f arrives), so e_u = ‖Y‖²/(c_f·n_f) and
e_r = ⟨X, Y⟩/n_r.

Summed per layer group, tensor by tensor. A tensor tied between the embedding and the output
projection is split by use as the per-instance engine splits it: the embedding's share comes from
its captured output cotangents (:func:`~geffect.engine.rules.embedding_rule`, cheap), the rest is
the output projection's.
"""
from __future__ import annotations

import torch

from geffect.engine.capture import Capture
from geffect.engine.engine import Effects, proportional, risk_rows


def owners(model: torch.nn.Module, assignment: dict[str, str]) -> dict[int, list[str]]:
    """id(trainable parameter) -> the modules (of ``assignment``) that own it."""
    out: dict[int, list[str]] = {}
    for name in assignment:
        for p in model.get_submodule(name)._parameters.values():
            if p is not None and p.requires_grad:
                out.setdefault(id(p), []).append(name)
    return out


def tied_embeddings(model: torch.nn.Module, assignment: dict[str, str]) -> list[str] | None:
    """The Embedding modules whose weight another module also owns (tied embeddings); None when a
    tensor is shared in a way the split by use does not cover (then no group-only path)."""
    out = []
    for names in owners(model, assignment).values():
        if len(names) == 1:
            continue
        emb = [n for n in names if isinstance(model.get_submodule(n), torch.nn.Embedding)]
        if len(names) != 2 or len(emb) != 1:
            return None
        out.append(emb[0])
    return out


def split_factors(fo, loss: torch.Tensor, retain_in_loss: bool, rtol: float = 1e-4) -> tuple[float, float]:
    """(c_f, c_r): the factor ∂L/∂ℓ_i shared by every forget row and by every retain row (1.0 when L
    does not read the retain rows), from the gradients at the per-token NLL (cheap). Raises when a
    split's rows do not share one factor: the identity above would not hold."""
    R, f, r = risk_rows(fo)
    gL, gR = fo.nll_grads(loss), fo.nll_grads(R)          # (N, T-1) each
    if gL is None:
        raise RuntimeError("group-only G-effects: the loss does not depend on the NLL")
    gL, gR = gL * fo.mask, gR * fo.mask
    out = []
    for rows, needed in ((f, True), (r, retain_in_loss)):
        if not needed:
            out.append(1.0)
            continue
        c = proportional(gL[rows], gR[rows])
        if c is None or (c - c.mean()).abs().max() > rtol * c.mean().abs():
            raise RuntimeError("group-only G-effects need the objective's gradient to weight every row of a split "
                               "equally (GA, GD); this step's does not: profile with per-instance values")
        out.append(c.mean().item())
    return out[0], out[1]


def group_effects(model: torch.nn.Module, assignment: dict[str, str], groups: list[str],
                  dots: dict[int, tuple[float, float, float]], keep_first: bool, c_f: float, c_r: float,
                  segments: dict[str, slice], tied: Capture | None) -> Effects:
    """The batch's e_u and e_r per group from the per-tensor dot products (see the module docstring);
    ``tied``: the capture of the tied embeddings' outputs (training cotangents), released here."""
    f, r = segments["forget"], segments["retain"]
    n_f, n_r = f.stop - f.start, r.stop - r.start
    sums = {risk: dict.fromkeys(groups, 0.0) for risk in ("unlearn", "retain")}
    owned = owners(model, assignment)
    for pid, (xy, xx, yy) in dots.items():
        if keep_first:            # X = g_f, Y = g_r, V = X + Y
            eu, er = (xx + xy) / (c_f * n_f), (xy + yy) / (c_r * n_r)
        else:                     # X = n_r·∇R_r, Y = g_f = V
            eu, er = yy / (c_f * n_f), xy / n_r
        names = owned.get(pid, [])
        if not names:
            continue
        if len(names) > 1:        # tied: the embedding's share from its own use, the rest to the other owner
            emb = next(n for n in names if isinstance(model.get_submodule(n), torch.nn.Embedding))
            share = _embedding_share(model, emb, tied, segments, c_f, c_r, n_f, n_r)
            sums["unlearn"][assignment[emb]] += share[0]
            sums["retain"][assignment[emb]] += share[1]
            eu, er = eu - share[0], er - share[1]
            names = [n for n in names if n != emb]
        sums["unlearn"][assignment[names[0]]] += eu
        sums["retain"][assignment[names[0]]] += er
    if tied is not None:
        tied.release()
    means = {risk: d | {"total": sum(d.values())} for risk, d in sums.items()}
    G = len(groups)
    return Effects("batch", "grad", list(groups), torch.zeros(0, G), torch.zeros(0, G), [], [], None, means)


def _embedding_share(model, name: str, tied: Capture, segments: dict[str, slice], c_f: float, c_r: float,
                     n_f: int, n_r: int) -> tuple[float, float]:
    """(e_u, e_r) of the embedding's use of a tied tensor: its per-row products against ``.grad``
    (the captured cotangents are the parts' c_i·∇ℓ_i), summed per split and divided by c·n."""
    mod = model.get_submodule(name)
    V = {id(mod.weight): mod.weight.grad}
    f, r = segments["forget"], segments["retain"]
    span = slice(min(f.start, r.start), max(f.stop, r.stop))
    vals = tied.inner_products(V, span, [name])
    row = next(iter(vals.values())) if vals else torch.zeros(span.stop - span.start, device=mod.weight.device)
    row = row.double()
    eu = row[f.start - span.start:f.stop - span.start].sum().item() / (c_f * n_f)
    er = row[r.start - span.start:r.stop - span.start].sum().item() / (c_r * n_r)
    return eu, er
