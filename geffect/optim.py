"""The optimizer and the learning-rate schedule of a run."""
from __future__ import annotations

import math

import torch

from geffect.config import UnlearnConfig


def make_optimizer(cfg: UnlearnConfig, params) -> torch.optim.Optimizer:
    """AdamW (fused where :func:`fusable`) or SGD over ``params``."""
    params = list(params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fusable(params) or None)
    return torch.optim.SGD(params, lr=cfg.lr)


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch has AdamW's fused kernel for every parameter's device and dtype (CPU and the
    accelerators, floating point; FSDP2's DTensors on them too). The fused kernel updates each tensor
    in one pass, in place: the same AdamW update to float rounding, without the default per-tensor
    path's sqrt/div temporaries (on CPU, SmolLM2-135M: 0.09 s against 0.26 s a step,
    ``benchmarks/optimizer.py``). Elsewhere (``meta``, integer tensors) the default path."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:       # a torch without the helper: the default path
        return False
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]   # tensors or param groups
    return bool(tensors) and all(t.device.type in devices and t.is_floating_point() for t in tensors)


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lr_schedule(cfg: UnlearnConfig, n_steps: int):
    """The learning rate of each step, ``lr_at(k)``, as ``transformers.get_scheduler`` sets it (what
    the Hugging Face Trainer, and so open-unlearning and TOFU, use): linear warm-up over
    ``warmup_steps`` from 0, then constant, linear decay to 0 at ``n_steps``, or cosine. A function
    of the step alone, so a resumed run follows the same schedule."""
    from transformers import get_scheduler
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True, device="cpu")], lr=cfg.lr)
    lam = get_scheduler(SCHEDULERS[cfg.lr_scheduler], dummy, num_warmup_steps=cfg.warmup_steps,
                        num_training_steps=n_steps).lr_lambdas[0]
    return lambda step: cfg.lr * lam(step)


def total_steps(cfg: UnlearnConfig, n_forget: int) -> int:
    """``--steps``, or ``--epochs`` passes over the forget set."""
    if cfg.epochs is not None:
        per = math.ceil(n_forget / (cfg.forget_batch * cfg.grad_accum))
        return max(1, math.ceil(cfg.epochs * per))
    return cfg.steps
