"""The unlearning loop, written in the project (no HF Trainer).

One step: one forward pass of θ over the forget/retain(/idk/mismatch) rows, one no-grad forward
of θ_o when the objective needs it, the objective's parts, one backward, an optimizer step.
Records one CSV row per optimizer step.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geffect.data.batching import Batch, check_lengths, collate, qa
from geffect.data.records import DataError, QARecord, load_records
from geffect.data.synthetic import default_splits, idk_answers
from geffect.layers import find_blocks
from geffect.models import DEFAULT_MODEL, LoadedModel, frozen_reference, load_model
from geffect.objectives import ForwardOut, Hyper, Method, MethodError, Parts, parse_method
from geffect.objectives import functional as fn
from geffect.rundir import RunDir
from geffect.surgery import SCOPES, combine, param_groups


@dataclass
class UnlearnConfig:
    """Settings of an unlearning run; the single source of defaults, CLI help and saved config."""
    method: str = field(default="npo+gd", metadata={"help": "forget objective [+ retain regulariser], "
                                                    "e.g. ga, gd, npo+gd, npo+kl, wga+kl, rmu, llmu"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "built-in name (smollm2-135m, tiny-llama, tiny-gpt2), local HF dir, .gguf file or hub id"})
    forget: str | None = field(default=None, metadata={
        "help": "forget set, TOFU-format JSON/JSONL (default: the bundled fictitious authors)"})
    retain: str | None = field(default=None, metadata={"help": "retain set (default: bundled)"})
    memorize: str = field(default="auto", metadata={
        "help": "first fine-tune on forget+retain so the facts are known (cached): auto = only for the "
                "bundled data, yes, no"})
    steps: int = field(default=20, metadata={"help": "optimizer steps (ignored if --epochs is set)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the forget set instead of --steps"})
    forget_batch: int = field(default=4, metadata={"help": "forget samples per micro-batch"})
    retain_batch: int = field(default=4, metadata={"help": "retain samples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or sgd"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=2, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    clip: float | None = field(default=None, metadata={"help": "clip the gradient norm to this value"})
    max_length: int = field(default=128, metadata={"help": "maximum tokens per row (prompt + answer)"})
    pcgrad: bool = field(default=False, metadata={
        "help": "PCGrad surgery on the forget and retain parts' gradients (same as appending +pcgrad "
                "to --method)"})
    pcgrad_scope: str = field(default="global", metadata={
        "help": "global (all parameters as one vector, the reference), group (per layer group) or "
                "tensor (per parameter tensor)"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, initialisation and RMU's control"})
    save_model: bool = field(default=True, metadata={"help": "save the final model (safetensors)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class Data:
    forget: list[QARecord]
    retain: list[QARecord]
    holdout: list[QARecord]
    idk: list[str]
    bundled: bool


def load_data(cfg: UnlearnConfig) -> Data:
    splits = default_splits(cfg.seed)
    forget = load_records(cfg.forget) if cfg.forget else splits["forget"]
    retain = load_records(cfg.retain) if cfg.retain else splits["retain"]
    for name, recs in (("forget", forget), ("retain", retain)):
        if not recs:
            raise DataError(f"empty {name} split")
    return Data(forget, retain, splits["holdout"] if not cfg.forget else [], idk_answers(),
                bundled=cfg.forget is None and cfg.retain is None)


class Sampler:
    """Cycles through a shuffled list, reshuffling each pass (seeded)."""

    def __init__(self, items: list, seed: int):
        self.items, self.rng, self.order, self.pos, self.passes = items, random.Random(seed), [], 0, 0

    def take(self, k: int) -> list:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.pos, self.passes = 0, self.passes + 1
            out.append(self.items[self.order[self.pos]])
            self.pos += 1
        return out


def make_batch(tok, method: Method, forget: list[QARecord], retain: list[QARecord], data: Data,
               rng: random.Random, max_length: int) -> Batch:
    segs = {"forget": qa(forget), "retain": qa(retain)}
    if "idk" in method.segments:
        segs["idk"] = [(r.question, rng.choice(data.idk), r.source) for r in forget]
    if "mismatch" in method.segments:
        segs["mismatch"] = [(r.question, rng.choice(data.retain).answer, r.source) for r in forget]
    return collate(tok, segs, max_length)


def part_rows(segments: dict[str, slice]) -> list[torch.Tensor]:
    """Row chunks of a batch for a backward split into parts: the forget-side rows (forget, idk,
    mismatch) and the retain rows. Each part's loss reads only its own chunk."""
    r = segments["retain"]
    n = max(s.stop for s in segments.values())
    rest = [i for i in range(n) if not r.start <= i < r.stop]
    return [torch.tensor(rest), torch.arange(r.start, r.stop)]


def forward(model, ref, batch: Batch, method: Method, rmu_layer: int | None = None,
            chunks: list[torch.Tensor] | None = None, cap=None) -> ForwardOut:
    """One forward of θ (with grad) and, if needed, one no-grad forward of θ_o on the same rows.

    ``chunks`` runs θ's forward separately on disjoint row sets (same total work) and reassembles
    the rows in order, so that a loss reading one chunk back-propagates through that chunk only;
    ``cap`` (a Capture) is told which rows each forward covers.
    """
    want_hidden = method.needs_hidden
    # Explicit (N, T) positions (right padding: 0..T-1 per row): position embeddings then see one
    # row per sample, so per-sample quantities stay per sample instead of a broadcast (1, T).
    pos = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    outs = []
    for idx in chunks or [None]:
        sel = slice(None) if idx is None else idx
        if cap is not None:
            cap.rows = idx
        outs.append(model(input_ids=batch.input_ids[sel], attention_mask=batch.attention_mask[sel],
                          position_ids=pos[sel], output_hidden_states=want_hidden, use_cache=False))
    if cap is not None:
        cap.rows = None
    if chunks is None:
        out = outs[0]
        nll, mask = fn.token_nll(out.logits, batch.labels)
        fo = ForwardOut(nll, mask, out.logits, batch.labels, batch.segments,
                        hidden=out.hidden_states[rmu_layer + 1] if want_hidden else None)
    else:
        fo = _chunked(outs, chunks, batch, rmu_layer if want_hidden else None, method.needs_ref_logits)
    if method.needs_ref:
        with torch.no_grad():
            r = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                    output_hidden_states=want_hidden, use_cache=False)
        for x in [fo, *(fo.views or [])]:
            x.ref_nll, _ = fn.token_nll(r.logits, batch.labels)
            x.ref_logits = r.logits if method.needs_ref_logits else None
            x.ref_hidden = r.hidden_states[rmu_layer + 1] if want_hidden else None
    return fo


def split_parts(method: Method, fo: ForwardOut, control) -> Parts:
    """The method's parts with the forget part from the forget-side chunk's view and the retain
    part from the retain chunk's view (see :func:`part_rows`)."""
    a, b = method.parts(fo.views[0], control, retain_part=False), method.parts(fo.views[1], control)
    return Parts(a.forget, b.retain, method.gamma * a.forget + method.alpha * b.retain,
                 a.instance_weight, a.token_weight)


def _chunked(outs, chunks: list[torch.Tensor], batch: Batch, hidden_layer: int | None,
             view_logits: bool) -> ForwardOut:
    """Reassemble per-chunk outputs in row order, plus one view per chunk in which the other chunks'
    rows are detached: a part computed on view k back-propagates through chunk k only (a
    concatenation would send zero gradients through every chunk). The views carry the (N, T, V)
    logits only when an objective reads them (``view_logits``: KL terms)."""
    order = torch.cat(chunks)
    inv = None if bool((order[1:] > order[:-1]).all()) else torch.argsort(order)

    def assemble(ts):
        t = torch.cat(ts)
        return t if inv is None else t[inv]

    per = [fn.token_nll(o.logits, batch.labels[idx]) for o, idx in zip(outs, chunks)]   # (n_k, T-1) each
    mask = assemble([m for _, m in per])
    hid = [o.hidden_states[hidden_layer + 1] for o in outs] if hidden_layer is not None else None
    views = []
    for k in range(len(outs)):
        def own(ts, k=k):
            return assemble([t if j == k else t.detach() for j, t in enumerate(ts)])
        views.append(ForwardOut(own([n for n, _ in per]), mask,
                                own([o.logits for o in outs]) if view_logits else None, batch.labels,
                                batch.segments, hidden=own(hid) if hid is not None else None))
    fo = ForwardOut(assemble([n for n, _ in per]), mask, None, batch.labels, batch.segments,
                    hidden=assemble(hid) if hid is not None else None)
    fo.views, fo.nll_leaves, fo.row_inv = views, [n for n, _ in per], inv
    return fo


@torch.no_grad()
def evaluate_nll(model, tok, records: list[QARecord], max_length: int = 128, batch_size: int = 16) -> float:
    """Risk R(D): mean over samples of the mean answer-token NLL."""
    vals = []
    for i in range(0, len(records), batch_size):
        b = collate(tok, {"x": qa(records[i:i + batch_size])}, max_length)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        vals.append(fn.mean_nll(*fn.token_nll(logits, b.labels)))
    return torch.cat(vals).mean().item()


@torch.no_grad()
def perturbed_nll(model, tok, records: list[QARecord], max_length: int = 128) -> float:
    """Mean NLL of the perturbed (wrong) answers, to show the true answers are known."""
    rows = [(r.question, p, r.source) for r in records for p in r.perturbed_answer]
    if not rows:
        return float("nan")
    fake = [QARecord(q, a, source=s) for q, a, s in rows]
    return evaluate_nll(model, tok, fake, max_length)


def weight_summary(parts: Parts) -> dict:
    w = parts.instance_weight if parts.instance_weight is not None else None
    if w is None and parts.token_weight is not None:
        tw = parts.token_weight
        w = tw[tw > 0] if (tw > 0).any() else tw.flatten()
    if w is None:
        return {}
    w = w.detach().float()
    return {"weight_mean": w.mean().item(), "weight_std": w.std().item() if w.numel() > 1 else 0.0,
            "weight_min": w.min().item(), "weight_max": w.max().item()}


def default_evaluation(model, tok, data: Data, max_length: int) -> dict:
    return {"nll_forget": evaluate_nll(model, tok, data.forget, max_length),
            "nll_retain": evaluate_nll(model, tok, data.retain, max_length),
            "nll_forget_perturbed": perturbed_nll(model, tok, data.forget, max_length)}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: UnlearnConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    return cfg.lr


def prepare(cfg: UnlearnConfig, hyper: Hyper | None = None, loaded: LoadedModel | None = None,
            reference=None):
    """Load data, model (memorised if asked), reference and method. Returns a dict of parts."""
    set_seed(cfg.seed)
    method = parse_method(cfg.method, hyper)
    if cfg.pcgrad and not method.pcgrad:
        if not method.has_retain_part:
            raise MethodError(f"--pcgrad needs a method with a retain part (e.g. {method.forget}+gd), "
                              f"got --method {cfg.method!r}")
        method = replace(method, pcgrad=True)
    if cfg.pcgrad_scope not in SCOPES:
        raise MethodError(f"unknown --pcgrad-scope {cfg.pcgrad_scope!r}; choose one of {', '.join(SCOPES)}")
    data = load_data(cfg)
    want_memorize = cfg.memorize == "yes" or (cfg.memorize == "auto" and data.bundled)
    if want_memorize and loaded is None:
        from geffect.memorize import cached
        # a cached memorised model needs no load of the base model (saves ~17 s for the GGUF)
        hit = cached(cfg.model, data.forget + data.retain, seed=cfg.seed)
        if hit is not None:
            loaded, want_memorize = hit, False
    if loaded is None:
        loaded = load_model(cfg.model, seed=cfg.seed)
    tok = loaded.tokenizer
    check_lengths(tok, data.forget + data.retain, cfg.max_length)
    if want_memorize:
        from geffect.memorize import memorize
        loaded = memorize(loaded, data.forget + data.retain, max_length=cfg.max_length, seed=cfg.seed,
                          progress=cfg.progress)
    model = loaded.model
    rmu_layer = None
    if method.needs_hidden:
        _, blocks = find_blocks(model)
        rmu_layer = method.rmu_layer(len(blocks))
        model.requires_grad_(False)
        for b in blocks[max(0, rmu_layer - 2): rmu_layer + 1]:
            b.requires_grad_(True)
    ref = (reference if reference is not None else frozen_reference(model)) if method.needs_ref else None
    control = None
    if method.needs_hidden:
        control = fn.rmu_control(model.config.hidden_size, method.hyper.rmu_coeff, cfg.seed)
    return {"method": method, "data": data, "loaded": loaded, "model": model, "tok": tok, "ref": ref,
            "rmu_layer": rmu_layer, "control": control}


def make_optimizer(cfg: UnlearnConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    raise ValueError(f"unknown --optimizer {cfg.optimizer!r}; choose adamw or sgd")


def total_steps(cfg: UnlearnConfig, n_forget: int) -> int:
    if cfg.epochs is not None:
        per = math.ceil(n_forget / (cfg.forget_batch * cfg.grad_accum))
        return max(1, math.ceil(cfg.epochs * per))
    return cfg.steps


def backward_parts(losses: list[torch.Tensor], part_grads: tuple[dict, ...], params: list) -> None:
    """The training backward split into the objective's parts (one forward, one backward per part):
    part k's parameter gradients are accumulated into ``part_grads[k]`` (id(param) -> tensor)."""
    for k, loss in enumerate(losses):
        if loss.requires_grad:
            loss.backward(retain_graph=k < len(losses) - 1)
        for p in params:
            if p.grad is not None:
                acc = part_grads[k]
                if id(p) in acc:
                    acc[id(p)].add_(p.grad)
                else:
                    acc[id(p)] = p.grad
                p.grad = None


@dataclass
class TokenSource:
    """What the per-token records of one micro-batch's forget rows need (no logits kept)."""
    batch: Batch
    forget: slice
    nll: torch.Tensor            # (n_f, T-1)
    mask: torch.Tensor           # (n_f, T-1)
    weight: torch.Tensor | None  # (n_f, T-1) token weights of token-weighted objectives
    forget_index: list[int]

    @classmethod
    def of(cls, batch: Batch, fo: ForwardOut, parts: Parts, forget_index: list[int]) -> TokenSource:
        s = fo.segments["forget"]
        tw = parts.token_weight.detach() if parts.token_weight is not None else None
        return cls(batch, s, fo.nll[s].detach(), fo.mask[s], tw, forget_index)

    def effects(self, model, V: dict, params: dict | None = None) -> torch.Tensor:
        """Per-token unlearning G-effects e_{i,t} = ∇nll_{i,t}ᵀV of the forget rows. -> (n_f, T-1)"""
        from geffect.engine.tokens import token_effects
        b, s = self.batch, self.forget
        return token_effects(model, b.input_ids[s], b.attention_mask[s], b.labels[s], V, params)

    def records(self, step: int, tok, effects: torch.Tensor | None) -> list[dict]:
        """Per answer token: its text, NLL, the objective's token weight and (when measured) e_{i,t}."""
        labels = self.batch.labels[self.forget, 1:]
        rows = []
        for i, ds_index in enumerate(self.forget_index):
            for pos in self.mask[i].nonzero().flatten().tolist():
                rows.append({"step": step, "index": ds_index, "position": pos,
                             "token": tok.decode([int(labels[i, pos])]), "nll": self.nll[i, pos].item(),
                             "weight": self.weight[i, pos].item() if self.weight is not None else float("nan"),
                             "geffect": effects[i, pos].item() if effects is not None else float("nan")})
        return rows


def step_records(engine, step: int, captured: list, probe, probe_cap, V: dict, effect_rows: list,
                 instance_rows: list) -> None:
    """Append one step's G-effect and per-instance rows (batch, and the probe set when captured);
    releases the captured tensors."""
    er, ir = engine.records(step, captured, V)
    if probe_cap is not None:
        er2, ir2 = engine.records(step, [(probe_cap, probe.segments, probe.forget_index, probe.retain_index,
                                          None)], V, source="probe")
        er, ir = er + er2, ir + ir2
    effect_rows.extend(er)
    instance_rows.extend(ir)


def instance_weights(parts: Parts) -> torch.Tensor | None:
    """Per forget instance: the NPO-family weight, or the mean token weight over answer tokens."""
    if parts.instance_weight is not None:
        return parts.instance_weight.detach()
    if parts.token_weight is not None:
        tw = parts.token_weight.detach()
        return tw.sum(-1) / (tw > 0).sum(-1).clamp_min(1)
    return None


def unlearn(cfg: UnlearnConfig, out: str | None = None, hyper: Hyper | None = None,
            overwrite: bool = False, loaded: LoadedModel | None = None, profile=None, evaluate=None,
            reference=None) -> dict:
    """Run unlearning; write the run directory ``out`` (if given). Returns a summary dict.

    ``profile`` (a :class:`geffect.engine.ProfileConfig`) turns on the G-effect engine: the same
    forward and backward that train the model yield per-group and per-instance G-effects, written
    to ``geffect.csv`` and ``instances.csv``. ``evaluate(model) -> dict`` replaces the before/after
    evaluation (default: NLL of the forget set, the retain set and the perturbed forget answers).
    ``reference`` is a frozen copy of the *starting* weights to use as θ_o instead of a new copy.
    """
    from contextlib import nullcontext

    run = RunDir(out, overwrite) if out else None
    try:
        st = prepare(cfg, hyper, loaded, reference)
        method, data, model, tok, ref = st["method"], st["data"], st["model"], st["tok"], st["ref"]
        evaluate = evaluate or (lambda m: default_evaluation(m, tok, data, cfg.max_length))
        before = evaluate(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(cfg, params)
        index = {id(r): i for i, r in enumerate(data.forget)} | {id(r): i for i, r in enumerate(data.retain)}
        fs, rs = Sampler(data.forget, cfg.seed), Sampler(data.retain, cfg.seed + 1)
        rng = random.Random(cfg.seed + 2)
        n_steps = total_steps(cfg, len(data.forget))
        engine = probe = None
        if profile is not None:
            from geffect.engine.profiler import Engine, make_probe
            engine = Engine(model, profile)
            if profile.probe_every > 0:
                probe = make_probe(tok, data, profile.probe_retain, cfg.max_length, cfg.seed, profile.probe_forget)
        rows, effect_rows, instance_rows, conflict_rows, n_conflict, token_rows = [], [], [], [], {}, []
        pair_rows = []
        split = method.has_retain_part and (method.pcgrad or (engine is not None and profile.conflicts))
        # profiling an objective that never reads the retain rows (GA, NPO, SimNPO alone): they get
        # their own forward chunk, so the risk backward they need (the forget rows reuse the training
        # backward) covers them alone
        retain_chunk = (engine is not None and profile.reuse_backward and not method.has_retain_part
                        and not method.needs_hidden)
        groups_of = {}
        if split:
            from geffect.engine.groups import assign_groups
            groups_of = param_groups(model, engine.assignment if engine else assign_groups(model))
        model.train()
        bar = tqdm(range(n_steps), desc=f"{'profile' if engine else 'unlearn'} {method.name}",
                   disable=not cfg.progress)
        t_start = time.perf_counter()
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            acc = {"loss": 0.0, "loss_forget": 0.0, "loss_retain": 0.0, "nll_forget": 0.0, "nll_retain": 0.0}
            captured, token_src = [], []
            part_grads = ({}, {}) if split else None
            for _ in range(cfg.grad_accum):
                fb, rb = fs.take(cfg.forget_batch), rs.take(cfg.retain_batch)
                batch = make_batch(tok, method, fb, rb, data, rng, cfg.max_length)
                with (engine.capture() if engine else nullcontext()) as cap:
                    # with the backward split into parts, each part's rows get their own forward
                    fo = forward(model, ref, batch, method, st["rmu_layer"],
                                 part_rows(batch.segments) if split or retain_chunk else None, cap)
                    if split:
                        parts = split_parts(method, fo, st["control"])
                    else:   # with a retain chunk: on the forget-side chunk's view (the loss reads only it)
                        parts = method.parts(fo.views[0] if retain_chunk else fo, st["control"])
                    loss = parts.total / cfg.grad_accum
                    forget_part = method.gamma * parts.forget / cfg.grad_accum          # γ·L_f
                    backprop = loss.backward
                    if split:  # the same backward, run once per minimised part: γ·L_f and α·L_r
                        backprop = partial(backward_parts, [forget_part, method.alpha * parts.retain / cfg.grad_accum],
                                           part_grads, params)
                    if engine and profile.pairs_every > 0 and step % profile.pairs_every == 0:
                        pairs = engine.instance_pairs(cap, fo, forget_part)
                        pair_rows += engine.pair_records(step, pairs, [index[id(r)] for r in fb],
                                                         instance_weights(parts))
                    if engine:
                        engine.backward(cap, fo, loss, method.needs_hidden, backprop)
                    else:
                        backprop()
                if engine:
                    token_src.append(TokenSource.of(batch, fo, parts, [index[id(r)] for r in fb]))
                    captured.append((cap, batch.segments, [index[id(r)] for r in fb], [index[id(r)] for r in rb],
                                     instance_weights(parts)))
                acc["loss"] += parts.total.item() / cfg.grad_accum
                acc["loss_forget"] += parts.forget.item() / cfg.grad_accum
                acc["loss_retain"] += (parts.retain.item() if parts.retain is not None else 0.0) / cfg.grad_accum
                acc["nll_forget"] += fn.nll_loss(*fo.seg("forget")).item() / cfg.grad_accum
                acc["nll_retain"] += fn.nll_loss(*fo.seg("retain")).item() / cfg.grad_accum
                wsum = weight_summary(parts)
            if split:
                update, stats = combine(*part_grads, groups_of, cfg.pcgrad_scope, apply=method.pcgrad,
                                        inplace=True)
                for p in params:
                    p.grad = update.get(id(p))
                del update, part_grads
                for r in stats:
                    n_conflict[r["group"]] = n_conflict.get(r["group"], 0) + r["conflict"]
                    conflict_rows.append({"step": step, **r, "conflict_fraction": n_conflict[r["group"]] / (step + 1),
                                          "scope": cfg.pcgrad_scope})
            probe_cap = None
            if probe is not None and step % profile.probe_every == 0:
                probe_cap = engine.capture_probe(probe)
            V = engine.direction_from_grads() if engine else None
            tokens_due = engine is not None and profile.tokens_every > 0 and step % profile.tokens_every == 0
            effects, snapshot = None, None
            if engine and profile.direction == "grad":
                # along the raw ∇L, at the weights before the step and before clipping scales the
                # gradients in place; the captured tensors are freed before the optimizer allocates
                if tokens_due:
                    effects = [src.effects(model, V) for src in token_src]
                step_records(engine, step, captured, probe, probe_cap, V, effect_rows, instance_rows)
            elif engine:
                snapshot = {id(p): p.detach().clone() for p in params}
            if cfg.clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            if snapshot is not None:   # along the update −Δθ/η, at the weights before it
                if tokens_due:
                    V = {id(p): (snapshot[id(p)] - p.detach()) / lr for p in params}
                    before_step = {n: snapshot[id(p)] for n, p in model.named_parameters() if id(p) in snapshot}
                    effects = [src.effects(model, V, before_step) for src in token_src]
                else:                  # built in the snapshot's buffers
                    V = {id(p): snapshot[id(p)].sub_(p.detach()).div_(lr) for p in params}
                step_records(engine, step, captured, probe, probe_cap, V, effect_rows, instance_rows)
            for k, src in enumerate(token_src):
                token_rows += src.records(step, tok, effects[k] if effects is not None else None)
            del captured, probe_cap, V, snapshot
            row = {"step": step, **acc, "lr": lr, **wsum, "time_s": time.perf_counter() - t0}
            if parts.retain is None:
                row["loss_retain"] = float("nan")
            rows.append(row)
            bar.set_postfix(loss=f"{acc['loss']:.3f}", nll_f=f"{acc['nll_forget']:.2f}",
                            nll_r=f"{acc['nll_retain']:.2f}")
        model.eval()
        elapsed = time.perf_counter() - t_start
        after = evaluate(model)
        summary = {"method": method.name, "steps": n_steps, "before": before, "after": after,
                   "seconds_unlearning": elapsed, "seconds_per_step": elapsed / max(1, n_steps)}
        if engine:
            summary["groups"] = engine.groups
        if conflict_rows:
            summary["conflict_fraction"] = n_conflict.get("global", 0) / max(1, n_steps)
        if run is not None:
            conf = {"run": asdict(cfg), "objective": method.config()}
            if profile is not None:
                conf["profile"] = asdict(profile)
            run.write_json("config.json", conf)
            pd.DataFrame(rows).to_csv(run.path / "records.csv", index=False)
            if conflict_rows:
                pd.DataFrame(conflict_rows).to_csv(run.path / "conflicts.csv", index=False)
            if engine:
                pd.DataFrame(effect_rows).to_csv(run.path / "geffect.csv", index=False)
                pd.DataFrame(instance_rows).to_csv(run.path / "instances.csv", index=False)
                pd.DataFrame(token_rows).to_csv(run.path / "tokens.csv", index=False)
                if pair_rows:
                    pd.DataFrame(pair_rows).to_csv(run.path / "pairs.csv", index=False)
            run.write_json("summary.json", summary)
            if cfg.save_model:
                model.save_pretrained(run.path / "model", safe_serialization=True)
                tok.save_pretrained(run.path / "model")
            summary["run_dir"] = str(run.commit())
        summary["records"] = rows
        summary["geffect"] = effect_rows
        summary["instances"] = instance_rows
        summary["conflicts"] = conflict_rows
        summary["pairs"] = pair_rows
        summary["tokens"] = token_rows
        return summary
    except BaseException:
        if run is not None and run.path.exists():
            import shutil
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def config_fields():
    return fields(UnlearnConfig)
