"""Per-sample inner products ⟨∇_θm ℓ_i, V⟩ for one module m, from what the training pass saw.

For a module with input a and output-gradient g (of the per-sample risk), the per-sample
gradient of its weight is G_i = Σ_t g_{i,t} a_{i,t}ᵀ and ⟨G_i, V⟩ = Σ_t g_{i,t}ᵀ V a_{i,t}: no
per-sample gradient is ever materialised. Fast rules are registered per layer type (Opacus
style); every other module falls back to a forward-mode ``torch.func.jvp`` of its own forward:
⟨∇_p⟨m(x; p), g⟩, V⟩ = ⟨g, J_p m · V⟩.

Precision: products run in the model's dtype (a bf16 matmul on a GPU accumulates in float32 and
rounds its output), and every elementwise product and sum over tokens and features is taken in
float32; each rule returns float32 on the tensors' device.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.func import functional_call, jvp

from geffect.distributed import World

Rule = Callable[[torch.nn.Module, tuple, torch.Tensor, dict], torch.Tensor]
_RULES: dict[type, Rule] = {}


def register_rule(*types: type):
    """Register a fast per-sample inner-product rule; duplicate registrations are refused."""
    def deco(fn: Rule) -> Rule:
        for t in types:
            if t in _RULES:
                raise ValueError(f"a rule for {t.__name__} is already registered")
            _RULES[t] = fn
        return fn
    return deco


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])           # (N, T, d)


# Modules whose cotangents were once found live on most positions: the dense product is exact for
# any cotangent, so they skip the liveness test (a full read of the cotangent) from then on.
_DENSE: weakref.WeakSet = weakref.WeakSet()


# Output projections: their cotangents sit on the answer positions alone, however many of the
# logits' positions those fill (with the logits at the answer window only, most of them), so they are
# never taken as dense: their own live positions, each step.
_OUTPUT: weakref.WeakSet = weakref.WeakSet()


def mark_output_projection(model: torch.nn.Module) -> None:
    """Register the model's output projection (transformers' ``get_output_embeddings``) as position-local."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if isinstance(out, torch.nn.Module):
        _OUTPUT.add(out)


def known_dense(mod: torch.nn.Module) -> bool:
    """Whether a module's cotangents were found live on most positions (every position is kept)."""
    return mod in _DENSE


def nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """(R,) whether each row of x (R, d) has a nonzero entry, from two reductions: no |x| copy (the
    output projection's cotangent is (N·T, vocabulary), hundreds of MB)."""
    return (x.amax(-1) != 0) | (x.amin(-1) != 0)


def live_positions(mod: torch.nn.Module, g: torch.Tensor) -> torch.Tensor | None:
    """Flat indices (K,) of the positions of g (N, T, out) that carry a cotangent, or None where
    every position is kept: a module whose cotangents are live on most positions is dense (the
    product over every position is exact for any cotangent) and skips this test from then on; an
    output projection (:func:`mark_output_projection`) never counts as dense."""
    if mod in _DENSE:
        return None
    live = nonzero_rows(g.reshape(-1, g.shape[-1]))             # (N·T,)
    if mod in _OUTPUT:
        return live.nonzero().flatten()
    if live.float().mean() >= 0.6:
        _DENSE.add(mod)
        return None
    return live.nonzero().flatten()


def _bilinear(a: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Σ_t g_tᵀ W a_t per row: a (R, T, in), g (R, T, out), W (out, in) -> (R,) float32. The matmul
    maps into the narrower of the two spaces, where one fused multiply-sum finishes (no elementwise
    temporary of the wider side)."""
    if W.shape[0] > W.shape[1]:
        x, y = g @ W, a                                      # (R, T, in): Σ (Wᵀg_t)·a_t
    else:
        x, y = a @ W.T, g                                    # (R, T, out): Σ (W a_t)·g_t
    R = x.shape[0]
    return torch.linalg.vecdot(x.reshape(R, -1).float(), y.reshape(R, -1).float())


@register_rule(torch.nn.Linear)
def linear_rule(mod, inputs, g, V) -> torch.Tensor:
    a, g = _flat(inputs[0]), _flat(g)                       # (N, T, in), (N, T, out)
    out = torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
    if "weight" in V:
        idx = live_positions(mod, g)
        if idx is not None:
            # Position-local cotangents (the lm head and the last block see only the answer
            # tokens' loss): the inner product over the live positions only.
            T = g.shape[1]
            a_k, g_k = a.reshape(-1, a.shape[-1])[idx, None], g.reshape(-1, g.shape[-1])[idx, None]   # (K, 1, ·)
            out = out.index_add(0, idx // T, _bilinear(a_k, g_k, V["weight"]))                     # (K,) into rows
        else:
            out = out + _bilinear(a, g, V["weight"])                                   # Σ_t g_tᵀ V a_t
    if "bias" in V:
        out = out + g.float().sum(1) @ V["bias"].float()
    return out


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover
        return None


_CONV1D = _conv1d_type()
if _CONV1D is not None:
    @register_rule(_CONV1D)
    def conv1d_rule(mod, inputs, g, V) -> torch.Tensor:
        """GPT-2's Conv1D: y = a W + b with W (in, out), i.e. a Linear with weight Wᵀ."""
        return linear_rule(mod, inputs, g, {k: (v.T if k == "weight" else v) for k, v in V.items()})


@register_rule(torch.nn.Embedding)
def embedding_rule(mod, inputs, g, V) -> torch.Tensor:
    """out_t = W[id_t]: ⟨G_i, V⟩ = Σ_t g_t · V[id_t]; the padding row receives no gradient."""
    ids = inputs[0]                                          # (N, T)
    if "weight" not in V:
        return torch.zeros(ids.shape[0], device=g.device)
    contrib = (V["weight"][ids].float() * g.float()).sum(-1)  # (N, T)
    if mod.padding_idx is not None:
        contrib = contrib.masked_fill(ids == mod.padding_idx, 0.0)
    return contrib.sum(-1)


def jvp_rule(mod, inputs, g, V) -> torch.Tensor:
    """Fallback for any module treating samples independently: ⟨g, J_p m · V⟩ per sample."""
    names = list(V)
    primals = tuple(World.full(getattr(mod, n)).detach() for n in names)     # sharded weights: gathered whole
    tangents = tuple(V[n] for n in names)

    def f(*ps):
        return functional_call(mod, dict(zip(names, ps)), tuple(x.detach() if torch.is_tensor(x) else x
                                                                 for x in inputs))
    with torch.no_grad():
        _, t_out = jvp(f, primals, tangents)
    if isinstance(t_out, tuple):
        t_out = t_out[0]
    return (t_out.float() * g.float()).reshape(g.shape[0], -1).sum(-1)


def rule_for(mod: torch.nn.Module) -> Rule:
    for t in type(mod).__mro__:
        if t in _RULES:
            return _RULES[t]
    return jvp_rule


@register_rule(torch.nn.LayerNorm)
def layernorm_rule(mod, inputs, g, V) -> torch.Tensor:
    """y = w ⊙ x̂ + b with x̂ = (x − μ)/σ: ⟨G_i, V⟩ = Σ_t (g_t ⊙ x̂_t)·V_w + Σ_t g_t·V_b."""
    x = _flat(inputs[0]).float()
    xhat = torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
    g = _flat(g).float()
    out = torch.zeros(g.shape[0], device=g.device)
    if "weight" in V:
        out = out + ((g * xhat) @ V["weight"].float()).sum(1)
    if "bias" in V:
        out = out + g.sum(1) @ V["bias"].float()
    return out


def _llama_rmsnorm_type():
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        return LlamaRMSNorm
    except ImportError:  # pragma: no cover
        return None


_RMS = _llama_rmsnorm_type()
if _RMS is not None:
    @register_rule(_RMS)
    def rmsnorm_rule(mod, inputs, g, V) -> torch.Tensor:
        """Llama RMSNorm y = w ⊙ x·rsqrt(mean(x²) + ε): ⟨G_i, V⟩ = Σ_t (g_t ⊙ x̂_t)·V_w."""
        x = _flat(inputs[0]).float()
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
        xhat = xhat.to(inputs[0].dtype)
        return ((_flat(g).float() * xhat.float()) @ V["weight"].float()).sum(1)
