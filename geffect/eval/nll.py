"""The risk R(D): mean over samples of the mean answer-token NLL (REFERENCE.md §1)."""
from __future__ import annotations

import torch

from geffect.data.batching import collate, qa
from geffect.data.records import QARecord
from geffect.objectives import functional as fn


@torch.no_grad()
def row_nll(model, tok, records: list[QARecord], max_length: int = 128, batch_size: int = 16,
            fmt="chat") -> torch.Tensor:
    """Each record's mean answer-token NLL, (n,) float32 on the host."""
    from geffect.forward import logits_window
    vals = []
    for i in range(0, len(records), batch_size):
        b = collate(tok, {"x": qa(records[i:i + batch_size])}, max_length, fmt)
        dev = next(model.parameters()).device
        logits = model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False,
                       **logits_window(model, b)).logits                               # (n, k, V) the answer window
        vals.append(fn.mean_nll(*fn.token_nll(logits, b.labels.to(dev))).float().cpu())
    return torch.cat(vals)


def evaluate_nll(model, tok, records: list[QARecord], max_length: int = 128, batch_size: int = 16,
                 fmt="chat") -> float:
    """Risk R(D): mean over samples of the mean answer-token NLL."""
    return row_nll(model, tok, records, max_length, batch_size, fmt).mean().item()


@torch.no_grad()
def perturbed_nll(model, tok, records: list[QARecord], max_length: int = 128, fmt="chat") -> float:
    """Mean NLL of the perturbed (wrong) answers, to show the true answers are known."""
    rows = [(r.question, p, r.source) for r in records for p in r.perturbed_answer]
    if not rows:
        return float("nan")
    fake = [QARecord(q, a, source=s) for q, a, s in rows]
    return evaluate_nll(model, tok, fake, max_length, fmt=fmt)


def default_evaluation(model, tok, data, max_length: int, fmt="chat") -> dict:
    """NLL of the forget set, the retain set and the perturbed forget answers."""
    return {"nll_forget": evaluate_nll(model, tok, data.forget, max_length, fmt=fmt),
            "nll_retain": evaluate_nll(model, tok, data.retain, max_length, fmt=fmt),
            "nll_forget_perturbed": perturbed_nll(model, tok, data.forget, max_length, fmt)}
