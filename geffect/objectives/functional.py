"""Unlearning objectives as pure tensor functions (../shared/REFERENCE.md §2).

Conventions: every loss is *minimised*; weights are detached (no gradient flows through a
weight). Token tensors are (N, T') over next-token positions with ``mask`` 1 on answer tokens.
The risk of a sample is its mean token NLL over answer tokens; sequence log-probabilities are
sums over answer tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from geffect.data.batching import IGNORE


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each logits position against the token it predicts. logits (N, k, V) are the last k ≤ T
    positions' (k = T: all; fewer: the model's ``logits_to_keep`` answer window,
    :func:`geffect.data.batching.answer_window`); labels (N, T). Returns the logits that predict a
    token (N, k-1, V), those tokens (N, k-1) and the window's first next-token index s = T - k: they are
    next-token positions s … T-2 of the (N, T-1) ones."""
    T, k = labels.shape[1], logits.shape[1]
    if k > T:
        raise ValueError(f"logits cover {k} positions, more than the labels' {T}")
    return logits[:, :-1], labels[:, T - k + 1:], T - k


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL and answer mask. logits (N, k, V) of the last k ≤ T positions (see
    :func:`shifted`), labels (N, T) -> nll, mask (N, T-1): 0 before the window (no answer token is
    there: the window starts where the first one is predicted)."""
    shift_logits, shift_labels, start = shifted(logits, labels)        # (N, k-1, V), (N, k-1)
    mask = (labels[:, 1:] != IGNORE)                                   # (N, T-1)
    if start and mask.device.type == "cpu" and mask[:, :start].any():   # (checked where it costs no device sync)
        raise ValueError(f"an answer token lies before the logits' window (its first {start} positions cut)")
    inside = (shift_labels != IGNORE)
    safe = shift_labels.masked_fill(~inside, 0)
    nll = F.cross_entropy(shift_logits.transpose(1, 2).float(), safe, reduction="none") * inside  # (N, k-1)
    if start:
        nll = F.pad(nll, (start, 0))                                  # (N, T-1)
    return nll, mask.to(nll.dtype)


def mean_nll(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample risk ℓ(s) = mean token NLL over answer tokens. -> (N,)"""
    return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def seq_logp(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence log-probability log π(y|x) = Σ_t log p_t over answer tokens. -> (N,)"""
    return -(nll * mask).sum(-1)


def nll_loss(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R(D) = mean over samples of the mean token NLL (the risk; also GD's retain part)."""
    return mean_nll(nll, mask).mean()


def ga(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient ascent forget part: L_f = −R(D_u) = −mean NLL."""
    return -nll_loss(nll, mask)


def npo(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """NPO: L = −(2/β)·logσ(−β·log(π_θ/π_o)), mean over samples.

    Returns (loss, w_npo) with the per-instance weight w = 2π_θ^β/(π_θ^β + π_o^β) = 2σ(βΔ), the
    factor multiplying −∇log π_θ in ∇L. At θ = θ_o the loss is (2/β)·ln 2 and w = 1.
    """
    delta = logp - ref_logp                                          # (N,)
    loss = -(2.0 / beta) * F.logsigmoid(-beta * delta)
    weight = (2.0 * torch.sigmoid(beta * delta)).detach()
    return loss.mean(), weight


def simnpo(logp: torch.Tensor, lengths: torch.Tensor, beta: float = 4.5,
           delta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SimNPO: L = −(2/β)·logσ(−β·log π_θ(y|x)/|y| − δ) (reference-free, length-normalised).

    Weight: 2σ(β·log π_θ/|y| + δ), the factor on −∇(log π_θ/|y|).
    """
    x = logp / lengths.clamp_min(1)
    loss = -(2.0 / beta) * F.logsigmoid(-beta * x - delta)
    weight = (2.0 * torch.sigmoid(beta * x + delta)).detach()
    return loss.mean(), weight


def _token_weighted(nll: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over samples of (1/|y|) Σ_t w_t·log p_t, with log p_t = −nll_t."""
    return (-(w * nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def wga(nll: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """WGA (Wang et al. 2025, eq. WGA): L = Σ_t w_t·log p_t, w_t = p_t^α (detached).

    Normalised per answer token like the risk. Returns (loss, token weights (N, T')).
    """
    w = torch.exp(-alpha * nll.detach()) * mask
    return _token_weighted(nll, mask, w), w


def tnpo(nll: torch.Tensor, ref_nll: torch.Tensor, mask: torch.Tensor,
         beta: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TNPO: L = Σ_t w_t·log p_t, w_t = 2p_t^β/(p_t^β + p_{o,t}^β) = 2σ(β(log p_t − log p_{o,t}))."""
    w = 2.0 * torch.sigmoid(beta * (ref_nll - nll.detach())) * mask
    return _token_weighted(nll, mask, w), w


def wtnpo(nll: torch.Tensor, ref_nll: torch.Tensor, mask: torch.Tensor, alpha: float = 1.5,
          beta: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """WTNPO: w_t = 2p_t^{β+α}/(p_t^β + p_{o,t}^β) = p_t^α · TNPO weight."""
    nd = nll.detach()
    w = torch.exp(-alpha * nd) * 2.0 * torch.sigmoid(beta * (ref_nll - nd)) * mask
    return _token_weighted(nll, mask, w), w


def forward_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL retain regulariser: mean over samples of the mean over answer tokens of KL(p_o ‖ p_θ).

    Padding and prompt positions never count (the reference code averaged over padding).
    logits, ref_logits (N, k, V) and (N, k_o, V), the last k, k_o ≤ T positions (see :func:`shifted`;
    θ and θ_o may differ where only one model takes ``logits_to_keep``): both are read on the last
    min(k, k_o) positions, every answer token's (checked on the host). labels (N, T).
    """
    k = min(logits.shape[1], ref_logits.shape[1])
    logits, ref_logits = logits[:, -k:], ref_logits[:, -k:]
    shift_logits, shift_labels, start = shifted(logits, labels)
    if start and labels.device.type == "cpu" and (labels[:, 1:start + 1] != IGNORE).any():
        raise ValueError(f"an answer token lies before the logits' window (its first {start} positions cut)")
    mask = (shift_labels != IGNORE).to(logits.dtype)                  # (N, k-1) answer tokens in the window
    logq = F.log_softmax(shift_logits.float(), dim=-1)               # (N, k-1, V)
    logp_o = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (logp_o.exp() * (logp_o - logq)).sum(-1)                     # (N, k-1)
    n = (labels[:, 1:] != IGNORE).sum(-1).clamp_min(1)                # (N,) every answer token of a row
    return ((kl * mask).sum(-1) / n).mean()


def idkdpo(logp_win: torch.Tensor, ref_win: torch.Tensor, logp_lose: torch.Tensor, ref_lose: torch.Tensor,
           beta: float = 0.1) -> torch.Tensor:
    """IdkDPO: −(2/β)·logσ(β·(Δ_win − Δ_lose)), Δ = log π_θ − log π_o; IDK wins, forget answer loses.

    At θ = θ_o the loss is (2/β)·ln 2.
    """
    margin = (logp_win - ref_win) - (logp_lose - ref_lose)
    return (-(2.0 / beta) * F.logsigmoid(beta * margin)).mean()


def rmu_forget(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU forget part: mean over answer tokens of the MSE between h_ℓ(θ) and the control c·u.

    Follows the WMDP reference (mean squared error over hidden units, so α = 1200 keeps its
    meaning); REFERENCE.md writes the squared norm, which is this times the hidden size.
    hidden (N, T, d); control (d,); mask (N, T).
    """
    err = ((hidden.float() - control) ** 2).mean(-1)                  # (N, T)
    return ((err * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def rmu_retain(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain part: mean over answer tokens of the MSE between h_ℓ(θ) and h_ℓ(θ_o)."""
    err = ((hidden.float() - ref_hidden.float()) ** 2).mean(-1)
    return ((err * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def activation_cosine(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(Σ cos(h_t, h_o,t), number of tokens) over the counted tokens: the Spunge paper's RMU stop
    criterion is the mean. hidden, ref_hidden (N, T, d); mask (N, T)."""
    cos = F.cosine_similarity(hidden.float(), ref_hidden.float(), dim=-1)      # (N, T)
    return (cos * mask).sum().item(), mask.sum().item()


def rmu_control(hidden_size: int, coeff: float = 6.5, seed: int = 0) -> torch.Tensor:
    """The fixed control vector c·u, u ~ U[0,1)^d normalised to unit norm, drawn once."""
    g = torch.Generator().manual_seed(seed)             # drawn on the host (same u on every device)
    u = torch.rand(hidden_size, generator=g, device="cpu")
    return coeff * u / u.norm()


def npo_at_init(beta: float) -> float:
    """NPO (and IdkDPO) at θ = θ_o: (2/β)·ln 2."""
    return (2.0 / beta) * math.log(2.0)
