"""What objectives read (:class:`ForwardOut`), what they return (:class:`Loss`, :class:`Parts`) and
the per-run state some of them need (:class:`ObjectiveContext`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class ObjectiveContext:
    """Per-run state of objectives that need one (RMU: the layer it reads and its control vector)."""
    hidden_layer: int | None = None        # output of block ``hidden_layer`` is read (hidden_states[ℓ + 1])
    control: torch.Tensor | None = None    # (d,) RMU's fixed random direction c·u


class Loss(NamedTuple):
    """One part's value and the weights it applied (detached)."""
    value: torch.Tensor                          # scalar
    instance_weight: torch.Tensor | None = None  # (n_forget,)
    token_weight: torch.Tensor | None = None     # (n_forget, T-1)


@dataclass
class ForwardOut:
    """What objectives read from one forward pass of θ (and the reference values of θ_o)."""
    nll: torch.Tensor                  # (N, T-1) answer-token NLL, 0 elsewhere
    mask: torch.Tensor                 # (N, T-1)
    logits: torch.Tensor | None        # (N, k, V) the last k ≤ T positions (the answer window); None when unread
    labels: torch.Tensor               # (N, T)
    segments: dict[str, slice]
    hidden: torch.Tensor | None = None      # (N, T, d) RMU layer output
    ref_nll: torch.Tensor | None = None     # (N, T-1) under θ_o, on the rows objectives read it (0 elsewhere)
    ref_logits: dict | None = None          # segment -> (n, k, V) under θ_o (KL: the retain rows), same window
    ref_hidden: dict | None = None          # segment -> (n, T, d) (RMU: the retain rows)
    attention: torch.Tensor | None = None   # (N, T) 1 on every real token (prompt and answer), 0 on padding
    # forward run in row chunks (one per objective part): per-chunk views, the chunks' NLL tensors
    # and the permutation putting their rows back in batch order (None: already in order)
    views: list | None = None
    nll_leaves: list | None = None
    row_inv: torch.Tensor | None = None

    def _leaves(self) -> list[torch.Tensor]:
        return self.nll_leaves if self.nll_leaves is not None else [self.nll]

    def nll_grads(self, x: torch.Tensor) -> torch.Tensor | None:
        """∂x/∂nll (N, T-1) in batch row order (None if x does not depend on the NLL). Cheap: the
        backward stops at the per-token NLL, before the (N, T, V) logits."""
        leaves = self._leaves()
        gs = torch.autograd.grad(x, leaves, retain_graph=True, allow_unused=True)
        if all(g is None for g in gs):
            return None
        g = torch.cat([gi if gi is not None else torch.zeros_like(leaf) for gi, leaf in zip(gs, leaves)])
        return g if self.row_inv is None else g[self.row_inv]

    def reads_model_only_through_nll(self, x: torch.Tensor) -> bool:
        """Whether every path of x's autograd graph back to the parameters passes through the
        per-token NLL (no direct read of logits or hidden states). Walks the graph above the NLL."""
        stop = {leaf.grad_fn for leaf in self._leaves()}
        seen, todo = set(), [x.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in stop:
                continue
            if type(node).__name__ == "AccumulateGrad":   # reached a parameter another way
                return False
            seen.add(node)
            todo.extend(nxt for nxt, _ in node.next_functions)
        return True

    def seg(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, mask) of one segment's rows, each (n, T-1)."""
        s = self.segments[name]
        return self.nll[s], self.mask[s]

    def text_mask(self, name: str) -> torch.Tensor:
        """Every real token of a segment's rows (prompt and answer; not padding), as WMDP's RMU reads. (n, T)"""
        return self.attention[self.segments[name]].to(self.mask.dtype)

    def token_mask(self, name: str) -> torch.Tensor:
        """Answer-token mask of a segment aligned with hidden states (position t predicts token t+1). (n, T)"""
        s = self.segments[name]
        m = torch.zeros(self.labels[s].shape, dtype=self.mask.dtype, device=self.mask.device)
        m[:, :-1] = self.mask[s]
        return m


@dataclass
class Parts:
    """The parts of a method's objective for one batch."""
    forget: torch.Tensor                    # L_f (scalar, unweighted)
    retain: torch.Tensor | None             # L_r (scalar, unweighted) or None
    total: torch.Tensor                     # γ·L_f + α·L_r
    instance_weight: torch.Tensor | None = None  # (n_forget,)
    token_weight: torch.Tensor | None = None     # (n_forget, T-1)

    def instance_weights(self) -> torch.Tensor | None:
        """Per forget instance: the NPO-family weight, or the mean token weight over answer tokens."""
        if self.instance_weight is not None:
            return self.instance_weight.detach()
        if self.token_weight is not None:
            tw = self.token_weight.detach()
            return tw.sum(-1) / (tw > 0).sum(-1).clamp_min(1)
        return None

    def weight_values(self) -> torch.Tensor | None:
        """The weights this batch applied, flat: per instance, or per answer token (> 0)."""
        if self.instance_weight is not None:
            return self.instance_weight.detach().flatten()
        if self.token_weight is not None:
            tw = self.token_weight.detach()
            return tw[tw > 0] if (tw > 0).any() else tw.flatten()
        return None
