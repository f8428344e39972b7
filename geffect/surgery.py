"""PCGrad gradient surgery (Yu et al., NeurIPS 2020) and conflict statistics (REFERENCE.md §3).

The two tasks of an unlearning objective are its minimised parts: g_f = ∇(γ·L_f), g_r = ∇(α·L_r).
For each task i, over the other tasks j in random order: if g_iᵀg_j < 0, g_i ← g_i − (g_iᵀg_j/‖g_j‖²)·g_j,
always projecting onto the *original* g_j; the update is the sum of the projected gradients.

Scopes: ``global`` flattens every parameter into one vector (the reference behaviour); ``group``
projects within each layer group, ``tensor`` within each parameter tensor (different algorithms,
offered by name). Dot products are taken in float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from geffect.config import SCOPES
from geffect.engine.groups import GROUPS


def project(grads: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The projected task gradients g_i^PC (Yu et al. 2020, Alg. 1), in float64, flattened."""
    if len(grads) == 0:
        raise ValueError("pcgrad needs at least one gradient")
    orig = [g.reshape(-1).double() for g in grads]
    if any(g.shape != orig[0].shape for g in orig):
        raise ValueError("pcgrad: all gradients must have the same number of elements")
    out = []
    for i, gi in enumerate(orig):
        g = gi.clone()
        others = [j for j in range(len(orig)) if j != i]
        for k in torch.randperm(len(others), generator=generator).tolist():
            gj = orig[others[k]]   # always the original g_j
            dot = torch.dot(g, gj)
            if dot < 0:
                g = g - dot / torch.dot(gj, gj).clamp_min(1e-300) * gj
        out.append(g)
    return out


def pcgrad(grads: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """The PCGrad update for flat task gradients g_1..g_k: Σ_i g_i^PC (original code's sum)."""
    total = torch.stack(project(grads, generator)).sum(0)
    return total.to(grads[0].dtype).reshape(grads[0].shape)


def conflict_stats(g1: torch.Tensor, g2: torch.Tensor) -> dict[str, float]:
    """cosine(g1, g2), magnitude similarity Φ = 2‖g1‖‖g2‖/(‖g1‖²+‖g2‖²), conflict = cosine < 0."""
    a, b = g1.reshape(-1).double(), g2.reshape(-1).double()
    return stats_from_scalars(torch.dot(a, b).item(), torch.dot(a, a).item(), torch.dot(b, b).item())


def stats_from_scalars(dot: float, sq1: float, sq2: float) -> dict[str, float]:
    """Conflict statistics of two vectors from ⟨g1,g2⟩, ‖g1‖², ‖g2‖² (so scopes can be summed).

    ``removed_norm`` is ‖(g1+g2) − PCGrad(g1,g2)‖: with two tasks, on conflict,
    g1' = g1 − (d/‖g2‖²)g2 and g2' = g2 − (d/‖g1‖²)g1, so the removed part is
    a·g2 + b·g1 with a = d/‖g2‖², b = d/‖g1‖².
    """
    n1, n2 = math.sqrt(max(sq1, 0.0)), math.sqrt(max(sq2, 0.0))
    cos = dot / (n1 * n2) if n1 > 0 and n2 > 0 else float("nan")
    phi = 2 * n1 * n2 / (sq1 + sq2) if sq1 + sq2 > 0 else float("nan")
    removed = 0.0
    if dot < 0 and sq1 > 0 and sq2 > 0:
        a, b = dot / sq2, dot / sq1
        removed = math.sqrt(max(a * a * sq2 + b * b * sq1 + 2 * a * b * dot, 0.0))
    return {"cosine": cos, "magnitude_similarity": phi, "conflict": bool(dot < 0), "dot": dot,
            "norm_forget": n1, "norm_retain": n2, "removed_norm": removed}


def param_groups(model: torch.nn.Module, assignment: dict[str, str]) -> dict[int, str]:
    """id(parameter) -> layer group. A tied tensor has one gradient; it is reported under the group
    of its last owning module (``lm`` for tied input/output embeddings)."""
    out = {}
    for name, group in assignment.items():
        for p in model.get_submodule(name)._parameters.values():
            if p is not None:
                out[id(p)] = group
    return out


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _dots(gf: dict[int, torch.Tensor], gr: dict[int, torch.Tensor], ids) -> dict[int, tuple[float, float, float]]:
    """Per tensor: (⟨g_f,g_r⟩, ‖g_f‖², ‖g_r‖²) as Python floats; a missing part gradient is zero.
    float32 tensors are dotted in float32 (blocked summation; REFERENCE §3 allows float32 or wider)
    without a float64 copy of every gradient; the sums over tensors are float64."""
    res = {}
    for i in ids:   # lower-precision gradients (bf16, fp16) are dotted in float32
        a = _f32(gf[i].reshape(-1)) if i in gf else None
        b = _f32(gr[i].reshape(-1)) if i in gr else None
        res[i] = (torch.dot(a, b).item() if a is not None and b is not None else 0.0,
                  torch.dot(a, a).item() if a is not None else 0.0,
                  torch.dot(b, b).item() if b is not None else 0.0)
    return res


def plan(per_tensor: dict[int, tuple[float, float, float]], groups: dict[int, str], scope: str = "global",
         apply: bool = True) -> tuple[list[dict], dict[int, tuple[float, float]]]:
    """Conflict statistics and PCGrad coefficients from per-tensor scalars (⟨g_f,g_r⟩, ‖g_f‖², ‖g_r‖²).

    Returns (stat rows for ``global`` and every group, {id: (c_f, c_r)}): the update is
    c_f·g_f + c_r·g_r per tensor. On conflict at the tensor's scope (with ``apply``), two-task PCGrad
    gives g_f' + g_r' = (1 − d/‖g_f‖²)·g_f + (1 − d/‖g_r‖²)·g_r (order-free), else c_f = c_r = 1.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown --pcgrad-scope {scope!r}; choose one of {', '.join(SCOPES)}")
    # the model's parameter order (sums in a fixed order, whichever order the scalars were taken in)
    position = {pid: k for k, pid in enumerate(groups)}
    ids = sorted(per_tensor, key=lambda i: position.get(i, len(position)))

    def total(keys):
        s = [per_tensor[i] for i in keys]
        return tuple(sum(x[k] for x in s) for k in range(3))

    by_group: dict[str, list[int]] = {}
    for i in ids:
        by_group.setdefault(groups.get(i, "other"), []).append(i)
    rank = {g: k for k, g in enumerate(GROUPS)}
    scalars = {"global": total(ids)} | {g: total(by_group[g]) for g in sorted(by_group, key=lambda g: rank.get(g, 99))}
    rows = [{"group": g, **stats_from_scalars(*s)} for g, s in scalars.items()]
    for row in rows:
        row["pcgrad_applied"] = bool(apply and row["conflict"] and (scope == "global" and row["group"] == "global"
                                                                    or scope == "group" and row["group"] != "global"))
    at_scope = {"global": lambda i: scalars["global"], "group": lambda i: scalars[groups.get(i, "other")],
                "tensor": lambda i: per_tensor[i]}[scope]
    coef = {}
    for i in ids:
        dot, sf, sr = at_scope(i)
        coef[i] = (1 - dot / sf, 1 - dot / sr) if apply and dot < 0 and sf > 0 and sr > 0 else (1.0, 1.0)
    return rows, coef


def combine(gf: dict[int, torch.Tensor], gr: dict[int, torch.Tensor], groups: dict[int, str],
            scope: str = "global", apply: bool = True,
            inplace: bool = False) -> tuple[dict[int, torch.Tensor], list[dict]]:
    """The update from the two part gradients given in full, and the conflict statistics.

    ``gf``/``gr`` map id(parameter) to ∇(γ·L_f) and ∇(α·L_r). Returns (update per parameter,
    stat rows for ``global`` and every group). With ``apply`` the update is PCGrad at ``scope``,
    else g_f + g_r. Equivalent to :func:`pcgrad` on the flattened vectors of each scope.
    ``inplace`` builds the update in the g_f tensors (no new allocation; g_f is consumed). The
    training step obtains the same from one backward (:mod:`geffect.engine.parts`).
    """
    ids = list(dict.fromkeys([*gf, *gr]))
    rows, coef = plan(_dots(gf, gr, ids), groups, scope, apply)
    update = {}
    for i in ids:
        f, r = gf.get(i), gr.get(i)
        if f is None or r is None:
            update[i] = f if r is None else r
            continue
        cf, cr = coef[i]
        update[i] = (f * cf).add_(r, alpha=cr) if not inplace else f.mul_(cf).add_(r, alpha=cr)
    return update, rows
