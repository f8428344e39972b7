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

from geffect.engine.allocator import keep_freed_memory
from geffect.engine.capture import Capture
from geffect.engine.groups import GROUPS, assign_groups, group_names
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
    probe_forget: bool = field(default=True, metadata={
        "help": "the probe set includes the whole forget set (off: the retain sample only, a cheaper e_r on "
                "a fixed sample instead of the rows the retain part trains on)"})
    conflicts: bool = field(default=True, metadata={
        "help": "conflict statistics of the forget and retain parts' gradients every step (conflicts.csv); "
                "the training backward runs once per part"})
    pairs_every: int = field(default=5, metadata={
        "help": "every k steps, for each forget instance, the G-effect of its own objective term on the "
                "forget and on the retain risk (the paper's Fig. 5b; pairs.csv); costs two backward passes; "
                "0 = off"})
    tokens_every: int = field(default=5, metadata={
        "help": "every k steps, the G-effect on each forget answer token's NLL (tokens.csv 'geffect'), by one "
                "forward-mode pass; 0 = off"})
    keep_freed_memory: bool = field(default=True, metadata={
        "help": "glibc: keep freed memory in the process for reuse (no heap trimming, no fresh mmaps for "
                "large blocks): the profiled step keeps cotangents until the inner products, and without this "
                "glibc hands it fresh pages (page faults) every step on CPU; resident memory stays at its peak "
                "(geffect/engine/allocator.py)"})
    reuse_backward: bool = field(default=True, metadata={
        "help": "when the objective is a per-instance reweighting of the NLL (GA, GD, NPO, SimNPO …), "
                "derive the risk cotangents from the training backward instead of an extra backward"})


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
        if self.cfg.keep_freed_memory and next(model.parameters()).device.type == "cpu":
            keep_freed_memory()
        self.assignment = assign_groups(model, parse_boundaries(self.cfg.boundaries), self.cfg.resolution)
        # group resolution: always all five groups (an empty group, e.g. 'deep' of a 2-block model, is 0)
        self.groups = list(GROUPS) if self.cfg.resolution == "group" else group_names(self.assignment)

    def capture(self) -> Capture:
        return Capture(self.model, self.assignment)

    def direction_from_grads(self) -> dict[int, torch.Tensor]:
        return {id(p): p.grad for p in self.model.parameters() if p.grad is not None}

    def measure(self, cap: Capture, segments: dict[str, slice], V: dict[int, torch.Tensor]) -> dict:
        """Per-group, per-instance values for one captured micro-batch.

        Returns {"forget": (n_f, G) tensor, "retain": (n_r, G) tensor} in ``self.groups`` order.
        """
        f, r = segments["forget"], segments["retain"]
        span = slice(min(f.start, r.start), max(f.stop, r.stop))    # one pass over both splits' rows
        vals = cap.inner_products(V, span)
        n = span.stop - span.start
        table = torch.stack([vals.get(g, torch.zeros(n)) for g in self.groups], dim=1)   # (n, G)
        return {split: table[s.start - span.start:s.stop - span.start] for split, s in (("forget", f),
                                                                                         ("retain", r))}

    def summarise(self, per_instance: dict) -> dict:
        """Batch G-effects: e = mean over the split's instances, per group and total."""
        out = {}
        for risk, split in (("unlearn", "forget"), ("retain", "retain")):
            if len(per_instance[split]) == 0:     # e.g. a probe set without forget rows
                continue
            m = per_instance[split].double().mean(0)
            out[risk] = {g: m[i].item() for i, g in enumerate(self.groups)}
            out[risk]["total"] = m.sum().item()
        return out

    def backward(self, cap: Capture, fo, loss: torch.Tensor, uses_hidden: bool = False,
                 backprop=None) -> str:
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
        training backward.
        ``backprop`` runs the training backward (default ``loss.backward()``); it may split it into
        the objective's parts (PCGrad, conflict statistics): the stashed cotangents add up.
        """
        backprop = backprop or loss.backward
        R, f, r = risk_rows(fo)
        rows = torch.cat([torch.arange(f.start, f.stop), torch.arange(r.start, r.stop)])
        c, path = None, "reuse"
        if self.cfg.reuse_backward and not uses_hidden and fo.reads_model_only_through_nll(loss):
            gL, gR = fo.nll_grads(loss), fo.nll_grads(R)                 # (N, T-1) each
            if gL is not None:
                gL, gR = gL * fo.mask, gR * fo.mask
                c = proportional(gL[rows], gR[rows])
                r_rows = torch.arange(r.start, r.stop)
                if c is None and not gL[r].any() and cap.has_chunk(r_rows):
                    c_f = proportional(gL[f], gR[f])
                    if c_f is not None:   # forget rows reuse; retain rows: a backward of their chunk alone
                        cap.risk_grads(fn.mean_nll(fo.nll[r], fo.mask[r]).sum(), chunk=r_rows)
                        c, path = torch.cat([c_f, torch.ones(r.stop - r.start, dtype=c_f.dtype)]), "reuse+retain"
        if c is None:
            cap.risk_grads(R)
            backprop()
            return "extra"
        cap.stash = True
        backprop()
        cap.stash = False
        cap.rescale_rows(rows, 1.0 / c, fo.nll.shape[0])
        return path

    def instance_pairs(self, cap: Capture, fo, forget_part: torch.Tensor) -> dict[str, torch.Tensor]:
        """Objective-side PG-effects of each forget instance s_i (Wang et al. Fig. 5b):
        (∇R_uᵀ∇L(s_i), ∇R_rᵀ∇L(s_i)) with L(s_i) the forget part's term for s_i, scaled by n_f so
        that their mean is the forget part's G-effect. Call before the training backward.

        Returns {"unlearn": (n_f, G), "retain": (n_f, G)} in ``self.groups`` order.
        """
        _, f, r = risk_rows(fo)
        params = [p for p in self.model.parameters() if p.requires_grad]
        cot = cap.output_grads(forget_part)                     # ∇(γ·L_f) at module outputs, per row
        n_f = f.stop - f.start
        out = {}
        for risk, rows in (("unlearn", f), ("retain", r)):
            R = fn.mean_nll(fo.nll[rows], fo.mask[rows]).mean()
            g = torch.autograd.grad(R, params, retain_graph=True, allow_unused=True)
            V = {id(p): gi for p, gi in zip(params, g) if gi is not None}
            vals = cap.inner_products(V, f, cotangents=cot)
            out[risk] = n_f * torch.stack([vals.get(gr, torch.zeros(n_f)) for gr in self.groups], dim=1)
        return out

    def pair_records(self, step: int, pairs: dict, forget_index: list, weights) -> list[dict]:
        rows = []
        for i, ds_index in enumerate(forget_index):
            row = {"step": step, "index": ds_index,
                   "weight": weights[i].item() if weights is not None else float("nan"),
                   "unlearn": pairs["unlearn"][i].sum().item(), "retain": pairs["retain"][i].sum().item()}
            for risk in ("unlearn", "retain"):
                row.update({f"{risk}_{g}": pairs[risk][i, gi].item() for gi, g in enumerate(self.groups)})
            rows.append(row)
        return rows

    def capture_probe(self, probe) -> Capture:
        """Forward the fixed probe set at the current weights and capture its risk cotangents."""
        with self.capture() as cap:
            pos = torch.arange(probe.input_ids.shape[1]).expand_as(probe.input_ids)
            logits = self.model(input_ids=probe.input_ids, attention_mask=probe.attention_mask,
                                position_ids=pos, use_cache=False).logits
            nll, mask = fn.token_nll(logits, probe.labels)
            cap.risk_grads(fn.mean_nll(nll, mask).sum())
        return cap

    def records(self, step: int, captured: list, V: dict, source: str = "batch") -> tuple[list, list]:
        """Long-format G-effect rows and per-instance rows for one optimizer step."""
        per = {"forget": [], "retain": []}
        inst = []
        for cap, segments, f_idx, r_idx, weights in captured:
            res = self.measure(cap, segments, V)
            for split, idx in (("forget", f_idx), ("retain", r_idx)):
                per[split].append(res[split])
                for i, ds_index in enumerate(idx):
                    row = {"step": step, "source": source, "split": split, "index": ds_index,
                           "value": res[split][i].sum().item(),
                           "weight": (weights[i].item() if split == "forget" and weights is not None
                                      else float("nan"))}
                    row.update({f"value_{g}": res[split][i, gi].item() for gi, g in enumerate(self.groups)})
                    inst.append(row)
        for cap, *_ in captured:
            cap.release()
        summary = self.summarise({k: torch.cat(v) for k, v in per.items()})
        eff = [{"step": step, "source": source, "direction": self.cfg.direction, "risk": risk, "group": g,
                "value": val} for risk, d in summary.items() for g, val in d.items()]
        return eff, inst


def proportional(gL: torch.Tensor, gR: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor | None:
    """Per-row c_i with gL_i = c_i·gR_i (rows flattened), or None if any row is not proportional."""
    a, b = gL.reshape(len(gL), -1), gR.reshape(len(gR), -1)     # float32: no float64 copy of (N, T·V)
    c = ((a * b).sum(1).double() / (b * b).sum(1).double().clamp_min(1e-300))
    resid = (a - c[:, None].to(a.dtype) * b).norm(dim=1).double()
    if (c == 0).any() or (resid > rtol * a.norm(dim=1).double()).any():
        return None
    return c


@dataclass
class Probe:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    segments: dict
    forget_index: list
    retain_index: list


def probe_retain_indices(n_total: int, n: int, seed: int) -> list[int]:
    """The probe's seeded retain sample (indices into the retain set)."""
    import random as _random
    return sorted(_random.Random(seed + 99).sample(range(n_total), min(n, n_total)))


def make_probe(tok, data, n_retain: int, max_length: int, seed: int, forget: bool = True) -> Probe:
    """The fixed probe set: the whole forget set (unless ``forget`` is off) and a seeded retain sample."""
    from geffect.data.batching import collate, qa
    r_idx = probe_retain_indices(len(data.retain), n_retain, seed)
    f_recs = data.forget if forget else []
    b = collate(tok, {"forget": qa(f_recs), "retain": qa([data.retain[i] for i in r_idx])}, max_length)
    return Probe(b.input_ids, b.attention_mask, b.labels, b.segments, list(range(len(f_recs))), r_idx)
