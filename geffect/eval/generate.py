"""Batched greedy generation for any loaded causal LM: left padding, a key-value cache, and a stop at
end-of-sequence or after ``max_new_tokens``.

Prompts are sorted by length so that a batch pads little, and the answers come back in the order
given. Left padding keeps every row's last prompt token in the last column; the position ids count
real tokens only (``cumsum(mask) − 1``), so a padded row is decoded exactly as it would be alone
(``tests/test_eval.py`` checks this against one prompt at a time without a cache).
"""
from __future__ import annotations

import torch

from geffect.data.prompts import PromptFormat, prompt_format


def stop_ids(model, tok) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (chat models end a turn with
    their own token, e.g. ``<|im_end|>``)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return ids


@torch.no_grad()
def greedy_ids(model, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 16,
               stop: set[int] | None = None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations (token ids, the stop token excluded) of each prompt's token ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    stop_t = torch.tensor(sorted(stop or set()), dtype=torch.long, device=device)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)    # (B, P)
            mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)          # (B, P)
            for j, i in enumerate(rows):
                p = torch.tensor(prompts[i], dtype=torch.long, device=device)
                ids[j, width - len(p):] = p
                mask[j, width - len(p):] = 1
            for j, seq in enumerate(_decode(model, ids, mask, max_new_tokens, stop_t)):
                out[rows[j]] = seq
    finally:
        model.train(was_training)
    return out


def _decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop: torch.Tensor) -> list[list[int]]:
    """Greedy decoding of one left-padded batch; ids, mask (B, P)."""
    from geffect.forward import cache_kwargs, keeps_logits, kv_cache
    pos = (mask.cumsum(-1) - 1).clamp_min(0)                                            # (B, P)
    last = {"logits_to_keep": 1} if keeps_logits(model) else {}                         # the next token's only
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **last)
    past, pos = kv_cache(res), pos[:, -1:]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)               # (B,)
    steps: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        nxt = res.logits[:, -1].argmax(-1)                                              # (B,)
        ended = torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(done)
        steps.append(torch.where(done | ended, -1, nxt))
        done |= ended
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)                 # (B, P + t + 1)
        pos = pos + 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **cache_kwargs(model, past))
        past = kv_cache(res)
    if not steps:
        return [[] for _ in range(ids.shape[0])]
    gen = torch.stack(steps, dim=1).tolist()                                            # (B, steps)
    return [row[:row.index(-1)] if -1 in row else row for row in gen]


def generate(model, tok, questions: list[str], fmt: str | PromptFormat = "chat", max_new_tokens: int = 64,
             batch_size: int = 16) -> list[str]:
    """Greedy answers, as text, to each question in prompt format ``fmt``."""
    f = prompt_format(fmt)
    prompts = [f.prompt_ids(tok, q) for q in questions]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = greedy_ids(model, prompts, max_new_tokens, batch_size, stop_ids(model, tok), pad)
    return [tok.decode(s, skip_special_tokens=True).strip() for s in seqs]
