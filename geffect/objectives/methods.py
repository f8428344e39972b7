"""Unlearning methods: a forget objective plus an optional retain regulariser.

``--method`` names a forget objective optionally followed by a retain regulariser:
``npo+gd``, ``npo+kl``, ``wga+kl``; ``gd`` alone means GradDiff (= ``ga+gd``); a trailing ``+pcgrad``
applies PCGrad to the two parts' gradients (``gd+pcgrad``, ``idkdpo+gd+pcgrad``). The total minimised
objective is γ·L_f + α·L_r (REFERENCE.md §2). Each method reads one forward pass
(:class:`ForwardOut`) and returns its parts; the arithmetic lives in :mod:`functional`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from geffect.objectives import functional as fn

FORGET_OBJECTIVES = ("ga", "npo", "simnpo", "wga", "tnpo", "wtnpo", "po", "idkdpo", "rmu", "llmu")
RETAIN_REGULARISERS = ("gd", "kl")
WEIGHTED = {"npo": "instance", "simnpo": "instance", "wga": "token", "tnpo": "token", "wtnpo": "token"}


class MethodError(ValueError):
    """An unknown or malformed --method."""


@dataclass
class Hyper:
    """Objective hyperparameters (reference defaults, REFERENCE.md §2)."""
    gamma: float = field(default=1.0, metadata={"help": "weight γ of the forget part"})
    alpha: float | None = field(default=None, metadata={
        "help": "weight α of the retain part (default 1; 1200 for rmu)"})
    npo_beta: float = field(default=0.1, metadata={"help": "NPO β (open-unlearning default)"})
    simnpo_beta: float = field(default=4.5, metadata={"help": "SimNPO β"})
    simnpo_delta: float = field(default=0.0, metadata={"help": "SimNPO margin δ"})
    wga_alpha: float = field(default=1.0, metadata={"help": "WGA exponent α in w_t = p_t^α"})
    tnpo_beta: float = field(default=4.0, metadata={"help": "TNPO β"})
    wtnpo_alpha: float = field(default=1.5, metadata={"help": "WTNPO α"})
    wtnpo_beta: float = field(default=4.0, metadata={"help": "WTNPO β"})
    dpo_beta: float = field(default=0.1, metadata={"help": "IdkDPO β"})
    rmu_layer: int | None = field(default=None, metadata={
        "help": "RMU layer ℓ (default: a quarter of the depth); layers ℓ-2..ℓ are updated"})
    rmu_coeff: float = field(default=6.5, metadata={"help": "RMU control scale c"})
    llmu_ga: float = field(default=0.5, metadata={"help": "LLMU weight of the GA term"})
    llmu_mismatch: float = field(default=1.0, metadata={"help": "LLMU weight of the random-mismatch term"})


@dataclass
class ForwardOut:
    """What objectives read from one forward pass of θ (and of θ_o when needed)."""
    nll: torch.Tensor                  # (N, T-1) answer-token NLL, 0 elsewhere
    mask: torch.Tensor                 # (N, T-1)
    logits: torch.Tensor               # (N, T, V)
    labels: torch.Tensor               # (N, T)
    segments: dict[str, slice]
    hidden: torch.Tensor | None = None      # (N, T, d) RMU layer output
    ref_nll: torch.Tensor | None = None     # (N, T-1) under θ_o
    ref_logits: torch.Tensor | None = None  # (N, T, V) under θ_o (KL rows only are read)
    ref_hidden: torch.Tensor | None = None  # (N, T, d)
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
        g = torch.cat([gi if gi is not None else torch.zeros_like(l) for gi, l in zip(gs, leaves)])
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

    def seg(self, name: str):
        s = self.segments[name]
        return self.nll[s], self.mask[s]


@dataclass
class Parts:
    """The parts of a method's objective for one batch."""
    forget: torch.Tensor                    # L_f (scalar, unweighted)
    retain: torch.Tensor | None             # L_r (scalar, unweighted) or None
    total: torch.Tensor                     # γ·L_f + α·L_r
    instance_weight: torch.Tensor | None = None  # (n_forget,)
    token_weight: torch.Tensor | None = None     # (n_forget, T-1)


@dataclass(frozen=True)
class Method:
    forget: str
    retain: str | None
    hyper: Hyper
    pcgrad: bool = False   # PCGrad surgery on the forget and retain parts' gradients (``+pcgrad``)

    @property
    def name(self) -> str:
        base = self.forget if self.forget in ("rmu", "llmu") or self.retain is None else f"{self.forget}+{self.retain}"
        return base + ("+pcgrad" if self.pcgrad else "")

    @property
    def has_retain_part(self) -> bool:
        """Two tasks (forget and retain parts) for PCGrad and conflict statistics."""
        return self.retain is not None or self.forget in ("rmu", "llmu")

    @property
    def segments(self) -> tuple[str, ...]:
        extra = {"po": ("idk",), "idkdpo": ("idk",), "llmu": ("mismatch",)}.get(self.forget, ())
        return ("forget", "retain") + extra

    @property
    def needs_ref(self) -> bool:
        return self.forget in ("npo", "tnpo", "wtnpo", "idkdpo", "rmu", "llmu") or self.retain == "kl"

    @property
    def needs_ref_logits(self) -> bool:
        return self.retain == "kl" or self.forget == "llmu"

    @property
    def needs_hidden(self) -> bool:
        return self.forget == "rmu"

    @property
    def gamma(self) -> float:
        return self.hyper.gamma

    @property
    def alpha(self) -> float:
        if self.hyper.alpha is not None:
            return self.hyper.alpha
        return 1200.0 if self.forget == "rmu" else 1.0

    def rmu_layer(self, num_layers: int) -> int:
        if self.hyper.rmu_layer is not None:
            if not 0 <= self.hyper.rmu_layer < num_layers:
                raise MethodError(f"--rmu-layer {self.hyper.rmu_layer} outside 0..{num_layers - 1}")
            return self.hyper.rmu_layer
        return max(0, min(num_layers - 1, round(num_layers / 4)))

    def parts(self, out: ForwardOut, control: torch.Tensor | None = None, retain_part: bool = True) -> Parts:
        """The parts on one forward's output; ``retain_part=False`` skips the retain part (L_r = None)."""
        h = self.hyper
        nf, mf = out.seg("forget")
        iw = tw = None
        f = self.forget
        if f == "ga":
            lf = fn.ga(nf, mf)
        elif f == "npo":
            s = out.segments["forget"]
            lf, iw = fn.npo(fn.seq_logp(nf, mf), fn.seq_logp(out.ref_nll[s], mf), h.npo_beta)
        elif f == "simnpo":
            lf, iw = fn.simnpo(fn.seq_logp(nf, mf), mf.sum(-1), h.simnpo_beta, h.simnpo_delta)
        elif f == "wga":
            lf, tw = fn.wga(nf, mf, h.wga_alpha)
        elif f == "tnpo":
            lf, tw = fn.tnpo(nf, out.ref_nll[out.segments["forget"]], mf, h.tnpo_beta)
        elif f == "wtnpo":
            lf, tw = fn.wtnpo(nf, out.ref_nll[out.segments["forget"]], mf, h.wtnpo_alpha, h.wtnpo_beta)
        elif f == "po":
            lf = fn.nll_loss(*out.seg("idk"))
        elif f == "idkdpo":
            ni, mi = out.seg("idk")
            si, sf = out.segments["idk"], out.segments["forget"]
            lf = fn.idkdpo(fn.seq_logp(ni, mi), fn.seq_logp(out.ref_nll[si], mi),
                           fn.seq_logp(nf, mf), fn.seq_logp(out.ref_nll[sf], mf), h.dpo_beta)
        elif f == "rmu":
            s = out.segments["forget"]
            lf = fn.rmu_forget(out.hidden[s], control, _token_mask(out, "forget"))
        elif f == "llmu":
            lf = h.llmu_ga * fn.ga(nf, mf) + h.llmu_mismatch * fn.nll_loss(*out.seg("mismatch"))
        else:  # pragma: no cover - parse_method guards this
            raise MethodError(f"unknown forget objective {f!r}")

        lr = None
        r = ("kl" if f == "llmu" else ("rmu" if f == "rmu" else self.retain)) if retain_part else None
        if r == "gd":
            lr = fn.nll_loss(*out.seg("retain"))
        elif r == "kl":
            s = out.segments["retain"]
            lr = fn.forward_kl(out.logits[s], out.ref_logits[s], out.labels[s])
        elif r == "rmu":
            s = out.segments["retain"]
            lr = fn.rmu_retain(out.hidden[s], out.ref_hidden[s], _token_mask(out, "retain"))
        total = self.gamma * lf + (self.alpha * lr if lr is not None else 0.0)
        return Parts(lf, lr, total, iw, tw)

    def config(self) -> dict:
        return {"method": self.name, "gamma": self.gamma, "alpha": self.alpha, **asdict(self.hyper)}


def _token_mask(out: ForwardOut, seg: str) -> torch.Tensor:
    """Answer-token mask aligned with hidden states (position t predicts token t+1)."""
    s = out.segments[seg]
    m = torch.zeros(out.labels[s].shape, dtype=out.mask.dtype)
    m[:, :-1] = out.mask[s]
    return m


def parse_method(spec: str, hyper: Hyper | None = None) -> Method:
    """Parse ``ga``, ``gd``, ``npo+gd``, ``npo+kl``, ``rmu``, ``llmu`` … into a :class:`Method`."""
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
    if f not in FORGET_OBJECTIVES:
        raise MethodError(f"unknown forget objective {f!r} in --method {spec!r}; "
                          f"choose one of {', '.join(FORGET_OBJECTIVES)} (or gd)")
    if len(rest) > 1:
        raise MethodError(f"--method {spec!r}: at most one retain regulariser")
    r = rest[0] if rest else None
    if r is not None and r not in RETAIN_REGULARISERS:
        raise MethodError(f"unknown retain regulariser {r!r} in --method {spec!r}; "
                          f"choose one of {', '.join(RETAIN_REGULARISERS)}")
    if f in ("rmu", "llmu") and r is not None:
        raise MethodError(f"{f} has its own retain part; write --method {f}")
    method = Method(f, r, hyper, surgery)
    if surgery and not method.has_retain_part:
        raise MethodError(f"--method {spec!r}: PCGrad needs a retain part (e.g. {f}+gd)")
    return method
