"""Membership inference scores, with open-unlearning's conventions (REFERENCE.md §5).

Every score is loss-like: higher means "looks unseen" (non-member). ``logprobs`` is a 1-D array of
the target tokens' log-probabilities; ``log_dists`` a (T, V) array of log-probabilities over the
vocabulary at those positions and ``targets`` the T target ids. ``auc`` is the ROC-AUC with the
members (the forget set) as the negative class and the non-members (held out) as the positive
one: 0.5 is chance, 1 means the forget set still looks seen.
"""
from __future__ import annotations

import zlib

import numpy as np


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def loss_score(logprobs) -> float:
    """LOSS: the mean NLL of the target tokens."""
    lp = _arr(logprobs)
    return float(-lp.mean()) if lp.size else float("nan")


def zlib_score(logprobs, text: str) -> float:
    """ZLib: LOSS over the length in bytes of the zlib-compressed UTF-8 text."""
    return loss_score(logprobs) / len(zlib.compress(text.encode("utf-8")))


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    """Mean of the lowest max(1, int(n·k)) values (ties broken by the sort: any order gives the same mean)."""
    n = max(1, int(len(values) * k))
    return float(np.sort(values)[:n].mean())


def min_k_score(logprobs, k: float = 0.4) -> float:
    """Min-K%: the mean NLL of the k-fraction of tokens with the lowest log-probability (at least one)."""
    lp = _arr(logprobs)
    return -_lowest_k_mean(lp, k) if lp.size else float("nan")


def min_k_pp_score(log_dists, targets, k: float = 0.4) -> float:
    """Min-K%++: each target log-probability standardised by the mean μ_t = Σ_v p_v log p_v and the
    standard deviation σ_t (σ_t² = Σ_v p_v (log p_v)² − μ_t²) of the model's own next-token
    distribution, then the mean of the lowest k-fraction, negated. σ_t² is clamped at 1e-6 (a
    one-hot distribution), as open-unlearning does."""
    ld = np.asarray(log_dists, dtype=np.float64)
    if ld.ndim != 2 or ld.shape[0] == 0:
        return float("nan")
    tg = np.asarray(targets, dtype=np.int64).reshape(-1)
    p = np.exp(ld)
    mu = (p * ld).sum(-1)
    var = np.maximum((p * ld ** 2).sum(-1) - mu ** 2, 1e-6)
    z = (ld[np.arange(len(tg)), tg] - mu) / np.sqrt(var)
    return -_lowest_k_mean(z, k)


def auc(member_scores, nonmember_scores) -> float:
    """ROC-AUC of the scores with members labelled 0 and non-members 1: the probability that a random
    non-member scores higher than a random member, ties counting one half (Mann-Whitney U)."""
    m, n = _arr(member_scores), _arr(nonmember_scores)
    m, n = m[np.isfinite(m)], n[np.isfinite(n)]
    if not m.size or not n.size:
        return float("nan")
    greater = (n[:, None] > m[None, :]).sum()
    ties = (n[:, None] == m[None, :]).sum()
    return float((greater + 0.5 * ties) / (m.size * n.size))


def min_k_pp_from_z(z, k: float = 0.4) -> float:
    """Min-K%++ from the standardised log-probabilities z_t (:func:`geffect.eval.scoring.standardised`)."""
    z = _arr(z)
    return -_lowest_k_mean(z, k) if z.size else float("nan")


ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")


def attack_scores(scores, texts: list[str], k: float = 0.4) -> dict[str, list[float]]:
    """Each attack's score of each sample; ``scores`` are :class:`~geffect.eval.scoring.AnswerScores`
    (with z for Min-K%++), ``texts`` the target (answer) texts the ZLib attack compresses."""
    out = {"loss": [loss_score(s.logprobs) for s in scores],
           "zlib": [zlib_score(s.logprobs, t) for s, t in zip(scores, texts)],
           "min_k": [min_k_score(s.logprobs, k) for s in scores]}
    if all(s.z is not None for s in scores):
        out["min_k_pp"] = [min_k_pp_from_z(s.z, k) for s in scores]
    return out


def mia_report(members: dict[str, list[float]], nonmembers: dict[str, list[float]]) -> dict:
    """Member (forget) and non-member (holdout) mean NLL, as the detox study reports them, and each
    attack's ROC-AUC (0.5: the forget set looks like data never seen)."""
    out = {"member_nll": float(np.mean(members["loss"])), "nonmember_nll": float(np.mean(nonmembers["loss"]))}
    for name in ATTACKS:
        if name in members and name in nonmembers:
            out[f"auc_{name}"] = auc(members[name], nonmembers[name])
    return out
