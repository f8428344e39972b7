"""One training step of a method, with the G-effect engine optionally attached.

The loop, ``measure``, ``diagnose``, the benchmarks and the tests all call :class:`Step`; nothing
else rebuilds a step. One call:

1. per micro-batch: one forward of θ (the retain rows in a chunk of their own only when an
   objective that never reads them is profiled), θ_o's values, the objective's parts and one
   backward; the engine takes the risk's cotangents from that backward or from one extra backward
   to the module outputs, and keeps the training cotangents when the parts' gradients are needed;
2. from those, without a second backward: the conflict statistics of the two parts and PCGrad's
   update in ``.grad`` (:mod:`geffect.engine.parts`; streamed, Linear layers take them from the
   G-effects' per-row products and Gram sums, :mod:`geffect.engine.gram`), and the Fig. 5b pairs
   (:mod:`geffect.engine.pairs`). Streamed on the reuse path (on CPU by default), the Linear layers'
   products, statistics and pairs are formed inside the training backward itself, each row's own
   weight gradient tile by tile (:mod:`geffect.engine.instanceform`);
3. the engine's records along ∇L (direction ``grad``), before clipping and before the optimizer
   allocates its state, so the captured tensors are freed first;
4. clipping and the optimizer update; along the update −Δθ/η (direction ``update``), the records
   after it, at the weights before it.

Group-only (``--no-instances``) GA and GD replace 1–3: the backward runs in two passes over the
parts' own forward chunks and per-tensor dot products give the conflict statistics and the group
G-effects (:mod:`geffect.engine.grouponly`). Each phase's self time is kept (:mod:`geffect.timing`).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from geffect.config import ProfileConfig
from geffect.data.sampling import MicroBatch
from geffect.distributed import SINGLE, World
from geffect.engine.capture import Capture
from geffect.engine.engine import Captured, Effects, Engine, Pairs, span_of, training_backward
from geffect.engine.gram import streamed_part_scalars
from geffect.engine.grouponly import group_effects, owners, split_factors, tied_embeddings
from geffect.engine.instanceform import FormChoice, InstanceForm, eligible_linear
from geffect.engine.pairs import PairsAccumulator
from geffect.engine.parts import TwoPassDots, apply_coefficients, part_scalars
from geffect.engine.partsform import _LINEAR as _PARTS_LINEAR
from geffect.engine.partsform import PartsForm, checkpointing, one_pass_scalars
from geffect.engine.schedule import NOTHING, Due
from geffect.engine.tokens import TokenRecords, TokenSource
from geffect.forward import forward, part_rows
from geffect.objectives import ForwardOut, Method, ObjectiveContext, Parts
from geffect.objectives import functional as fn
from geffect.reference import Reference
from geffect.surgery import param_groups, plan
from geffect.timing import Phases

FORM_PHASES = ("backward", "effects", "conflicts", "pairs")   # what the per-instance form changes


@dataclass
class StepResult:
    """What one optimizer step did and, when the engine ran, what it measured."""
    losses: dict[str, float]                 # loss, loss_forget, loss_retain (NaN: none), nll_forget, nll_retain
    weights: torch.Tensor | None             # the weights the objective applied, flat over micro-batches
    seconds: float = 0.0
    path: str | None = None                  # how the engine got the risk's cotangents (reuse, extra, …)
    effects: list[Effects] = field(default_factory=list)      # batch, then probe
    conflicts: list[dict] = field(default_factory=list)       # per scope (global, each group)
    pairs: list[Pairs] = field(default_factory=list)          # per micro-batch
    tokens: list[TokenRecords] = field(default_factory=list)  # per micro-batch
    grad_norm: float = float("nan")          # ‖∇L‖ before clipping (the update's, after PCGrad)
    clipped: bool = False                    # whether --clip scaled the gradient down
    nonfinite: list[str] = field(default_factory=list)        # what was not finite: loss, gradient, geffect
    applied: bool = True                     # whether the optimizer step was taken
    phases: dict[str, float] = field(default_factory=dict)    # self seconds per phase (geffect.timing)

    @property
    def finite(self) -> bool:
        return not self.nonfinite


class Step:
    """Runs one optimizer step of ``method`` on ``model`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, method: Method, reference: Reference | None = None,
                 ctx: ObjectiveContext | None = None, engine: Engine | None = None, probe=None,
                 pcgrad_scope: str = "global", on_nonfinite: str = "stop", world: World = SINGLE,
                 forward_model: torch.nn.Module | None = None, base_probe=None):
        """``world``: this process's rank in a data-parallel or sharded run (:mod:`geffect.distributed`);
        ``forward_model``: what the training forward runs through (the DDP wrapper), default ``model``;
        ``base_probe``: a :class:`~geffect.engine.probe.BaseProbe` sharing the probe's captures at
        the base weights between runs (direction ``update``)."""
        if method.needs_ref and reference is None:
            raise ValueError(f"{method.name} needs a reference model θ_o")
        self.model, self.method, self.reference, self.ctx = model, method, reference, ctx or ObjectiveContext()
        self.world, self.forward_model = world, forward_model if forward_model is not None else model
        self.engine, self.probe, self.scope, self.base_probe = engine, probe, pcgrad_scope, base_probe
        self.on_nonfinite = on_nonfinite   # stop / skip-step: a non-finite loss or gradient is not applied
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._capturer = engine       # PCGrad without profiling captures through an engine of its own
        self._groups_of: dict[int, str] | None = None
        self._parts_form = self._instance_form = None
        self._known_squares: dict[int, tuple] = {}     # group-only: id(param) -> (.grad, version, ‖.grad‖²)
        self._instance_layers: dict[str, torch.nn.Module] | None = None
        self._form_choice: FormChoice | None = None

    def capturer(self) -> Engine:
        if self._capturer is None:
            self._capturer = Engine(self.model, ProfileConfig())
        return self._capturer

    def _tied(self) -> list[str] | None:
        """The engine's tied embedding modules (see :func:`geffect.engine.grouponly.tied_embeddings`)."""
        if not hasattr(self, "_tied_names"):
            self._tied_names = tied_embeddings(self.model, self.engine.assignment)
        return self._tied_names

    def _parts_linear(self) -> dict[str, torch.nn.Module] | None:
        """The engine's Linear (and Conv1D) modules for the parts form, each owning its parameters
        alone or tied to an input embedding only; None where any other module shares a Linear
        weight, under gradient checkpointing or across processes (then two passes)."""
        if self.world.active or checkpointing(self.model):
            return None
        owned = owners(self.model, self.engine.assignment)
        out = {}
        for n in self.engine.assignment:
            mod = self.model.get_submodule(n)
            if not isinstance(mod, _PARTS_LINEAR):
                continue
            for p in mod._parameters.values():
                if p is None or not p.requires_grad:
                    continue
                others = [o for o in owned[id(p)] if o != n]
                if others and (len(others) > 1 or p is not mod.weight
                               or not isinstance(self.model.get_submodule(others[0]), torch.nn.Embedding)):
                    return None
            out[n] = mod
        return out or None

    def _instance_linear(self) -> dict[str, torch.nn.Module]:
        """The engine's Linear layers for the instance form (see :func:`geffect.engine.instanceform.eligible_linear`)."""
        if self._instance_layers is None:
            self._instance_layers = eligible_linear(self.model, self.engine.assignment)
        return self._instance_layers

    def _tied_ids(self, linear: dict[str, torch.nn.Module] | None, mb: MicroBatch) -> dict[str, torch.Tensor]:
        """Output projection tied to an input embedding -> the batch's distinct token ids (U,), sorted."""
        if linear is None:
            return {}
        emb = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        dev = next(self.model.parameters()).device
        ids = torch.unique(mb.batch.input_ids.to(dev))
        return {n: ids for n, m in linear.items() if id(m.weight) in emb}

    @property
    def took_form_choice(self) -> bool:
        """Whether a step of this run could take the instance form (and so chose)."""
        return self._form_choice is not None

    def form_choice(self, engine: Engine) -> FormChoice:
        """The run's choice of the Linear layers' per-instance form (:class:`~geffect.engine.instanceform.FormChoice`)."""
        if self._form_choice is None:
            self._form_choice = FormChoice(engine.cfg.instance_form, next(self.model.parameters()).device,
                                           sum(m.weight.numel() for m in self._instance_linear().values()))
        return self._form_choice

    def groups_of(self) -> dict[int, str]:
        if self._groups_of is None:
            self._groups_of = param_groups(self.model, self.capturer().assignment)
        return self._groups_of

    def __call__(self, micro: list[MicroBatch], due: Due = NOTHING, optimizer=None, lr: float | None = None,
                 clip: float | None = None) -> StepResult:
        t0 = time.perf_counter()
        self.phases = ph = Phases()
        self._known_squares = {}
        method, engine = self.method, self.engine if due.any else None
        direction = engine.cfg.direction if engine else "grad"
        if direction == "update" and optimizer is None:
            raise ValueError("direction 'update' needs an optimizer step")
        parts_due = method.has_retain_part and (method.pcgrad or (engine is not None and due.conflicts))
        single = len(micro) == 1 and not self.world.active
        # group G-effects alone (--no-instances) of GA and GD: three dots per tensor, no capture but the
        # tied embeddings' (geffect.engine.grouponly)
        group_only = (engine is not None and not engine.cfg.instances and due.effects and not due.pairs
                      and direction == "grad" and single and method.group_only_candidate
                      and self._tied() is not None)
        # group-only: the conflict statistics and the G-effects from three dots per tensor. One forward
        # and one backward, each Linear layer's weight gradient formed as its two parts
        # (geffect.engine.partsform), every other module's forget part formed from its captured
        # cotangents; GA (the retain risk is not in L): the backward of L + n_r·R_r, the retain part
        # kept out of .grad. Where a Linear weight is shared otherwise: two passes, forget part then
        # retain part, each over its own rows' forward chunk (TwoPassDots)
        linear = self._parts_linear() if group_only else None
        self._parts_form = (PartsForm(self.model, linear, micro[0].batch.segments, self._tied_ids(linear, micro[0]),
                                      keep_retain=method.has_retain_part) if linear is not None else None)
        dots = (TwoPassDots(self.params, keep_first=method.has_retain_part, phases=ph)
                if group_only and linear is None else None)
        if linear is not None:
            capturer = Capture(self.model, {n: g for n, g in engine.assignment.items() if n not in linear})
        elif group_only:
            tied = self._tied()
            capturer = Capture(self.model, {n: engine.assignment[n] for n in tied}) if tied else None
        else:
            capturer = engine if engine is not None else (self.capturer() if parts_due else None)
        # profiling an objective that never reads the retain rows (GA, NPO, SimNPO alone): they get
        # their own forward chunk, so the risk backward they need (the forget rows reuse the training
        # backward) covers them alone
        retain_chunk = (engine is not None and engine.cfg.reuse_backward and not method.has_retain_part
                        and method.reuse_candidate and not self.world.active     # DDP: one forward per backward
                        and self._parts_form is None)                            # group-only: one forward
        keep_training = (parts_due and not group_only) or (engine is not None and due.pairs)
        # along ∇L with everything known at the end of this one backward: take each module's values
        # as its gradient completes and free its captured tensors then (see Engine.backward)
        # (not across processes: a module's .grad is complete only after the gradient reduction)
        stream = (engine is not None and not group_only and engine.cfg.stream and due.effects and direction == "grad"
                  and len(micro) == 1 and not method.pcgrad and not self.world.active)
        # streamed along ∇L on the reuse path: the Linear layers' per-row products formed in the training
        # backward itself (geffect.engine.instanceform)
        # (the instance form or one more product per layer: on CPU by default timed on the run's first steps)
        formable = stream and not checkpointing(self.model) and bool(self._instance_linear())
        self._instance_form = (InstanceForm(self._instance_linear(), len(micro[0].batch.input_ids),
                                            micro[0].batch.segments["retain"], parts_due)
                               if formable and self.form_choice(engine).use() else None)
        took_form = self._instance_form is not None
        scalars: dict[int, tuple] = {}
        pairs: list[PairsAccumulator] = []
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        device = next(self.model.parameters()).device
        micro = [replace(mb, batch=mb.batch.to(device)) for mb in micro]
        res = StepResult(dict.fromkeys(("loss", "loss_forget", "loss_retain", "nll_forget", "nll_retain"), 0.0), None)
        captured, sources, weights, factors = [], [], [], []
        for mb in micro:
            form = self._parts_form or self._instance_form
            with form if form is not None else nullcontext():
                parts, fo, cap = self._micro_step(mb, len(micro), None if group_only else engine, capturer, retain_chunk,
                                                  keep_training, res, stream,
                                                  scalars if stream and parts_due else None,
                                                  pairs if engine is not None and due.pairs else None, dots,
                                                  factors if group_only else None)
            if group_only:
                res.path = "one-pass" if dots is None else "two-pass"
                keep_first = dots.keep_first if dots is not None else method.has_retain_part
                with ph("effects"):
                    if dots is not None:
                        per_tensor = dots.result()
                    else:         # (⟨g_f, g_r⟩, ‖g_f‖², ‖g_r‖²); GA: X = g_r (n_r·∇R_r), Y = g_f
                        per_tensor = one_pass_scalars(self.model, self._parts_form, cap, mb.batch.segments)
                        if not keep_first:
                            per_tensor = {k: (xy, rr, ff) for k, (xy, ff, rr) in per_tensor.items()}
                    res.effects.append(group_effects(self.model, engine.assignment, engine.groups, per_tensor,
                                                     keep_first, *factors, mb.batch.segments, cap))
                scalars = per_tensor if parts_due else {}
                self._known_squares = known_squares(self.params, per_tensor, keep_first)
                cap = None
            if cap is not None:
                captured.append(Captured(cap, mb.batch.segments, mb.forget_index, mb.retain_index,
                                         parts.instance_weights()))
            if engine is not None and engine.cfg.instances:      # per-token NLL rows (and e_{i,t} when due)
                sources.append(TokenSource.of(mb.batch, fo, parts.token_weight, mb.forget_index))
            weights.append(parts.weight_values())
            del fo             # the (N, T, V) logits are not needed past this point
        self._parts_form = self._instance_form = None          # (their sites' values are taken)
        if parts.retain is None:
            res.losses["loss_retain"] = float("nan")
        res.weights = torch.cat(weights) if all(w is not None for w in weights) else None
        for acc in pairs:            # the modules not streamed during the backward
            with ph("pairs"):
                acc.add([n for n in engine.assignment if n in acc.c.cap.seen])
            res.pairs.append(acc.result())
        if parts_due:
            with ph("conflicts"):
                if not group_only:   # the modules not streamed during the backward
                    held = {n: g for n, g in capturer.assignment.items() if any(n in c.cap.seen for c in captured)}
                    scalars |= part_scalars(self.model, held, captured, self.world)
                assignment = engine.assignment if engine is not None else capturer.assignment
                res.conflicts, coef = plan(scalars, self.groups_of(), self.scope, apply=method.pcgrad)
                if method.pcgrad:
                    apply_coefficients(self.model, assignment, captured, coef, self.world)
        if engine is None:
            for c in captured:
                c.cap.release()
        self._finish(engine, direction, captured, sources, due, res, optimizer, lr, clip)
        if formable:
            self.form_choice(engine).observe(took_form, sum(ph.seconds[k] for k in FORM_PHASES),
                                             micro[0].batch.input_ids.numel(), pairs=due.pairs)
        if engine is not None and not engine.cfg.instances:     # group means only
            res.effects = [e if e.means is not None else e.group_only() for e in res.effects]
        res.seconds = time.perf_counter() - t0
        res.phases = ph.seconds
        return res

    def _check(self, res: StepResult, captured: list[Captured] = ()) -> None:
        """‖∇L‖ and whether the loss and the gradient are finite. One pass over the gradients, less
        those whose ‖.grad‖² the engine already took from the finished gradient (streamed Linear layers,
        group-only's per-tensor dots)."""
        known, rest, host, on_host = [], [], 0.0, False
        for p in self.params:
            if p.grad is None:
                continue
            hit = self._known_squares.get(id(p))           # group-only: from the parts' dots, on the host
            if hit is not None and hit[0] is p.grad and hit[1] == p.grad._version:
                host, on_host = host + hit[2], True
                continue
            sq = None if self.world.active else next(
                (s for c in captured if (s := c.cap.known_grad_square(p)) is not None), None)
            (known if sq is not None else rest).append(sq if sq is not None else p.grad)
        if known or on_host:
            parts = ([torch.stack(known).sum()] if known else []) + (
                [torch.nn.utils.get_total_norm(rest).double().square()] if rest else [])
            res.grad_norm = math.sqrt(host + (sum(parts).item() if parts else 0.0))
        else:
            res.grad_norm = self.world.grad_norm(rest)
        if not math.isfinite(res.losses["loss"]):
            res.nonfinite.append("loss")
        if not math.isfinite(res.grad_norm):
            res.nonfinite.append("gradient")

    def _finish(self, engine, direction, captured, sources, due, res, optimizer, lr, clip) -> None:
        """The probe, the records along the chosen direction, clipping and the update (not taken
        when the loss or the gradient is not finite, unless ``on_nonfinite`` is continue)."""
        ph = self.phases
        with ph("optimizer"):
            self._check(res, captured)
        probe = engine is not None and due.probe and bool(self.probe)
        snapshot = None
        if engine is not None and direction == "grad":
            # along the raw ∇L, at the weights before the step and before clipping scales the
            # gradients in place; the captured tensors are freed before the optimizer allocates
            self._measure(engine, engine.direction_from_grads(), captured, probe, sources, due, res)
        elif engine is not None:
            # along the update: the probe's cotangents at the weights before it, kept until then
            with ph("probe"):
                if not probe:
                    probe = None
                elif self.base_probe is not None:      # (captures, shared)
                    probe = self.base_probe.captures(engine, self.probe)
                else:
                    probe = ([engine.capture_probe(p) for p in self.probe], False)
            with ph("effects"):
                snapshot = engine.snapshot()
        res.applied = optimizer is not None and (res.finite or self.on_nonfinite == "continue")
        if res.applied:
            with ph("optimizer"):
                if clip is not None:
                    res.clipped = res.grad_norm > clip
                    torch.nn.utils.clip_grad_norm_(self.params, clip)
                optimizer.step()
                if self.base_probe is not None:
                    self.base_probe.left_base()
        if snapshot is not None and not lr:   # a warm-up step at lr 0 moves nothing: no direction to measure
            for c in captured:
                c.cap.release()
            snapshot = None
        if snapshot is not None:   # along the update −Δθ/η, at the weights before it
            before = {n: snapshot[id(p)] for n, p in self.model.named_parameters() if id(p) in snapshot}
            with ph("effects"):
                V = engine.direction_from_update(snapshot, lr, inplace=not due.tokens)
            self._measure(engine, V, captured, probe, sources, due, res, params=before if due.tokens else None)
        if any(not bool(torch.isfinite(e.forget).all() and torch.isfinite(e.retain).all()) for e in res.effects):
            res.nonfinite.append("geffect")

    def _micro_step(self, mb: MicroBatch, n: int, engine, capturer, retain_chunk: bool, keep_training: bool,
                    res: StepResult, stream: bool = False, scalars: dict | None = None,
                    pairs: list | None = None, dots: TwoPassDots | None = None,
                    factors: list | None = None) -> tuple[Parts, ForwardOut, object]:
        """Forward, parts and backward of one micro-batch (loss scaled by 1/n for accumulation).
        ``scalars`` collects the parts' per-tensor statistics, and a new accumulator appended to
        ``pairs`` the Fig. 5b pairs, of the modules streamed in the backward. ``dots``: the backward
        in two passes over the two parts' forward chunks (forget part first; with ``keep_first``
        off, the retain risk's own backward first), their per-tensor dots taken; ``factors``
        (group-only, no engine) receives the parts' per-split factors (c_f, c_r)."""
        method, batch = self.method, mb.batch
        ctx = capturer.capture() if isinstance(capturer, Engine) else capturer   # a Capture: group-only's own
        with ctx if ctx is not None else nullcontext() as cap:
            if cap is not None:
                cap.keep_training = keep_training
            chunks = part_rows(batch.segments) if retain_chunk or dots is not None else None
            ph = self.phases
            with ph("forward"):
                fo, parts, backprop, (sf, sr) = self._forward_parts(mb, n, cap, chunks, dots, factors)
            loss = parts.total
            if not (torch.is_tensor(loss) and loss.requires_grad):
                pass                       # a micro-batch that carries no part (rows only measured)
            elif engine is not None:
                acc = None
                if pairs is not None:
                    acc = PairsAccumulator(self.model, engine.assignment, engine.groups,
                                           Captured(cap, batch.segments, mb.forget_index, mb.retain_index,
                                                    parts.instance_weights()), self.world)
                    pairs.append(acc)

                def on_modules(names, products, cap=cap, acc=acc):
                    if scalars is not None:
                        with ph("conflicts"):
                            scalars.update(streamed_part_scalars(self.model, names, cap, batch.segments, products,
                                                                 span_of(batch.segments)))
                    if acc is not None:
                        with ph("pairs"):
                            acc.add(names)
                with ph("backward"):
                    res.path = engine.backward(cap, fo, loss, method.reuse_candidate, backprop=backprop,
                                               stream=stream, on_modules=on_modules, phases=ph,
                                               parts_stats=scalars is not None, pairs=acc is not None,
                                               form=self._instance_form)
            elif cap is not None:
                # group-only: the tied embeddings' cotangents (two passes); every captured module's
                # training cotangents (one pass), the Linear layers' parts formed in the backward
                one_pass = self._parts_form is not None
                cap.stash = backprop is not None or one_pass
                cap.keep_training = cap.keep_training or one_pass
                if one_pass:
                    self._parts_form.arm()
                    self._parts_form.stream(cap, batch.segments)
                with ph("backward"):
                    training_backward(cap, backprop or loss.backward)
                cap.stash = False
                if one_pass:
                    self._parts_form.arm(False)
            else:
                with ph("backward"):
                    (backprop or loss.backward)()
        res.losses["loss"] += parts.total.item() if torch.is_tensor(parts.total) else float(parts.total)
        res.losses["loss_forget"] += parts.forget.item() * sf
        res.losses["loss_retain"] += (parts.retain.item() if parts.retain is not None else 0.0) * sr
        res.losses["nll_forget"] += fn.nll_loss(*fo.seg("forget")).item() * sf if sf > 0 else 0.0
        res.losses["nll_retain"] += fn.nll_loss(*fo.seg("retain")).item() * sr if sr > 0 else 0.0
        return parts, fo, cap

    def _forward_parts(self, mb: MicroBatch, n: int, cap, chunks, dots: TwoPassDots | None,
                       factors: list | None):
        """θ's forward (in ``chunks``), θ_o's values and the objective's parts; with ``dots``, the
        two-pass backward to run. -> (ForwardOut, Parts, backprop or None, (s_f, s_r))"""
        method, batch = self.method, mb.batch
        fo = forward(self.forward_model, self.reference, batch, method, self.ctx, chunks, cap)
        sf, sr = mb.shares if mb.shares is not None else (1.0 / n, 1.0 / n)
        backprop = None
        if dots is not None and method.has_retain_part:    # each part on its own chunk's view
            pf = method.parts(fo.views[0], self.ctx, retain_part=False, forget_part=sf > 0, shares=(sf, sr))
            pr = method.parts(fo.views[1], self.ctx, retain_part=sr > 0, forget_part=False, shares=(sf, sr))
            parts = Parts(pf.forget, pr.retain, pf.total + pr.total, pf.instance_weight, pf.token_weight)
            backprop = two_passes(pf.total, pr.total, dots)
        else:
            # with a retain chunk: on the forget-side chunk's view (the loss reads only it)
            parts = method.parts(fo.views[0] if chunks is not None else fo, self.ctx, retain_part=sr > 0,
                                 forget_part=sf > 0, shares=(sf, sr))
            if dots is not None:      # GA alone, group-only: the retain risk's backward, then the loss's
                r = batch.segments["retain"]
                backprop = two_passes(fn.mean_nll(fo.views[1].nll[r], fo.mask[r]).sum(), parts.total, dots)
            elif self._parts_form is not None and not self._parts_form.keep_retain:
                # GA alone, group-only in one pass: L and the retain risk in one backward (partsform)
                r = batch.segments["retain"]
                both = fn.mean_nll(fo.nll[r], fo.mask[r]).sum()
                if torch.is_tensor(parts.total) and parts.total.requires_grad:
                    both = both + parts.total
                backprop = both.backward
        if factors is not None:
            factors += split_factors(fo, parts.total, method.has_retain_part)
        return fo, parts, backprop, (sf, sr)

    def _measure(self, engine: Engine, V: dict, captured: list[Captured], probe, sources: list[TokenSource],
                 due: Due, res: StepResult, params: dict | None = None) -> None:
        """Per-token effects, then the batch's and the probe's effects along V (frees the captures).
        ``probe``: True (capture each probe chunk now, one at a time), (the captured chunks, whether
        they are shared and stay held), or None."""
        # per-token jvp needs every weight whole: not under FSDP (the tokens' NLLs and weights still are)
        jvp_ok = due.tokens and not self.world.sharded
        ph = self.phases
        effects = None
        if jvp_ok:
            with ph("tokens"):
                effects = [src.effects(self.model, V, params) for src in sources]
        res.tokens = [src.tokens(effects[k] if effects is not None else None) for k, src in enumerate(sources)]
        if due.effects and captured:       # (group-only: taken from the backward already)
            with ph("effects"):
                res.effects.append(engine.effects(captured, V))
        for c in captured:
            c.cap.release()
        if probe:      # chunk by chunk: each captured, measured and released before the next
            chunks, shared = probe if probe is not True else ((engine.capture_probe(p) for p in self.probe), False)
            with ph("probe"):
                res.effects.append(Effects.concat([engine.effects([c], V, source="probe", release=not shared)
                                                   for c in chunks]))


def known_squares(params: list[torch.nn.Parameter], per_tensor: dict[int, tuple], keep_first: bool) -> dict:
    """Group-only: each tensor's ‖.grad‖² from its parts' dots (X, Y) = (g_f, g_r) with ``.grad`` = X + Y
    (``keep_first``: ‖X‖² + 2⟨X, Y⟩ + ‖Y‖²), else ``.grad`` = Y (GA): ‖Y‖². Where X + Y nearly cancels
    (below 1e-3 of ‖X‖² + ‖Y‖²) the sum would lose digits: left to a pass over the gradient.
    -> {id(param): (.grad, its version, ‖.grad‖²)} for the step's gradient norm."""
    out = {}
    for p in params:
        v = per_tensor.get(id(p))
        if v is None or p.grad is None:
            continue
        xy, xx, yy = v
        sq, scale = (xx + 2 * xy + yy, xx + yy) if keep_first else (yy, yy)
        if sq >= 1e-3 * scale:
            out[id(p)] = (p.grad, p.grad._version, sq)
    return out


def two_passes(first, second, dots: TwoPassDots):
    """The training backward as two passes (``first``, then ``second``; a part that is not a tensor
    with a gradient is skipped), ``dots`` taking per-tensor products as the second arrives."""
    def run(x) -> None:
        if torch.is_tensor(x) and x.requires_grad:
            x.backward()

    def backprop() -> None:
        with dots:
            run(first)
            dots.arm()
            run(second)
    return backprop
