"""The unlearning loop, written in the project (no HF Trainer): sample, step, record.

Each optimizer step is one :class:`~geffect.step.Step` call on ``grad_accum`` micro-batches; what
the engine measures at a step comes from its :class:`~geffect.engine.schedule.Schedule`; every
record goes through one :class:`~geffect.records.RecordWriter` into the run directory, flushed
each step. Checkpoints (``--checkpoint-every``, and on Ctrl-C or SIGTERM after the current step)
make the staging folder resumable (:func:`resume`); a non-finite loss, gradient or G-effect stops
the run (``--on-nonfinite``), its records kept.
"""
from __future__ import annotations

import gc
import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Self

import torch
from tqdm.auto import tqdm

from geffect import checkpoint
from geffect.config import Hyper, ProfileConfig, UnlearnConfig
from geffect.data.sampling import BatchStream
from geffect.distributed import SINGLE, World
from geffect.engine.groups import GROUPS
from geffect.engine.schedule import NOTHING, Schedule
from geffect.errors import DivergenceError, Interrupted
from geffect.eval.nll import default_evaluation
from geffect.models import LoadedModel
from geffect.optim import lr_schedule, make_optimizer, total_steps
from geffect.records import RecordWriter
from geffect.reference import Reference
from geffect.rundir import RunDir
from geffect.session import prepare
from geffect.step import Step


def unlearn(cfg: UnlearnConfig, out: str | None = None, hyper: Hyper | None = None, overwrite: bool = False,
            loaded: LoadedModel | None = None, profile: ProfileConfig | None = None, evaluate=None,
            reference: Reference | None = None, resume: bool = False, base_probe=None) -> dict:
    """Run unlearning; write the run directory ``out`` (if given). Returns a summary dict with the
    records (``records``, ``geffect``, ``instances``, ``conflicts``, ``pairs``, ``tokens``: lists of rows).

    ``profile`` turns on the G-effect engine: the same forward and backward that train the model
    yield per-group and per-instance G-effects. ``evaluate(model) -> dict`` replaces the before/after
    evaluation (default: NLL of the forget set, the retain set and the perturbed forget answers).
    ``reference`` is θ_o to use instead of one made from the starting weights. ``resume``
    continues the interrupted run in ``out`` (its staging folder) from its last checkpoint.
    ``base_probe`` (:class:`~geffect.engine.probe.BaseProbe`): the probe's captures at the starting
    weights, shared with other runs that start from them.
    """
    world = World.init(cfg.parallel, cfg.device)   # a single process unless launched by torchrun
    if world.active:
        cfg = replace(cfg, device=world.device(cfg.device), progress=cfg.progress and world.main)
        world.check_batch(cfg.forget_batch, cfg.retain_batch)
        profile = _distributed_profile(profile, world, cfg)
    run = RunDir(out, overwrite, resume)          # refuses an unsafe OUT before any work (every rank checks)
    ckpt_dir = Path(out) if resume else None      # every rank reads the checkpoint; rank 0 alone writes
    if not world.main:
        run = RunDir(None)
    s = prepare(cfg, hyper, loaded, reference, profile)
    forward_model = world.wrap(s.model)           # before the optimizer: FSDP replaces the parameters
    step, schedule = make_step(s, profile, world, forward_model, base_probe), Schedule.of(profile)
    evaluator = make_evaluator(s, profile)
    with run, StopOnSignal() as stop:
        evaluate = evaluate or partial(default_evaluation, tok=s.tokenizer, data=s.data, max_length=cfg.max_length,
                                       fmt=cfg.prompt_format)
        optimizer = make_optimizer(cfg, step.params)
        stream = BatchStream(s.tokenizer, s.method.segments, s.data, cfg.forget_batch, cfg.retain_batch,
                             cfg.max_length, cfg.seed, cfg.prompt_format)
        n_steps = total_steps(cfg, len(s.data.forget))
        lr_at = lr_schedule(cfg, n_steps)
        start, carry = 0, {}
        if resume:
            manifest = checkpoint.load(ckpt_dir, s.model, optimizer, stream)
            start, carry = manifest["step"] + 1, manifest["carry"]
        else:
            run.write_json("config.json", {"run": asdict(cfg), "objective": s.method.config(),
                                           "hyper": asdict(s.method.hyper)} | ({"profile": asdict(profile)} if profile else {}))
        if carry.get("before") is None:
            carry["before"] = evaluate(s.model)
        if step.engine is not None and carry.get("instance_form") is not None:     # the choice made before
            step.form_choice(step.engine).restore(carry["instance_form"])
        groups = step.engine.groups if step.engine else list(GROUPS)
        with RecordWriter(run.path, groups, resume_after=start - 1 if resume else None) as rec, setup_frozen():
            s.model.train()
            bar = tqdm(range(start, n_steps), desc=f"{'profile' if profile else 'unlearn'} {s.method.name}",
                       disable=not cfg.progress, initial=start, total=n_steps)
            t_start, stopped, early = time.perf_counter() - carry.get("elapsed", 0.0), None, None
            cosine_stop = rmu_cosine_stop(s, world)
            eval_before = carry.get("eval_seconds", 0.0)       # evaluation time before a resume
            for k in bar:
                if evaluator is not None and k % profile.eval_every == 0:
                    rec.add("eval", evaluator(s.model, k))
                t0, lr = time.perf_counter(), lr_at(k)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micro = [world.shard(stream.next()) for _ in range(cfg.grad_accum)]   # this rank's rows
                res = world.merge(step(micro, schedule.at(k) if schedule else NOTHING, optimizer, lr, cfg.clip))
                rec.add_step(k, lr, res, time.perf_counter() - t0, decode=lambda i: s.tokenizer.decode([i]),
                             scope=cfg.pcgrad_scope)
                bar.set_postfix(loss=f"{res.losses['loss']:.3f}", nll_f=f"{res.losses['nll_forget']:.2f}",
                                nll_r=f"{res.losses['nll_retain']:.2f}")
                if not res.finite and cfg.on_nonfinite == "stop":
                    stopped = f"non-finite {' and '.join(res.nonfinite)} at step {k}"
                    break
                last = k == n_steps - 1
                if cosine_stop is not None and not last and (reason := cosine_stop(micro, k)):
                    early, n_steps = reason, k + 1      # a complete run, shorter: records, eval and save follow
                    break
                if world.active:          # a signal seen by one rank stops every rank at the same step
                    stop.requested = bool(world.sum_floats([float(stop.requested)])[0])
                if run.path is not None and not last and not world.sharded and (
                        stop.requested or cfg.checkpoint_every and (k + 1) % cfg.checkpoint_every == 0):
                    carry["elapsed"] = time.perf_counter() - t_start
                    carry["eval_seconds"] = eval_before + (evaluator.seconds if evaluator else 0.0)
                    if step.took_form_choice:
                        carry["instance_form"] = step.form_choice(step.engine).state()
                    checkpoint.save(run.path, k, s.model, optimizer, stream, carry)
                if stop.requested and not last:
                    raise Interrupted(f"stopped after step {k} of {n_steps}" + (
                        f"; continue with: geffect resume {run.path}" if run.path is not None else ""))
            if s.method.forget_entry.negate_after and not stopped:     # TVN: θ_base − λ·ΔW, adapters removed
                from geffect.lora import negate_adapters
                s.loaded = replace(s.loaded, model=negate_adapters(s.model, s.method.hyper.tvn_lambda))
            if evaluator is not None and not stopped:
                final = evaluator(s.model, n_steps)
                rec.add("eval", final)
            carry["eval_seconds"] = eval_before + (evaluator.seconds if evaluator else 0.0)
            elapsed = time.perf_counter() - t_start - carry["eval_seconds"]
            s.model.eval()
        summary = {"method": s.method.name, "steps": n_steps, "before": carry["before"], "after": evaluate(s.model),
                   "stopped_early": early,
                   "seconds_unlearning": elapsed, "seconds_per_step": elapsed / max(1, n_steps),
                   "device": str(s.device), "dtype": cfg.dtype, "status": stopped or "complete"}
        summary |= ({"groups": groups} if step.engine else {}) | rec.conflict_fraction(n_steps)
        if step.engine is not None and step.took_form_choice:       # which per-instance form the run took
            summary["instance_form"] = step.form_choice(step.engine).report()
        if evaluator is not None:
            summary |= {"seconds_eval": carry["eval_seconds"],
                        "eval_after": {r["metric"]: r["value"] for r in final} if not stopped else None}
        _finish(run, s, cfg, summary, world)
    world.barrier()               # no rank leaves before rank 0 has moved the run folder into place
    if stopped:
        err = DivergenceError(f"{stopped}: the run stopped (--on-nonfinite stop); its records up to there are in "
                              f"{summary.get('run_dir', 'no run folder (no --out)')}")
        err.run_dir = summary.get("run_dir")
        raise err
    return summary | rec.rows


def _finish(run: RunDir, s, cfg: UnlearnConfig, summary: dict, world: World = SINGLE) -> None:
    """summary.json, the model (unless the run diverged) and the move into place (rank 0)."""
    save = cfg.save_model and summary["status"] == "complete"
    state = None
    if save and world.sharded:      # every rank takes part in gathering the shards; rank 0 keeps them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(s.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    run.write_json("summary.json", summary)
    if run.path is None:
        return
    if save:
        s.model.save_pretrained(run.path / "model", state_dict=state, safe_serialization=True)
        s.tokenizer.save_pretrained(run.path / "model")
    summary["run_dir"] = str(run.commit())


def resume(path: str | Path, **kwargs) -> dict:
    """Continue the interrupted run whose staging folder is ``path`` (``OUT.partial``)."""
    path = Path(path)
    conf_file = path / "config.json"
    if not conf_file.is_file():
        from geffect.errors import RunDirError
        raise RunDirError(f"{path}: not an interrupted geffect run (no config.json)")
    conf = json.loads(conf_file.read_text(encoding="utf-8"))
    profile = ProfileConfig(**conf["profile"]) if "profile" in conf else None
    return unlearn(UnlearnConfig(**conf["run"]), str(path), Hyper(**conf.get("hyper", {})), profile=profile,
                   resume=True, **kwargs)


def rmu_cosine_stop(s, world: World = SINGLE):
    """RMU's early stop (the Spunge paper, App. C): a check after each step that says why to stop
    once the mean cosine similarity between block ℓ's activations on the step's forget rows under
    θ and under θ_o falls below ``--rmu-stop-cosine``; None when not asked."""
    thr = s.method.hyper.rmu_stop_cosine
    if thr is None:
        return None
    from geffect.objectives import functional as fn
    layer = s.ctx.hidden_layer

    @torch.no_grad()
    def check(micro, k: int) -> str | None:
        total = count = 0.0
        for mb in micro:
            b = mb.batch.to(next(s.model.parameters()).device)
            seg = b.segments["forget"]
            if seg.stop == seg.start:
                continue
            out = s.model(input_ids=b.input_ids[seg], attention_mask=b.attention_mask[seg],
                          output_hidden_states=True, use_cache=False)
            ref = s.reference.values(b, [], (), ("forget",), layer).hidden["forget"]      # (n, T, d) under θ_o
            t, c = fn.activation_cosine(out.hidden_states[layer + 1], ref, b.attention_mask[seg])
            total, count = total + t, count + c
        if world.active:
            total, count = world.sum_floats([total, count])
        cos = total / max(count, 1.0)
        return f"activation cosine {cos:.3f} < {thr:g} after step {k}" if cos < thr else None
    return check


def make_evaluator(s, profile: ProfileConfig | None):
    """The ``--eval-every`` evaluator of a run (None when off), its reference resolved up front."""
    if profile is None or not profile.eval_every:
        return None
    from geffect.eval.suite import EvalOptions, RunEvaluator
    cfg, ref = s.cfg, None
    if profile.eval_reference:
        from geffect.apps.evaluate import reference_truth_ratios
        overrides = {k: getattr(cfg, k) for k in ("forget", "retain", "tofu", "tofu_split", "max_length", "seed",
                                                  "device", "dtype", "prompt_format")}
        ref = reference_truth_ratios(profile.eval_reference, overrides,
                                     EvalOptions(max_new_tokens=profile.eval_max_new_tokens),
                                     [str(i) for i in range(len(s.data.forget))])
    return RunEvaluator(s.tokenizer, s.data.forget, s.data.retain, cfg.prompt_format, cfg.max_length,
                        profile.eval_size, profile.eval_max_new_tokens, cfg.seed, ref)


def _distributed_profile(profile: ProfileConfig | None, world: World, cfg: UnlearnConfig) -> ProfileConfig | None:
    """What the engine cannot do across processes, said once (rank 0) and turned off; the rest runs."""
    if world.sharded and cfg.checkpoint_every and world.main:
        print("geffect: note: --checkpoint-every is not supported under --parallel fsdp yet; no checkpoints are "
              "written (the run cannot be resumed)", file=sys.stderr)
    if profile is None or not world.sharded:
        return profile
    if profile.tokens_every and world.main:
        print("geffect: note: per-token G-effects need every weight whole (a forward-mode jvp) and are not taken "
              "under --parallel fsdp; tokens.csv keeps the tokens' NLLs and weights", file=sys.stderr)
    return profile


def make_step(s, profile: ProfileConfig | None, world: World = SINGLE, forward_model=None, base_probe=None) -> Step:
    """The run's step, with the engine (and the probe set) when profiling."""
    from geffect.engine.engine import Engine
    from geffect.engine.probe import make_probe
    engine = Engine(s.model, profile) if profile is not None else None
    probe = None
    if profile is not None and profile.probe_every > 0:
        probe = make_probe(s.tokenizer, s.data, profile.probe_retain, s.cfg.max_length, s.cfg.seed,
                           profile.probe_forget, s.cfg.prompt_format, profile.probe_size, profile.probe_batch)
    return Step(s.model, s.method, s.reference, s.ctx, engine, probe, s.cfg.pcgrad_scope, s.cfg.on_nonfinite,
                world, forward_model, base_probe)


class StopOnSignal:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.requested, self._old = False, {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextmanager
def setup_frozen():
    """The steps run with everything allocated before them (the model, tokenizer, data: ~400k Python
    objects for SmolLM2) out of the cyclic garbage collector's generations (``gc.freeze``): its full
    collections, which fall inside the steps' forward and backward, then traverse only what the steps
    allocate (measured through the CLI: ~90 ms each against 400k objects). Unfrozen after the loop.
    A caller who froze objects already, or turned the collector off, is left to its own policy."""
    owner = gc.isenabled() and gc.get_freeze_count() == 0
    if owner:
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        if owner:
            gc.unfreeze()
