"""The G-effect engine: e = ∇Rᵀ∇L (Wang et al. 2025, Definition 1) per layer group and per
instance, from the training step's own forward and backward pass.

Per step: one forward of θ with hooks (the training forward), one backward of the risk
R = Σ_i ℓ_i over the forget and retain rows to the module outputs only (no weight gradients:
autograd skips them), the training backward of L, and per-module inner products with ∇L.

Sign: with θ ← θ − η∇L, ΔR ≈ −η·e. e_u < 0 means the forget risk rises (removal);
e_r ≥ 0 means the retain risk does not rise (retention).

PG-effect (per instance): e_i = ∇ℓ_iᵀ∇L with ℓ_i the mean answer-token NLL of sample i; the
batch G-effect e_u is the mean of the forget PG-effects (R is a mean over samples).

Directions: ``grad`` (the paper's raw ∇L) or ``update``: the optimizer's actual step Δθ, used as
V = −Δθ/η so that ΔR ≈ −η·e keeps its meaning (Adam's preconditioning included).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from geffect.engine.capture import Capture
from geffect.engine.groups import assign_groups, group_names
from geffect.objectives import functional as fn


@dataclass
class ProfileConfig:
    direction: str = field(default="grad", metadata={
        "help": "grad: the raw objective gradient ∇L (paper); update: the optimizer's step −Δθ/lr"})
    resolution: str = field(default="group", metadata={"help": "group (embed/shallow/middle/deep/lm) or block"})
    boundaries: str | None = field(default=None, metadata={
        "help": "block indices b1,b2 splitting shallow|middle|deep (default: thirds)"})
    probe_every: int = field(default=0, metadata={
        "help": "every k steps also measure against the risk over a fixed probe set (whole forget set "
                "and a retain sample); 0 = off"})
    probe_retain: int = field(default=16, metadata={"help": "retain samples in the probe set"})


def parse_boundaries(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        b1, b2 = (int(x) for x in text.split(","))
    except ValueError as err:
        raise ValueError(f"--boundaries must be two integers 'b1,b2', got {text!r}") from err
    return b1, b2


def risk_rows(fo) -> tuple[torch.Tensor, slice, slice]:
    """Per-row risks ℓ_i for the forget and retain rows and their sum R (cotangent 1 per row)."""
    f, r = fo.segments["forget"], fo.segments["retain"]
    ell_f = fn.mean_nll(fo.nll[f], fo.mask[f])
    ell_r = fn.mean_nll(fo.nll[r], fo.mask[r])
    return ell_f.sum() + ell_r.sum(), f, r


class Engine:
    """Owns the group assignment; measures G-effects for captured steps."""

    def __init__(self, model: torch.nn.Module, cfg: ProfileConfig | None = None):
        self.model, self.cfg = model, cfg or ProfileConfig()
        self.assignment = assign_groups(model, parse_boundaries(self.cfg.boundaries), self.cfg.resolution)
        self.groups = group_names(self.assignment)

    def capture(self) -> Capture:
        return Capture(self.model, self.assignment)

    def direction_from_grads(self) -> dict[int, torch.Tensor]:
        return {id(p): p.grad for p in self.model.parameters() if p.grad is not None}

    def measure(self, cap: Capture, segments: dict[str, slice], V: dict[int, torch.Tensor]) -> dict:
        """Per-group, per-instance values for one captured micro-batch.

        Returns {"forget": (n_f, G) tensor, "retain": (n_r, G) tensor} in ``self.groups`` order.
        """
        res = {}
        for split in ("forget", "retain"):
            vals = cap.inner_products(V, segments[split])
            n = segments[split].stop - segments[split].start
            res[split] = torch.stack([vals.get(g, torch.zeros(n)) for g in self.groups], dim=1)
        return res

    def summarise(self, per_instance: dict) -> dict:
        """Batch G-effects: e = mean over the split's instances, per group and total."""
        out = {}
        for risk, split in (("unlearn", "forget"), ("retain", "retain")):
            m = per_instance[split].double().mean(0)
            out[risk] = {g: m[i].item() for i, g in enumerate(self.groups)}
            out[risk]["total"] = m.sum().item()
        return out
