"""Per-module parameter gradients of a subset of rows, from a capture, one module at a time.

For a module with inputs a and output cotangents g (of some loss), restricted to some rows, the
gradient of each of its parameters is G = Σ_{rows, t} ∂⟨m(a_t), g_t⟩/∂θ_m; for a Linear layer
G_W = Σ_t g_t a_tᵀ. These are the same weight-gradient products the backward computes, taken
for a subset of rows, and held only while one module is processed (never a full-size copy of the
model's gradient). The conflict statistics and PCGrad use them for the forget part's gradient
g_f (its rows' training cotangents), and the Fig. 5b pairs for the risks' gradients.

Fast rules per layer type (same registry idea as :mod:`rules`), a ``torch.func.vjp`` fallback for
any other module. Results are float32, on the tensors' device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call, vjp

from geffect.engine.rules import nonzero_rows

GradRule = Callable[[torch.nn.Module, tuple, torch.Tensor, tuple[str, ...]], dict[str, torch.Tensor]]
_GRAD_RULES: dict[type, GradRule] = {}


def register_grad_rule(*types: type):
    """Register a per-module gradient rule; duplicate registrations are refused."""
    def deco(fn: GradRule) -> GradRule:
        for t in types:
            if t in _GRAD_RULES:
                raise ValueError(f"a gradient rule for {t.__name__} is already registered")
            _GRAD_RULES[t] = fn
        return fn
    return deco


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])                        # (N·T, d)


def _live(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the positions that carry a cotangent (the lm head sees only the answer tokens' loss)."""
    live = nonzero_rows(g)                                   # (N·T,)
    if live.float().mean() < 0.6:
        idx = live.nonzero().flatten()
        return a[idx], g[idx]
    return a, g


@register_grad_rule(torch.nn.Linear)
def linear_grad(mod, inputs, g, names) -> dict[str, torch.Tensor]:
    a, g = _live(_flat(inputs[0]), _flat(g))                 # (K, in), (K, out)
    out = {}
    if "weight" in names:
        out["weight"] = (g.T @ a).float()                    # Σ_t g_t a_tᵀ  (out, in)
    if "bias" in names:
        out["bias"] = g.float().sum(0)
    return out


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover
        return None


_CONV1D = _conv1d_type()
if _CONV1D is not None:
    @register_grad_rule(_CONV1D)
    def conv1d_grad(mod, inputs, g, names) -> dict[str, torch.Tensor]:
        """GPT-2's Conv1D: y = a W + b with W (in, out)."""
        out = linear_grad(mod, inputs, g, names)
        if "weight" in out:
            out["weight"] = out["weight"].T
        return out


@register_grad_rule(torch.nn.Embedding)
def embedding_grad(mod, inputs, g, names, into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """G[v] = Σ_{t: id_t = v} g_t; the padding row receives no gradient. ``into`` adds the rows to an
    existing (vocabulary, d) float32 buffer (a tied output projection's gradient)."""
    if "weight" not in names:
        return {}
    ids, g = inputs[0].reshape(-1), _flat(g).float()
    if mod.padding_idx is not None:
        g = g * (ids != mod.padding_idx).unsqueeze(-1)
    G = into if into is not None else torch.zeros(mod.num_embeddings, g.shape[-1], dtype=torch.float32,
                                                  device=g.device)
    G.index_add_(0, ids, g)
    return {"weight": G}


@register_grad_rule(torch.nn.LayerNorm)
def layernorm_grad(mod, inputs, g, names) -> dict[str, torch.Tensor]:
    x = _flat(inputs[0]).float()
    g = _flat(g).float()
    out = {}
    if "weight" in names:
        out["weight"] = (g * torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)).sum(0)
    if "bias" in names:
        out["bias"] = g.sum(0)
    return out


def _llama_rmsnorm_type():
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        return LlamaRMSNorm
    except ImportError:  # pragma: no cover
        return None


_RMS = _llama_rmsnorm_type()
if _RMS is not None:
    @register_grad_rule(_RMS)
    def rmsnorm_grad(mod, inputs, g, names) -> dict[str, torch.Tensor]:
        x = _flat(inputs[0]).float()
        xhat = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).to(inputs[0].dtype)
        return {"weight": (_flat(g).float() * xhat.float()).sum(0)}


def vjp_grad(mod, inputs, g, names) -> dict[str, torch.Tensor]:
    """Fallback for any module: the vector-Jacobian product of its own forward with g."""
    primals = tuple(getattr(mod, n).detach() for n in names)

    def f(*ps):
        out = functional_call(mod, dict(zip(names, ps)), tuple(x.detach() if torch.is_tensor(x) else x
                                                               for x in inputs))
        return out[0] if isinstance(out, tuple) else out
    with torch.enable_grad():
        _, pull = vjp(f, *primals)
        grads = pull(g.to(primals[0].dtype))
    return {n: gr.float() for n, gr in zip(names, grads)}


def grad_rule_for(mod: torch.nn.Module) -> GradRule:
    for t in type(mod).__mro__:
        if t in _GRAD_RULES:
            return _GRAD_RULES[t]
    return vjp_grad
