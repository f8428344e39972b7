"""The objective registry: one entry per objective, declaring what it reads and needs.

An entry names its loss (a thin adapter from :class:`ForwardOut` to a pure function of
:mod:`functional`), the hyperparameters it reads, the row segments it reads (``forget``,
``retain``, ``idk``: the forget question with an "I don't know" answer, ``mismatch``: the forget
question with a random retain answer), what of θ it reads (the per-token NLL, the logits or a
hidden state), what of θ_o it needs, and how it weights the NLL (``uniform`` per sample,
per ``instance``, per ``token``, or ``None`` when it reads more than the NLL). The loop, the
engine's reuse check, diagnose and the analysis scripts ask these entries instead of testing
names. Adding an objective is one :func:`register` call and its tests
(``tests/test_objectives.py`` checks every registered entry against its formula and against
``torch.func.grad``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from geffect.config import Hyper
from geffect.errors import MethodError
from geffect.objectives import functional as fn
from geffect.objectives.inputs import ForwardOut, Loss, ObjectiveContext

if TYPE_CHECKING:
    import torch

LossFn = Callable[[ForwardOut, Hyper, ObjectiveContext], Loss]


@dataclass(frozen=True)
class Objective:
    name: str
    role: str                             # "forget" or "retain"
    loss: LossFn
    formula: str                          # what it minimises (shown in --help and the docs)
    hyper: tuple[str, ...] = ()           # Hyper fields it reads
    rows: tuple[str, ...] = ("forget",)   # row segments its loss reads
    reads: str = "nll"                    # what of θ: "nll", "logits" or "hidden"
    reference: str | None = None          # what of θ_o: None, "nll" (per token), "logits" or "hidden"
    weighting: str | None = "uniform"     # "uniform", "instance", "token" or None (reads more than the NLL)
    own_retain: str | None = None         # a forget objective with its own retain part
    default_alpha: float = 1.0            # α of the retain part when this entry is the forget objective
    selectable: bool = True               # retain entries: may be named after a forget objective
    setup: Callable | None = None         # setup(model, hyper, seed) -> ObjectiveContext (RMU)
    negate_after: bool = False            # TVN: the run fine-tunes LoRA adapters, then θ = θ_base − λ·ΔW
    candidate: bool = True                # among diagnose's default candidates (variants and TVN: named only)

    @property
    def segments(self) -> tuple[str, ...]:
        """Row segments a batch needs beside ``forget`` and ``retain``."""
        return tuple(s for s in self.rows if s not in ("forget", "retain"))


FORGET: dict[str, Objective] = {}
RETAIN: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    table = FORGET if obj.role == "forget" else RETAIN
    if obj.name in table:
        raise ValueError(f"an objective named {obj.name!r} is already registered")
    table[obj.name] = obj
    return obj


def forget_objective(name: str) -> Objective:
    if name not in FORGET:
        raise MethodError(f"unknown forget objective {name!r}; choose one of {', '.join(FORGET)} (or gd)")
    return FORGET[name]


def retain_regulariser(name: str) -> Objective:
    if name not in RETAIN or not RETAIN[name].selectable:
        raise MethodError(f"unknown retain regulariser {name!r}; choose one of {', '.join(retain_names())}")
    return RETAIN[name]


def forget_names() -> list[str]:
    return list(FORGET)


def retain_names() -> list[str]:
    return [n for n, o in RETAIN.items() if o.selectable]


# ---- forget objectives (REFERENCE.md §2) ------------------------------------------------------

def _ga(out, h, ctx):
    return Loss(fn.ga(*out.seg("forget")))


def _npo(out, h, ctx):
    nf, mf = out.seg("forget")
    ref = out.ref_nll[out.segments["forget"]]
    return Loss(*fn.npo(fn.seq_logp(nf, mf), fn.seq_logp(ref, mf), h.npo_beta))


def _simnpo(out, h, ctx):
    nf, mf = out.seg("forget")
    return Loss(*fn.simnpo(fn.seq_logp(nf, mf), mf.sum(-1), h.simnpo_beta, h.simnpo_delta))


def _wga(out, h, ctx):
    value, w = fn.wga(*out.seg("forget"), h.wga_alpha)
    return Loss(value, token_weight=w)


def _tnpo(out, h, ctx):
    nf, mf = out.seg("forget")
    value, w = fn.tnpo(nf, out.ref_nll[out.segments["forget"]], mf, h.tnpo_beta)
    return Loss(value, token_weight=w)


def _wtnpo(out, h, ctx):
    nf, mf = out.seg("forget")
    value, w = fn.wtnpo(nf, out.ref_nll[out.segments["forget"]], mf, h.wtnpo_alpha, h.wtnpo_beta)
    return Loss(value, token_weight=w)


def _po(out, h, ctx):
    return Loss(fn.nll_loss(*out.seg("idk")))


def _idkdpo(out, h, ctx):
    (ni, mi), (nf, mf) = out.seg("idk"), out.seg("forget")
    si, sf = out.segments["idk"], out.segments["forget"]
    return Loss(fn.idkdpo(fn.seq_logp(ni, mi), fn.seq_logp(out.ref_nll[si], mi),
                          fn.seq_logp(nf, mf), fn.seq_logp(out.ref_nll[sf], mf), h.dpo_beta))


def _rmu(out, h, ctx):
    return Loss(fn.rmu_forget(out.hidden[out.segments["forget"]], ctx.control, out.token_mask("forget")))


def _rmu_text(out, h, ctx):
    """RMU over every token of the forget text (prompt and answer), as WMDP's corpus loss."""
    return Loss(fn.rmu_forget(out.hidden[out.segments["forget"]], ctx.control, out.text_mask("forget")))


def _finetune(out, h, ctx):
    return Loss(fn.nll_loss(*out.seg("forget")))


def _llmu(out, h, ctx):
    return Loss(h.llmu_ga * fn.ga(*out.seg("forget")) + h.llmu_mismatch * fn.nll_loss(*out.seg("mismatch")))


def rmu_layer(hyper: Hyper, n_blocks: int, of_32: int | None = None) -> int:
    """RMU's layer ℓ: ``--rmu-layer``, or a quarter of the depth, or (``of_32``) block ``of_32`` of a
    32-block model scaled to this depth (WMDP: 7 of Zephyr-7B's 32)."""
    if hyper.rmu_layer is not None:
        if not 0 <= hyper.rmu_layer < n_blocks:
            raise MethodError(f"--rmu-layer {hyper.rmu_layer} outside 0..{n_blocks - 1}")
        return hyper.rmu_layer
    if of_32 is not None:
        return max(0, min(n_blocks - 1, round(of_32 * n_blocks / 32)))
    return max(0, min(n_blocks - 1, round(n_blocks / 4)))


def _rmu_context(model, hyper: Hyper, seed: int, layer: int, coeff: float):
    p = next(model.parameters())
    control = fn.rmu_control(model.config.hidden_size, coeff if hyper.rmu_coeff is None else hyper.rmu_coeff,
                             seed).to(p.device)
    return ObjectiveContext(hidden_layer=layer, control=control)


def _rmu_setup(model, hyper: Hyper, seed: int) -> ObjectiveContext:
    """RMU updates only the blocks ℓ−2..ℓ and steers block ℓ's output towards c·u."""
    from geffect.layers import find_blocks
    _, blocks = find_blocks(model)
    layer = rmu_layer(hyper, len(blocks))
    model.requires_grad_(False)
    for b in blocks[max(0, layer - 2): layer + 1]:
        b.requires_grad_(True)
    return _rmu_context(model, hyper, seed, layer, 6.5)


MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "feed_forward.w2", "mlp.w2",
           "feed_forward.down_proj", "mlp.dense_h_to_4h_out")


def mlp_output_projection(block: torch.nn.Module, where: str) -> torch.nn.Module:
    """The MLP's output projection of a transformer block (Llama down_proj, GPT-2 c_proj, OPT/Phi fc2 …)."""
    mods = dict(block.named_modules())
    for name in MLP_OUT:
        if name in mods:
            return mods[name]
    raise MethodError(f"rmu-wmdp updates the MLP output projections, and {where} has none of "
                      f"{', '.join(MLP_OUT)}; use rmu (whole blocks) instead")


def _rmu_wmdp_setup(model, hyper: Hyper, seed: int) -> ObjectiveContext:
    """RMU as WMDP (and Spunge) run it: ℓ = 7 of 32 blocks (scaled), only the MLP output projection
    weights of blocks ℓ−2..ℓ train, the loss over every token of the text."""
    from geffect.layers import find_blocks
    prefix, blocks = find_blocks(model)
    layer = rmu_layer(hyper, len(blocks), of_32=7)
    model.requires_grad_(False)
    for i in range(max(0, layer - 2), layer + 1):
        mlp_output_projection(blocks[i], f"{prefix}.{i}").weight.requires_grad_(True)
    return _rmu_context(model, hyper, seed, layer, 6.5)


def _rmu_full_setup(model, hyper: Hyper, seed: int) -> ObjectiveContext:
    """The G-effect paper's RMU: c = 2, every parameter trains (answer tokens, layer ℓ as rmu)."""
    from geffect.layers import find_blocks
    _, blocks = find_blocks(model)
    return _rmu_context(model, hyper, seed, rmu_layer(hyper, len(blocks)), 2.0)


register(Objective("ga", "forget", _ga, "−R(D_u) = −mean NLL of the forget answers"))
register(Objective("npo", "forget", _npo, "−(2/β)·logσ(−β·log(π_θ/π_o)), sequence log-probs",
                   hyper=("npo_beta",), reference="nll", weighting="instance"))
register(Objective("simnpo", "forget", _simnpo, "−(2/β)·logσ(−β·log π_θ/|y| − δ)",
                   hyper=("simnpo_beta", "simnpo_delta"), weighting="instance"))
register(Objective("wga", "forget", _wga, "Σ_t w_t·log p_t, w_t = p_t^α", hyper=("wga_alpha",), weighting="token"))
register(Objective("tnpo", "forget", _tnpo, "Σ_t w_t·log p_t, w_t = 2p_t^β/(p_t^β + p_{o,t}^β)",
                   hyper=("tnpo_beta",), reference="nll", weighting="token"))
register(Objective("wtnpo", "forget", _wtnpo, "Σ_t w_t·log p_t, w_t = 2p_t^{β+α}/(p_t^β + p_{o,t}^β)",
                   hyper=("wtnpo_alpha", "wtnpo_beta"), reference="nll", weighting="token"))
register(Objective("po", "forget", _po, "NLL of an \"I don't know\" answer to the forget question", rows=("idk",)))
register(Objective("idkdpo", "forget", _idkdpo, "−(2/β)·logσ(β·(Δ_idk − Δ_forget)), Δ = log π_θ − log π_o",
                   hyper=("dpo_beta",), rows=("forget", "idk"), reference="nll", weighting="instance"))
register(Objective("rmu", "forget", _rmu, "MSE of block ℓ's output to c·u over answer tokens",
                   hyper=("rmu_layer", "rmu_coeff"), reads="hidden", weighting=None, own_retain="rmu",
                   default_alpha=1200.0, setup=_rmu_setup))
register(Objective("rmu-wmdp", "forget", _rmu_text, "RMU as WMDP runs it: MSE to c·u over every token of the text, "
                   "only MLP output projections of blocks ℓ−2..ℓ train (ℓ = 7 of 32)",
                   hyper=("rmu_layer", "rmu_coeff"), reads="hidden", weighting=None, own_retain="rmu-wmdp",
                   default_alpha=1200.0, setup=_rmu_wmdp_setup, candidate=False))
register(Objective("rmu-full", "forget", _rmu, "the G-effect paper's RMU: MSE to c·u (c = 2) over answer tokens, "
                   "every parameter trains", hyper=("rmu_layer", "rmu_coeff"), reads="hidden", weighting=None,
                   own_retain="rmu", default_alpha=1200.0, setup=_rmu_full_setup, candidate=False))
register(Objective("tvn", "forget", _finetune, "task-vector negation: fine-tune LoRA adapters on the forget "
                   "set (minimise its NLL; these steps are what geffect profiles), then θ = θ_base − λ·ΔW",
                   hyper=("tvn_lambda",), negate_after=True, candidate=False))
register(Objective("llmu", "forget", _llmu, "a·(−NLL of the forget answers) + b·NLL of mismatched answers",
                   hyper=("llmu_ga", "llmu_mismatch"), rows=("forget", "mismatch"), own_retain="kl"))


# ---- retain regularisers ---------------------------------------------------------------------

def _gd(out, h, ctx):
    return Loss(fn.nll_loss(*out.seg("retain")))


def _kl(out, h, ctx):
    s = out.segments["retain"]
    return Loss(fn.forward_kl(out.logits[s], out.ref_logits["retain"], out.labels[s]))


def _rmu_retain(out, h, ctx):
    s = out.segments["retain"]
    return Loss(fn.rmu_retain(out.hidden[s], out.ref_hidden["retain"], out.token_mask("retain")))


def _rmu_text_retain(out, h, ctx):
    s = out.segments["retain"]
    return Loss(fn.rmu_retain(out.hidden[s], out.ref_hidden["retain"], out.text_mask("retain")))


register(Objective("gd", "retain", _gd, "R(D_r) = mean NLL of the retain answers", rows=("retain",)))
register(Objective("kl", "retain", _kl, "KL(p_o ‖ p_θ) over retain answer tokens", rows=("retain",),
                   reads="logits", reference="logits", weighting=None))
register(Objective("rmu", "retain", _rmu_retain, "MSE of block ℓ's output to θ_o's over answer tokens",
                   rows=("retain",), reads="hidden", reference="hidden", weighting=None, selectable=False))
register(Objective("rmu-wmdp", "retain", _rmu_text_retain, "MSE of block ℓ's output to θ_o's over every token",
                   rows=("retain",), reads="hidden", reference="hidden", weighting=None, selectable=False))
