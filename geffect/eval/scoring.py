"""Per-token scores of answers under a model, batched: what TOFU's losses and the membership
inference scores (:mod:`geffect.eval.mia`) are computed from.

For each (question, answer) pair: the answer tokens' log-probabilities log p(y_t | x, y_<t) and, for
Min-K%++, each one standardised by the mean μ_t and standard deviation σ_t of log p under the
model's own next-token distribution (REFERENCE.md §5). Only these (T,) vectors leave the device;
the (T, V) distributions never do.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geffect.data.batching import IGNORE, collate, encode_pair
from geffect.data.prompts import PromptFormat
from geffect.forward import cache_kwargs, kv_cache, logits_window
from geffect.objectives import functional as fn


@dataclass
class AnswerScores:
    logprobs: np.ndarray     # (T,) log p of each answer token (end-of-sequence included)
    z: np.ndarray | None     # (T,) (log p − μ_t) / σ_t, for Min-K%++; None unless asked

    @property
    def loss(self) -> float:
        """Mean token NLL of the answer (TOFU's ``avg_gt_loss``; the LOSS attack's score)."""
        return float(-self.logprobs.mean()) if self.logprobs.size else float("nan")


def standardised(log_dists: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Min-K%++'s z_t = (log p(x_t) − μ_t) / σ_t; log_dists (T, V) log-probabilities, targets (T,).
    μ_t = Σ_v p_v log p_v, σ_t² = Σ_v p_v (log p_v)² − μ_t², clamped at 1e-6 (one-hot rows)."""
    ld = log_dists.double()                    # the variance is a difference of close sums: float64
    p = ld.exp()
    mu = (p * ld).sum(-1)                                                            # (T,)
    var = (p * (ld - mu[:, None]).square()).sum(-1).clamp_min(1e-6)                  # (T,) = Σp(log p)² − μ²
    return (ld.gather(-1, targets[:, None]).squeeze(-1) - mu) / var.sqrt()


@torch.no_grad()
def score_answers(model, tok, pairs: list[tuple[str, str, str]], max_length: int, fmt: str | PromptFormat = "chat",
                  batch_size: int = 16, with_z: bool | Sequence[bool] = False,
                  share_prompts: bool = True) -> list[AnswerScores]:
    """Scores of each (question, answer, where) pair's answer tokens, in the order given; ``with_z``
    for all rows or per row. ``share_prompts``: the answers of one prompt (TOFU's answer, paraphrase
    and perturbed answers share their question) are scored after one pass over the prompt, its
    key-value cache repeated for each (:func:`_shared`); otherwise each row is a whole sequence."""
    want_z = list(with_z) if not isinstance(with_z, bool) else [with_z] * len(pairs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if share_prompts:
            return _shared(model, tok, pairs, max_length, fmt, batch_size, want_z, device)
        return _whole(model, tok, pairs, max_length, fmt, batch_size, want_z, device)
    finally:
        model.train(was_training)


def _row_scores(logp: torch.Tensor, targets: torch.Tensor, want_z: bool) -> AnswerScores:
    """logp (T, V) log-probabilities at the answer positions, targets (T,)."""
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    z = standardised(logp, targets).cpu().numpy() if want_z else None
    return AnswerScores(lp.double().cpu().numpy(), z)


def _whole(model, tok, pairs, max_length, fmt, batch_size, want_z, device) -> list[AnswerScores]:
    """One right-padded sequence (prompt + answer) per row: the reference path."""
    out: list[AnswerScores] = []
    for i in range(0, len(pairs), batch_size):
        b = collate(tok, {"x": pairs[i:i + batch_size]}, max_length, fmt).to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False,
                       **logits_window(model, b)).logits                            # (N, k, V) the answer window
        shift_logits, labels, _ = fn.shifted(logits, b.labels)                       # (N, k-1, V), (N, k-1)
        logp = torch.log_softmax(shift_logits.float(), dim=-1)
        for row in range(labels.shape[0]):
            keep = labels[row] != IGNORE
            out.append(_row_scores(logp[row][keep], labels[row][keep], want_z[i + row]))
    return out


def _shared(model, tok, pairs, max_length, fmt, batch_size, want_z, device) -> list[AnswerScores]:
    """Rows grouped by their exact prompt tokens; per batch of prompts: one left-padded pass over the
    prompts (logits of the last position only), the key-value cache repeated per answer
    (``reorder_cache``), then one right-padded pass over the answers continuing it. Position ids
    count real tokens, so every answer is scored as in its own sequence."""
    enc = [encode_pair(tok, q, a, max_length, where, fmt) for q, a, where in pairs]
    groups: dict[tuple, list[int]] = {}
    for i, (ids, labels) in enumerate(enc):
        n_prompt = next((t for t, lab in enumerate(labels) if lab != IGNORE), len(labels))
        groups.setdefault(tuple(ids[:n_prompt]), []).append(i)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[AnswerScores | None] = [None] * len(pairs)
    prompts = list(groups.items())
    start = 0
    while start < len(prompts):           # batches of ≤ batch_size prompts and ≤ 4·batch_size answers
        stop, rows = start, 0
        while stop < len(prompts) and stop - start < batch_size and (rows == 0 or rows + len(prompts[stop][1])
                                                                     <= 4 * batch_size):
            rows += len(prompts[stop][1])
            stop += 1
        chunk = prompts[start:stop]
        start = stop
        width = max(len(p) for p, _ in chunk)
        p_ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)      # (B, P)
        p_mask = torch.zeros_like(p_ids)
        for j, (p, _) in enumerate(chunk):
            p_ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            p_mask[j, width - len(p):] = 1
        p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)
        res = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, logits_to_keep=1)
        cache, first = kv_cache(res), res.logits[:, -1].float()                             # first: (B, V)
        owner = [j for j, (_, idx) in enumerate(chunk) for _ in idx]                        # answer row -> prompt
        rows_idx = [i for _, idx in chunk for i in idx]
        answers = [enc[i][0][len(chunk[j][0]):] for j, i in zip(owner, rows_idx)]
        length = max(len(a) for a in answers)
        sel = torch.tensor(owner, dtype=torch.long, device=device)
        cache.reorder_cache(sel)                                                            # (N, ...) per row
        a_ids = torch.full((len(answers), length), pad, dtype=torch.long, device=device)   # (N, L)
        a_mask = torch.zeros_like(a_ids)
        for r, a in enumerate(answers):
            a_ids[r, :len(a)] = torch.tensor(a, dtype=torch.long, device=device)
            a_mask[r, :len(a)] = 1
        a_pos = p_mask.sum(-1)[sel][:, None] + torch.arange(length, device=device)[None]  # (N, L)
        logits = model(input_ids=a_ids, attention_mask=torch.cat([p_mask[sel], a_mask], dim=1), position_ids=a_pos,
                       use_cache=True, **cache_kwargs(model, cache)).logits               # (N, L, V)
        # answer token t is predicted by the prompt's last position (t = 0) or answer position t − 1
        pred = torch.cat([first[sel][:, None], logits[:, :-1].float()], dim=1)             # (N, L, V)
        logp = torch.log_softmax(pred, dim=-1)
        for r, (i, a) in enumerate(zip(rows_idx, answers)):
            out[i] = _row_scores(logp[r, :len(a)], a_ids[r, :len(a)], want_z[i])
    return out  # type: ignore[return-value]
