"""Per-token G-effects: e_{i,t} = ∇nll_{i,t}ᵀ V for every answer token at once, by forward-mode AD.

One ``torch.func.jvp`` of the per-token NLL along V (∇L, or the update) gives the directional
derivative of every token's NLL: with θ ← θ − η·V, Δnll_{i,t} ≈ −η·e_{i,t}. The instance's
PG-effect is their mean over its answer tokens (ℓ_i is the mean token NLL), so the tokens show
where in an answer the objective acts. Attention runs on SDPA's math backend here, the one
backend with forward-mode AD on CPU. Where the model takes a boolean ``logits_to_keep`` mask
(transformers' causal LMs), the output projection and the softmax run at the answer-predicting
positions only (about a fifth of a TOFU-style row; the vocabulary projection is a fifth of
SmolLM2's forward).
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from geffect.data.batching import IGNORE
from geffect.forward import positions
from geffect.objectives import functional as fn


def token_effects(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor, V: dict[int, torch.Tensor],
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """e_{i,t} = ⟨∇_θ nll_{i,t}, V⟩ at ``params`` (default: the model's current weights).

    input_ids, attention_mask, labels: (N, T). V maps id(parameter) to its direction (parameters
    without one, e.g. frozen ones, keep their values and have a zero direction). Returns (N, T-1),
    zero off the answer tokens.
    """
    # the forget rows' own length: columns padded in every row (the batch's longer retain rows) are
    # cut off. Right padding, causal attention: no kept position reads them; zeros there, as off the answers
    T = input_ids.shape[1]
    live = attention_mask.bool().any(0).nonzero()
    keep_T = int(live.max()) + 1 if len(live) else T                       # (one host read)
    if keep_T < T:
        input_ids, attention_mask, labels = input_ids[:, :keep_T], attention_mask[:, :keep_T], labels[:, :keep_T]
    named = {k: p for k, p in model.named_parameters() if id(p) in V}     # the directions' parameters only
    primals = {k: (params[k] if params is not None and k in params else p).detach() for k, p in named.items()}
    tangents = {k: V[id(p)].detach().to(p.dtype) for k, p in named.items()}
    pos = positions(input_ids)                                   # (N, T), as in training
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos, "use_cache": False}
    if answer_logits_only(model):
        # the output projection (and the softmax over the vocabulary) only where a token's NLL is read
        following = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # (N, T) next token
        keep = following != IGNORE                                   # (N, T): positions predicting an answer token
        targets = following[keep]                                    # (K,)

        def nll_of(ps):
            logits = functional_call(model, ps, (), kwargs | {"logits_to_keep": keep}).logits   # (K, V)
            return F.cross_entropy(logits.float(), targets, reduction="none")                # (K,)

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, d_sel = jvp(nll_of, (primals,), (tangents,))
        d_nll = torch.zeros(keep.shape, dtype=d_sel.dtype, device=d_sel.device)
        d_nll[keep] = d_sel
        return _pad_to(d_nll[:, :-1], T - 1)                         # (N, T-1)

    def full_nll_of(ps):
        out = functional_call(model, ps, (), kwargs)
        nll, mask = fn.token_nll(out.logits, labels)
        return nll * mask

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, d_nll = jvp(full_nll_of, (primals,), (tangents,))
    return _pad_to(d_nll, T - 1)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """(N, w) -> (N, width) with zero columns on the right (the cut padding columns)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def answer_logits_only(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes a boolean ``logits_to_keep`` mask (transformers' causal LMs
    with ``slice_logits_to_keep``): its logits then come out for the kept positions only."""
    if not FULL_LOGITS_ONLY and "logits_to_keep" in inspect.signature(model.forward).parameters:
        module = sys.modules.get(type(model).__module__)
        return getattr(module, "slice_logits_to_keep", None) is not None
    return False


FULL_LOGITS_ONLY = False     # tests: the full-logits path for every model


@dataclass
class TokenSource:
    """What the per-token records of one micro-batch's forget rows need (no logits kept)."""
    batch: object                # the micro-batch's Batch
    forget: slice                # its forget rows
    nll: torch.Tensor            # (n_f, T-1)
    mask: torch.Tensor           # (n_f, T-1)
    weight: torch.Tensor | None  # (n_f, T-1) token weights of token-weighted objectives
    forget_index: list[int]

    @classmethod
    def of(cls, batch, fo, token_weight: torch.Tensor | None, forget_index: list[int]) -> TokenSource:
        s = fo.segments["forget"]
        tw = token_weight.detach() if token_weight is not None else None
        return cls(batch, s, fo.nll[s].detach(), fo.mask[s], tw, forget_index)

    def effects(self, model, V: dict, params: dict | None = None) -> torch.Tensor:
        """Per-token unlearning G-effects e_{i,t} = ∇nll_{i,t}ᵀV of the forget rows. -> (n_f, T-1)"""
        b, s = self.batch, self.forget
        return token_effects(model, b.input_ids[s], b.attention_mask[s], b.labels[s], V, params)

    def tokens(self, effects: torch.Tensor | None) -> TokenRecords:
        return TokenRecords(self.batch.labels[self.forget, 1:], self.nll, self.mask, self.weight, effects,
                            self.forget_index)


@dataclass
class TokenRecords:
    """Per answer token of a micro-batch's forget rows: id, NLL, weight and (when measured) e_{i,t}."""
    labels: torch.Tensor             # (n_f, T-1) next-token ids
    nll: torch.Tensor                # (n_f, T-1)
    mask: torch.Tensor               # (n_f, T-1)
    weight: torch.Tensor | None      # (n_f, T-1)
    geffect: torch.Tensor | None     # (n_f, T-1)
    forget_index: list[int]
