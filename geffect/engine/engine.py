"""The G-effect engine: e = ∇Rᵀ∇L (Wang et al. 2025, Definition 1) per layer group and per
instance, from the training step's own forward and backward pass.

Sign: with θ ← θ − η∇L, ΔR ≈ −η·e. e_u < 0 means the forget risk rises (removal);
e_r ≥ 0 means the retain risk does not rise (retention).

PG-effect (per instance): e_i = ∇ℓ_iᵀ∇L with ℓ_i the mean answer-token NLL of sample i; the
batch G-effect e_u is the mean of the forget PG-effects (R is a mean over samples).

Directions: ``grad`` (the paper's raw ∇L, from ``.grad``) or ``update``: the optimizer's actual
step Δθ, used as V = −Δθ/η so that ΔR ≈ −η·e keeps its meaning (Adam's preconditioning included).

The library interface, for callers outside geffect's own step (a Trainer callback, distributed
workers)::

    engine = Engine(model, ProfileConfig())
    with engine.capture() as cap:              # hooks on every parameter-owning module
        out = model(...)                       # the training forward
        ...                                    # loss, ForwardOut ``fo`` with segments forget/retain
        engine.backward(cap, fo, loss)         # training backward + the risk's cotangents
    V = engine.direction_from_grads()          # ∇L (or engine.direction_from_update(before, lr))
    effects = engine.effects([Captured(cap, fo.segments, forget_ids, retain_ids)], V)
    effects.summary()                          # {"unlearn": {group: e_u, "total": …}, "retain": {…}}

or, against a fixed probe set at the current weights (no training forward needed)::

    effects = engine.effects([engine.capture_probe(probe)], engine.direction_from_grads(), source="probe")
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from geffect.config import ProfileConfig, parse_boundaries, parse_group_map
from geffect.engine import normrows
from geffect.engine.capture import Capture
from geffect.engine.gramrows import GramRows, pair_weights
from geffect.engine.groups import GROUPS, assign_groups, group_names
from geffect.objectives import functional as fn


@dataclass
class Captured:
    """One captured forward and the dataset items its forget and retain rows are."""
    cap: Capture
    segments: dict[str, slice]
    forget_index: list[int]
    retain_index: list[int]
    weights: torch.Tensor | None = None   # (n_f,) the objective's per-instance weights
    risks: torch.Tensor | None = None     # (n,) each row's ℓ (probe captures)


@dataclass
class Effects:
    """Per-instance, per-group G-effects of one step against one risk source."""
    source: str                  # "batch" (the step's own rows) or "probe" (the fixed probe set)
    direction: str               # "grad" or "update"
    groups: list[str]
    forget: torch.Tensor         # (n_f, G) PG-effects ∇ℓ_iᵀV of the forget rows, per group
    retain: torch.Tensor         # (n_r, G)
    forget_index: list[int]
    retain_index: list[int]
    weights: torch.Tensor | None = None   # (n_f,)
    means: dict[str, dict[str, float]] | None = None   # group-only: the batch G-effects, tables empty

    def group_only(self) -> Effects:
        """The same effects as group means alone (no per-instance rows are written)."""
        G = len(self.groups)
        return Effects(self.source, self.direction, list(self.groups), torch.zeros(0, G), torch.zeros(0, G), [], [],
                       None, self.summary())

    @classmethod
    def concat(cls, parts: list[Effects]) -> Effects:
        """The effects of several micro-batches (same source, direction and groups) as one."""
        first = parts[0]
        if any(p.means is not None for p in parts):
            raise ValueError("group-only effects are one step's batch means; they do not concatenate")
        ws = [p.weights for p in parts]
        return cls(first.source, first.direction, first.groups, torch.cat([p.forget for p in parts]),
                   torch.cat([p.retain for p in parts]), [i for p in parts for i in p.forget_index],
                   [i for p in parts for i in p.retain_index],
                   torch.cat(ws) if all(w is not None for w in ws) else None)

    def summary(self) -> dict[str, dict[str, float]]:
        """Batch G-effects: e = mean over the split's instances, per group and total (float64)."""
        if self.means is not None:
            return {risk: dict(d) for risk, d in self.means.items()}
        out = {}
        for risk, table in (("unlearn", self.forget), ("retain", self.retain)):
            if len(table) == 0:     # e.g. a probe set without forget rows
                continue
            m = table.double().mean(0)
            out[risk] = {g: m[i].item() for i, g in enumerate(self.groups)}
            out[risk]["total"] = m.sum().item()
        return out


@dataclass
class Pairs:
    """Fig. 5b: each forget instance's own objective term against the forget and the retain risk."""
    groups: list[str]
    unlearn: torch.Tensor        # (n_f, G) ∇R_uᵀ∇L(s_i)
    retain: torch.Tensor         # (n_f, G) ∇R_rᵀ∇L(s_i)
    forget_index: list[int]
    weights: torch.Tensor | None = None


def span_of(segments: dict[str, slice]) -> slice:
    """The rows from the first to the last forget or retain row (the per-row products' rows)."""
    f, r = segments["forget"], segments["retain"]
    return slice(min(f.start, r.start), max(f.stop, r.stop))


def risk_rows(fo) -> tuple[torch.Tensor, slice, slice]:
    """Per-row risks ℓ_i for the forget and retain rows and their sum R (cotangent 1 per row)."""
    f, r = fo.segments["forget"], fo.segments["retain"]
    ell_f = fn.mean_nll(fo.nll[f], fo.mask[f])
    ell_r = fn.mean_nll(fo.nll[r], fo.mask[r])
    return ell_f.sum() + ell_r.sum(), f, r


class Engine:
    """Attaches to a model (its layer groups) and measures G-effects of captured forwards."""

    def __init__(self, model: torch.nn.Module, cfg: ProfileConfig | None = None):
        self.model, self.cfg = model, cfg or ProfileConfig()
        self.assignment = assign_groups(model, parse_boundaries(self.cfg.boundaries), self.cfg.resolution,
                                        self.cfg.blocks_path, parse_group_map(self.cfg.group_map))
        # group resolution: always all five groups (an empty group, e.g. 'deep' of a 2-block model, is 0)
        self.groups = list(GROUPS) if self.cfg.resolution == "group" else group_names(self.assignment)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def capture(self) -> Capture:
        return Capture(self.model, self.assignment)

    def direction_from_grads(self) -> dict[int, torch.Tensor]:
        """V = ∇L, the gradients in ``.grad``."""
        return {id(p): p.grad for p in self.model.parameters() if p.grad is not None}

    def snapshot(self) -> dict[int, torch.Tensor]:
        """The trainable weights before an update (for :meth:`direction_from_update`)."""
        return {id(p): p.detach().clone() for p in self.params}

    def direction_from_update(self, before: dict[int, torch.Tensor], lr: float,
                              inplace: bool = True) -> dict[int, torch.Tensor]:
        """V = −Δθ/η = (θ_before − θ_after)/η; ``inplace`` builds it in the snapshot's buffers."""
        if inplace:
            return {id(p): before[id(p)].sub_(p.detach()).div_(lr) for p in self.params}
        return {id(p): (before[id(p)] - p.detach()) / lr for p in self.params}

    def per_instance(self, cap: Capture, segments: dict[str, slice], V: dict[int, torch.Tensor]) -> dict:
        """Per-group, per-instance values for one captured forward.

        Returns {"forget": (n_f, G) tensor, "retain": (n_r, G) tensor} in ``self.groups`` order.
        """
        f, r = segments["forget"], segments["retain"]
        span = span_of(segments)                                    # one pass over both splits' rows
        vals = cap.inner_products(V, span)
        n, dev = span.stop - span.start, self.device
        table = torch.stack([vals[g] if g in vals else torch.zeros(n, device=dev) for g in self.groups], dim=1)  # (n, G)
        return {split: table[s.start - span.start:s.stop - span.start] for split, s in (("forget", f),
                                                                                         ("retain", r))}

    def effects(self, captured: list[Captured], V: dict[int, torch.Tensor], source: str = "batch",
                release: bool = True) -> Effects:
        """Per-instance, per-group G-effects of captured forwards along V; releases their tensors
        (unless ``release`` is off: captures shared between steps, see :class:`~geffect.engine.probe.BaseProbe`)."""
        per = {"forget": [], "retain": []}
        for c in captured:
            res = self.per_instance(c.cap, c.segments, V)
            per["forget"].append(res["forget"])
            per["retain"].append(res["retain"])
        for c in captured if release else ():
            c.cap.release()
        weights = [c.weights for c in captured]
        return Effects(source, self.cfg.direction, list(self.groups), torch.cat(per["forget"]).cpu(),
                       torch.cat(per["retain"]).cpu(), [i for c in captured for i in c.forget_index],
                       [i for c in captured for i in c.retain_index],
                       torch.cat(weights).cpu() if all(w is not None for w in weights) else None)

    def backward(self, cap: Capture, fo, loss: torch.Tensor, reuse: bool = True, backprop=None,
                 stream: bool = False, on_modules=None, phases=None, parts_stats: bool = False,
                 pairs: bool = False, form=None) -> str:
        """The training backward of ``loss`` plus the risk cotangents; returns the path taken.

        ``reuse``: if the loss reads the model only through the per-token NLL and on every
        forget/retain row its cotangent at the NLL is c_i times the risk's (checked numerically on
        the (N, T-1) answer tokens, c_i ≠ 0), the rows' cotangents at the logits and at every module
        are c_i times the risk's too (each nll_{i,t} depends on its own position's logits only;
        backprop is linear and rows do not interact), so the training backward's own cotangents
        divided by c_i are the risk's: no extra backward. ``reuse+retain``: the same for the forget
        rows of an objective that never reads the retain rows (GA, NPO, SimNPO alone), when the retain
        rows ran as their own forward chunk: one backward of R_r over that chunk only, to its module
        outputs. ``extra``: one backward of R to the module outputs (no weight gradients), then the
        training backward. ``reuse=False`` (the caller knows the loss reads more than the NLL, e.g.
        from the objective registry) goes straight to ``extra``.
        ``backprop`` runs the training backward (default ``loss.backward()``).
        ``stream``: the G-effects will be taken along the gradient this backward leaves in ``.grad``
        (direction ``grad``, one micro-batch, no PCGrad): each module's inner products are then
        taken the moment its gradient is complete, ``on_modules(names, products)`` is called for anything
        else to take from them (``products``: each module's per-row products along its ``.grad``, not
        yet divided by the reuse path's c_i, over the forget and retain rows), and their captured
        tensors are freed during the backward. Linear layers take their products from ``form`` when
        given, else in Gram form where cheaper (:mod:`geffect.engine.gramrows`), with the parts'
        conflict statistics into ``cap.part_stats`` when ``parts_stats`` and the Fig. 5b pairs into
        ``cap.pair_products`` when ``pairs``.
        ``phases`` (:class:`geffect.timing.Phases`): the streamed inner products count as ``effects``.
        ``form`` (:class:`geffect.engine.instanceform.InstanceForm`, streamed reuse path): armed for
        the training backward, its Linear layers' products formed there.
        """
        backprop = backprop or loss.backward
        R, f, r = risk_rows(fo)
        dev = fo.nll.device
        rows = torch.cat([torch.arange(f.start, f.stop, device=dev), torch.arange(r.start, r.stop, device=dev)])
        c, path = None, "reuse"
        if self.cfg.reuse_backward and reuse and fo.reads_model_only_through_nll(loss):
            gL, gR = fo.nll_grads(loss), fo.nll_grads(R)                 # (N, T-1) each
            if gL is not None:
                gL, gR = gL * fo.mask, gR * fo.mask
                c = proportional(gL[rows], gR[rows])
                r_rows = torch.arange(r.start, r.stop, device="cpu")     # chunk bookkeeping is host-side
                if c is None and not gL[r].any() and cap.has_chunk(r_rows):
                    c_f = proportional(gL[f], gR[f])
                    if c_f is not None:   # forget rows reuse; retain rows: a backward of their chunk alone
                        cap.risk_grads(fn.mean_nll(fo.nll[r], fo.mask[r]).sum(), chunk=r_rows)
                        ones = torch.ones(r.stop - r.start, dtype=c_f.dtype, device=c_f.device)
                        c, path = torch.cat([c_f, ones]), "reuse+retain"
        if c is not None:
            cap.rescale_rows(rows, 1.0 / c, fo.nll.shape[0])
        form = form if stream and c is not None else None
        if stream:
            self._arm(cap, fo.segments, on_modules, phases, parts_stats, pairs, form)
        if c is None:
            cap.risk_grads(R)
            training_backward(cap, backprop)
            return "extra"
        cap.stash = True
        if form is not None:       # (the pairs' weights: the rows' scales 1/c_i are set above)
            form.arm(pairs=pair_weights(cap, fo.segments) if pairs else None)
        try:
            training_backward(cap, backprop)
        finally:
            cap.stash = False
            if form is not None:
                form.arm(False)
        return path

    def _arm(self, cap: Capture, segments: dict[str, slice], on_modules, phases=None, parts_stats: bool = False,
             pairs: bool = False, form=None) -> None:
        """Stream: per-row inner products of each module against its completed ``.grad``."""
        span = span_of(segments)
        gram_rows = GramRows(cap, span, segments["retain"], parts_stats, segments, pairs)

        def add(group: str, v: torch.Tensor) -> None:
            cap.streamed[group] = cap.streamed[group] + v if group in cap.streamed else v

        def ready(names: list[str]) -> None:
            products: dict[str, torch.Tensor] = {}
            with torch.no_grad(), phases("effects") if phases is not None else nullcontext():
                formed = form.take(cap, names, products, span) if form is not None else []
                taken = formed + gram_rows.take(names, products, skip=formed)
                taken += normrows.take(cap, [n for n in names if n not in taken], products, span,
                                       segments["retain"], parts_stats)
                for n in taken:
                    add(cap.assignment[n], products[n])
                rest = [n for n in names if n not in taken]
                V = {id(p): p.grad for n in rest for p in cap.modules[n]._parameters.values()
                     if p is not None and p.grad is not None}
                for g, v in cap.inner_products(V, span, rest, products).items():
                    add(g, v)
            if on_modules is not None:
                on_modules(names, products)
            cap.release_modules(names)
        cap.arm_stream(ready)

    def capture_probe(self, probe) -> Captured:
        """Forward the fixed probe set at the current weights and capture its risk cotangents (one
        backward to the module outputs, no weight gradients: ``.grad`` is left untouched)."""
        from geffect.forward import logits_window, positions
        window = logits_window(self.model, probe)              # (from the probe's labels where they are)
        ids, att, labels = (t.to(self.device) for t in (probe.input_ids, probe.attention_mask, probe.labels))
        with self.capture() as cap:
            logits = self.model(input_ids=ids, attention_mask=att, position_ids=positions(ids), use_cache=False,
                                **window).logits                                        # (n, k, V)
            nll, mask = fn.token_nll(logits, labels)
            ell = fn.mean_nll(nll, mask)                                     # (n,)
            del logits
            cap.risk_grads(ell.sum())
            cap.drop_outputs()
        return Captured(cap, probe.segments, probe.forget_index, probe.retain_index, risks=ell.detach())


def training_backward(cap: Capture, backprop) -> None:
    """Run the training backward, telling the capture (which may keep its cotangents). The captured
    outputs are dropped first: the risk's cotangents are taken, and the hooks that keep the
    training cotangents live on in the graph without them."""
    cap.drop_outputs()
    cap.training_pass = True
    try:
        backprop()
    finally:
        cap.training_pass = False


def proportional(gL: torch.Tensor, gR: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor | None:
    """Per-row c_i with gL_i = c_i·gR_i (rows flattened), or None if any row is not proportional."""
    a, b = gL.reshape(len(gL), -1), gR.reshape(len(gR), -1)     # float32: no float64 copy of (N, T·V)
    wide = torch.float32 if a.device.type == "mps" else torch.float64         # MPS has no float64
    c = ((a * b).sum(1).to(wide) / (b * b).sum(1).to(wide).clamp_min(1e-300))
    resid = (a - c[:, None].to(a.dtype) * b).norm(dim=1).to(wide)
    if (c == 0).any() or (resid > rtol * a.norm(dim=1).to(wide)).any():
        return None
    return c
