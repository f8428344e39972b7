"""What a run works on, prepared once: the method, the data, the (memorised) model on its device in
its dtype, LoRA adapters, θ_o and the objective's own state.

:func:`preflight` checks everything that needs no model (options, method, device, LoRA syntax);
:func:`prepare` then loads, smoke-tests the model where it will run and checks the memory it
needs. Both come before any run directory is created, so bad input never leaves a folder behind.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from geffect.config import Hyper, ProfileConfig, UnlearnConfig, parse_boundaries, validate
from geffect.data.batching import check_lengths
from geffect.data.sampling import Data, load_data
from geffect.distributed import main_process
from geffect.engine.allocator import keep_freed_memory
from geffect.errors import ConfigError, DataError, MethodError
from geffect.hardware import check_fits, estimate_memory, model_device, resolve_device, smoke_test
from geffect.models import LoadedModel, load_model
from geffect.objectives import Method, ObjectiveContext, parse_method
from geffect.reference import Reference, make_reference


@dataclass
class Session:
    cfg: UnlearnConfig
    method: Method
    data: Data
    loaded: LoadedModel
    reference: Reference | None
    ctx: ObjectiveContext

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return model_device(self.model)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_method(cfg: UnlearnConfig, hyper: Hyper | None) -> Method:
    """``--method`` with ``--pcgrad`` folded in."""
    method = parse_method(cfg.method, hyper)
    if cfg.pcgrad and not method.pcgrad:
        if not method.has_retain_part:
            raise MethodError(f"--pcgrad needs a method with a retain part (e.g. {method.forget}+gd), "
                              f"got --method {cfg.method!r}")
        method = replace(method, pcgrad=True)
    return method


def preflight(cfg: UnlearnConfig, hyper: Hyper | None = None, profile: ProfileConfig | None = None,
              trains: bool = True) -> tuple[Method, torch.device]:
    """Every check that needs no model: option ranges, the method, the device, the LoRA spec."""
    validate(cfg)
    if trains and cfg.dtype == "float16" and cfg.optimizer == "adamw":
        raise ConfigError("--dtype float16 with --optimizer adamw: AdamW's second moments underflow in float16 "
                          "without loss scaling and the run turns to NaN; use --dtype bfloat16 (or float32)")
    validate(hyper or Hyper())
    if profile is not None:
        validate(profile)
        parse_boundaries(profile.boundaries)
    method = resolve_method(cfg, hyper)
    if method.hyper.rmu_stop_cosine is not None and method.forget_entry.reads != "hidden":
        raise ConfigError(f"--rmu-stop-cosine compares RMU's layer activations under θ and θ_o; --method "
                          f"{method.name} reads none (use rmu, rmu-wmdp or rmu-full)")
    device = resolve_device(cfg.device)
    if cfg.reference_device is not None:
        resolve_device(cfg.reference_device)
    if cfg.lora:
        from geffect.lora import parse_lora
        parse_lora(cfg.lora)
    elif method.forget_entry.negate_after:
        raise ConfigError(f"--method {method.name}: task-vector negation fine-tunes LoRA adapters and negates their "
                          "ΔW; pass --lora (the Spunge paper: --lora r=16,alpha=32,targets=q_proj,v_proj)")
    return method, device


def enable_checkpointing(model: torch.nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient "
                          "checkpointing; run without it (or with --lora, --dtype bfloat16 or smaller batches)")
    kwargs = {"use_reentrant": False}      # the engine follows non-reentrant recomputation only
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:                                  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # non-reentrant checkpointing needs no grad-requiring embedding output; HF's hook for it would
    # also break the forward-mode pass of the per-token G-effects
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    model.config.use_cache = False


def starting_model(cfg: UnlearnConfig, data: Data, device: torch.device, loaded: LoadedModel | None = None) -> LoadedModel:
    """The model a run starts from: ``cfg.model`` (or ``loaded``), memorised on the bundled data when
    asked (from the cache when it can). Warns if answers will be cut to ``--max-length``."""
    want_memorize = cfg.memorize == "yes" or (cfg.memorize == "auto" and data.bundled)
    if want_memorize and loaded is None:
        from geffect.memorize import cached
        # a cached memorised model needs no load of the base model (saves ~17 s for the GGUF)
        hit = cached(cfg.model, data.forget + data.retain, seed=cfg.seed, device=device, dtype=cfg.dtype,
                     fmt=cfg.prompt_format)
        if hit is not None:
            loaded, want_memorize = hit, False
    if loaded is None:
        loaded = load_model(cfg.model, seed=cfg.seed, device=device, dtype=cfg.dtype)
    cut = check_lengths(loaded.tokenizer, data.forget + data.retain, cfg.max_length, cfg.prompt_format)
    if cut and main_process():
        print(f"geffect: warning: {cut} of {len(data.forget) + len(data.retain)} records are longer than "
              f"--max-length {cfg.max_length} tokens; their answers are cut to fit (raise --max-length)",
              file=sys.stderr)
    if want_memorize:
        from geffect.memorize import memorize
        loaded = memorize(loaded, data.forget + data.retain, max_length=cfg.max_length, seed=cfg.seed,
                          progress=cfg.progress, dtype=cfg.dtype, fmt=cfg.prompt_format)
    return loaded


def prepare(cfg: UnlearnConfig, hyper: Hyper | None = None, loaded: LoadedModel | None = None,
            reference: Reference | None = None, profile: ProfileConfig | None = None, trains: bool = True) -> Session:
    """Preflight, then data, the model (memorised if asked: from the cache when it can), LoRA, the
    objective's state, a smoke test and the memory check, and θ_o. ``reference`` reuses a θ_o already
    made (diagnose shares one); ``loaded`` a model already loaded (it stays on its device);
    ``trains=False`` (measure) takes no optimizer step."""
    method, device = preflight(cfg, hyper, profile, trains)
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    set_seed(cfg.seed)
    data = load_data(cfg.forget, cfg.retain, cfg.seed, cfg.tofu, cfg.tofu_split)
    extra = [seg for seg in method.segments if seg not in ("forget", "retain")]
    text = next((r for r in data.forget if not r.question), None)
    if extra and text is not None:        # idk / mismatch rows pair an answer with the forget question
        raise DataError(f"{text.source or 'forget set'}: a plain-text record (field 'text'), but --method "
                        f"{method.name} answers the forget questions ({', '.join(extra)} rows); use question/answer "
                        "records, or an objective that reads text (ga, npo, simnpo, wga, tnpo, rmu-wmdp …)")
    loaded = starting_model(cfg, data, device, loaded)
    if cfg.gradient_checkpointing:
        enable_checkpointing(loaded.model)
    ctx = method.setup(loaded.model, cfg.seed)
    if cfg.lora and not hasattr(loaded.model, "peft_config"):    # a model passed in already wrapped stays so
        from geffect.lora import apply_lora, parse_lora
        loaded = replace(loaded, model=apply_lora(loaded.model, parse_lora(cfg.lora)))
    smoke_test(loaded.model, cfg.dtype)
    if cfg.memory_check:
        reads_more = bool(method.reference_rows("logits") or method.reference_rows("hidden"))
        copy = method.needs_ref and reference is None and not cfg.lora and (cfg.reference == "copy" or reads_more)
        rows = (cfg.forget_batch * (1 + len(method.forget_entry.segments)) + cfg.retain_batch)
        check_fits(estimate_memory(loaded.model, cfg.optimizer, copy, rows, cfg.max_length, profile is not None,
                                   cfg.gradient_checkpointing), model_device(loaded.model))
    if method.needs_ref and reference is None:
        reference = make_reference(loaded.model, method, cfg.reference, loaded.tokenizer, data, cfg.max_length,
                                   lora=bool(cfg.lora), device=cfg.reference_device, fmt=cfg.prompt_format)
    return Session(cfg, method, data, loaded, reference if method.needs_ref else None, ctx)
