"""Per-token G-effects: e_{i,t} = ∇nll_{i,t}ᵀ V for every answer token at once, by forward-mode AD.

One ``torch.func.jvp`` of the per-token NLL along V (∇L, or the update) gives the directional
derivative of every token's NLL: with θ ← θ − η·V, Δnll_{i,t} ≈ −η·e_{i,t}. The instance's
PG-effect is their mean over its answer tokens (ℓ_i is the mean token NLL), so the tokens show
where in an answer the objective acts. Attention runs on SDPA's math backend here, the one
backend with forward-mode AD on CPU.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from geffect.objectives import functional as fn


def token_effects(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor, V: dict[int, torch.Tensor],
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """e_{i,t} = ⟨∇_θ nll_{i,t}, V⟩ at ``params`` (default: the model's current weights).

    input_ids, attention_mask, labels: (N, T). V maps id(parameter) to its direction (missing
    parameters have a zero direction). Returns (N, T-1), zero off the answer tokens.
    """
    named = dict(model.named_parameters())
    primals = {k: (params[k] if params is not None and k in params else p).detach() for k, p in named.items()}
    tangents = {k: V[id(p)].detach() if id(p) in V else torch.zeros_like(p) for k, p in named.items()}
    pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)   # (N, T), as in training

    def nll_of(ps):
        out = functional_call(model, ps, (), {"input_ids": input_ids, "attention_mask": attention_mask,
                                              "position_ids": pos, "use_cache": False})
        nll, mask = fn.token_nll(out.logits, labels)
        return nll * mask

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, d_nll = jvp(nll_of, (primals,), (tangents,))
    return d_nll
