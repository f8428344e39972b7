"""A normalisation layer's per-row gradients, its G-effect products and its parts' statistics at once.

On the engine's reuse path (the captured cotangents are the training ones, one forward over every
row) an RMSNorm's weight gradient is a sum of its rows' own, each a d-vector:

    ∇L_w = G = Σ_n r_n,   r_n = Σ_{t∈n} δ_t ⊙ x̂_t      (LayerNorm: and Σ_{t∈n} δ_t for the bias)

so the per-row products of :func:`geffect.engine.rules.rmsnorm_rule` are p_n = ⟨r_n, G⟩ and the
two parts' gradients (forget = every row outside the retain segment, :mod:`geffect.engine.parts`)
are sums of the same rows: ⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖² need no second pass over the captured
tensors (the formed path recomputes x̂ and the forget part's gradient per tensor, many small kernels
for a d-vector). Each layer checks its identity, Σ_n r_n = ``.grad`` (to
:data:`~geffect.engine.gramrows.TOL` of ‖.grad‖), and is otherwise left to the rule and the formed path.
"""
from __future__ import annotations

import torch

from geffect.engine.capture import Capture
from geffect.engine.gramrows import _FAST_DTYPES, TOL
from geffect.engine.rules import _RMS

_NORMS = (torch.nn.LayerNorm,) + ((_RMS,) if _RMS is not None else ())


def row_grads(mod: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row's gradient of the norm's parameters: x, g (N, T, d) -> {name: (N, d) float32}, as
    :func:`~geffect.engine.rules.rmsnorm_rule` and ``layernorm_rule`` read them."""
    xf, gf = x.float(), g.float()
    if isinstance(mod, torch.nn.LayerNorm):
        xhat = torch.nn.functional.layer_norm(xf, mod.normalized_shape, eps=mod.eps)
    else:
        xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).to(x.dtype).float()
    out = {"weight": (gf * xhat).sum(1)}                                     # (N, d)
    if getattr(mod, "bias", None) is not None:
        out["bias"] = gf.sum(1)
    return out


def take(cap: Capture, names: list[str], products: dict[str, torch.Tensor], span: slice, retain: slice,
         stats: bool) -> list[str]:
    """Per-row products (over ``span``'s rows, unscaled training cotangents as
    :meth:`Capture.inner_products` gives them) of the normalisation layers among ``names`` into
    ``products``, with ``stats`` their parts' statistics into ``cap.part_stats``; returns the layers taken."""
    done = []
    for n in names:
        mod, recs = cap.modules[n], cap.seen.get(n, [])
        if not isinstance(mod, _NORMS) or cap.row_scale is None or len(recs) != 1:
            continue
        rec = recs[0]
        params = {pn: p for pn, p in mod._parameters.items() if p is not None and p.requires_grad}
        if (rec.rows is not None or rec.grad is None or rec.train is not rec.grad or not params
                or span.stop > rec.grad.shape[0] or not rec.inputs or not torch.is_tensor(rec.inputs[0]) or rec.grad.dim() != 3
                or any(p.grad is None or p.dtype not in _FAST_DTYPES or cap._owners.get(id(p)) != [n]
                       for p in params.values())):
            continue
        with torch.no_grad():
            rows = row_grads(mod, rec.inputs[0], rec.grad)                  # {name: (N, d)}
            if set(rows) != set(params):
                continue
            G = {pn: params[pn].grad.float() for pn in params}
            # the identity check, the products and the statistics in one host transfer
            checks = [t for pn in params for t in ((rows[pn].sum(0) - G[pn]).square().sum(), G[pn].square().sum())]
            p = sum(rows[pn][span] @ G[pn] for pn in params)                # (n_span,)
            parts = []
            if stats:
                N = rows["weight"].shape[0]
                f = torch.ones(N, dtype=torch.bool, device=p.device)
                f[retain] = False
                for pn in params:
                    gf, gr = rows[pn][f].sum(0).double(), rows[pn][retain].sum(0).double()
                    parts.append(torch.stack([gf @ gr, gf @ gf, gr @ gr]))
            got = torch.cat([torch.stack(checks).double()] + parts).tolist()
        if not all(got[2 * i] <= (TOL ** 2) * got[2 * i + 1] for i in range(len(params))):
            continue
        products[n] = p
        if stats:
            flat = got[2 * len(params):]
            cap.part_stats |= {id(params[pn]): tuple(flat[3 * i:3 * i + 3]) for i, pn in enumerate(params)}
        done.append(n)
    return done
