"""Unlearning methods: a forget objective plus an optional retain regulariser, optionally with PCGrad.

``--method`` names a forget objective optionally followed by a retain regulariser:
``npo+gd``, ``npo+kl``, ``wga+kl``; ``gd`` alone means GradDiff (= ``ga+gd``); a trailing ``+pcgrad``
applies PCGrad to the two parts' gradients (``gd+pcgrad``, ``idkdpo+gd+pcgrad``). The total minimised
objective is γ·L_f + α·L_r (REFERENCE.md §2). Everything a method needs is derived from its
entries in :mod:`registry`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from geffect.config import Hyper
from geffect.errors import MethodError
from geffect.objectives.inputs import ForwardOut, ObjectiveContext, Parts
from geffect.objectives.registry import RETAIN, Objective, forget_objective, retain_regulariser


@dataclass(frozen=True)
class Method:
    forget: str
    retain: str | None     # a user-named retain regulariser (None: none, or the objective's own)
    hyper: Hyper
    pcgrad: bool = False   # PCGrad surgery on the forget and retain parts' gradients (``+pcgrad``)

    @property
    def forget_entry(self) -> Objective:
        return forget_objective(self.forget)

    @property
    def retain_entry(self) -> Objective | None:
        own = self.forget_entry.own_retain
        if own is not None:
            return RETAIN[own]
        return RETAIN[self.retain] if self.retain is not None else None

    @property
    def entries(self) -> list[Objective]:
        return [self.forget_entry] + ([self.retain_entry] if self.retain_entry else [])

    @property
    def name(self) -> str:
        f = self.forget_entry
        base = self.forget if f.own_retain or self.retain is None else f"{self.forget}+{self.retain}"
        return base + ("+pcgrad" if self.pcgrad else "")

    @property
    def has_retain_part(self) -> bool:
        """Two tasks (forget and retain parts) for PCGrad and conflict statistics."""
        return self.retain_entry is not None

    @property
    def segments(self) -> tuple[str, ...]:
        return ("forget", "retain") + self.forget_entry.segments

    @property
    def needs_ref(self) -> bool:
        return any(e.reference is not None for e in self.entries)

    @property
    def needs_ref_logits(self) -> bool:
        return any(e.reference == "logits" or e.reads == "logits" for e in self.entries)

    def reference_rows(self, kind: str) -> tuple[str, ...]:
        """The segments whose θ_o values of ``kind`` (nll, logits, hidden) the method reads."""
        return tuple(dict.fromkeys(s for e in self.entries if e.reference == kind for s in e.rows))

    @property
    def needs_hidden(self) -> bool:
        return any(e.reads == "hidden" for e in self.entries)

    @property
    def weighting(self) -> str | None:
        """How the forget objective weights the NLL: uniform, instance, token (or None)."""
        return self.forget_entry.weighting

    @property
    def group_only_candidate(self) -> bool:
        """Whether each part's gradient is a constant multiple of its risk's (GA, GD: every part a
        uniform mean of the NLL over forget or retain rows only), so that the group G-effects follow
        from per-tensor dot products (:mod:`geffect.engine.grouponly`; the step checks the factors)."""
        return self.segments == ("forget", "retain") and all(
            e.reads == "nll" and e.weighting == "uniform" for e in self.entries)

    @property
    def reuse_candidate(self) -> bool:
        """Whether the training backward's cotangents may be per-row multiples of the risk's (the
        engine still checks numerically): every part weights the NLL per instance at most."""
        return all(e.reads == "nll" and e.weighting in ("uniform", "instance") for e in self.entries)

    @property
    def gamma(self) -> float:
        return self.hyper.gamma

    @property
    def alpha(self) -> float:
        return self.hyper.alpha if self.hyper.alpha is not None else self.forget_entry.default_alpha

    def setup(self, model, seed: int) -> ObjectiveContext:
        """Objective-specific preparation of the model (e.g. RMU freezes all but three blocks)."""
        f = self.forget_entry
        return f.setup(model, self.hyper, seed) if f.setup else ObjectiveContext()

    def parts(self, out: ForwardOut, ctx: ObjectiveContext | None = None, retain_part: bool = True,
              forget_part: bool = True, shares: tuple[float, float] = (1.0, 1.0)) -> Parts:
        """The parts on one forward's output, total = γ·L_f·s_f + α·L_r·s_r with ``shares`` (s_f, s_r):
        the micro-batch's share of each part's rows when a part's mean is split over micro-batches.
        ``retain_part=False`` / ``forget_part=False`` skip a part (its rows may then be absent)."""
        ctx = ctx or ObjectiveContext()
        lf = self.forget_entry.loss(out, self.hyper, ctx) if forget_part else None
        r = self.retain_entry if retain_part else None
        lr = r.loss(out, self.hyper, ctx).value if r is not None else None
        total = (self.gamma * lf.value * shares[0] if lf is not None else 0.0) + \
            (self.alpha * lr * shares[1] if lr is not None else 0.0)
        if lf is None:
            return Parts(torch.zeros((), device=out.nll.device), lr, total)
        return Parts(lf.value, lr, total, lf.instance_weight, lf.token_weight)

    def config(self) -> dict:
        return {"method": self.name, "gamma": self.gamma, "alpha": self.alpha, "weighting": self.weighting,
                "segments": list(self.segments), **asdict(self.hyper)}


def parse_method(spec: str, hyper: Hyper | None = None) -> Method:
    """Parse ``ga``, ``gd``, ``npo+gd``, ``npo+kl``, ``rmu``, ``llmu``, ``gd+pcgrad`` … into a :class:`Method`."""
    hyper = hyper or Hyper()
    parts = [p.strip().lower() for p in spec.split("+") if p.strip()]
    if not parts:
        raise MethodError("empty --method")
    surgery = parts[-1] == "pcgrad"
    if surgery:
        parts = parts[:-1]
    if not parts or "pcgrad" in parts:
        raise MethodError(f"--method {spec!r}: write pcgrad last, after the objective (e.g. gd+pcgrad)")
    if parts == ["gd"]:
        parts = ["ga", "gd"]
    f, rest = parts[0], parts[1:]
    try:
        entry = forget_objective(f)
        if len(rest) > 1:
            raise MethodError("at most one retain regulariser")
        r = rest[0] if rest else None
        if r is not None:
            retain_regulariser(r)
            if entry.own_retain:
                raise MethodError(f"{f} has its own retain part; write --method {f}")
            if entry.negate_after:
                raise MethodError(f"{f} fine-tunes on the forget set and negates the result: it takes no retain "
                                  f"part; write --method {f}")
    except MethodError as err:
        raise MethodError(f"--method {spec!r}: {err}") from None
    method = Method(f, r, hyper, surgery)
    if surgery and not method.has_retain_part:
        raise MethodError(f"--method {spec!r}: PCGrad needs a retain part (e.g. {f}+gd)")
    return method
