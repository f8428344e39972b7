"""Perplexity of a text corpus, token and word level (REFERENCE.md §5; the detox study reports word
perplexity on WikiText).

The text is tokenized once and cut into windows of at most ``window`` tokens that do not overlap;
each window is scored after a start token (BOS, else EOS), so every token of the corpus is predicted
once, as lm-evaluation-harness's rolling windows do without overlap. With the total NLL over all
tokens: token perplexity = exp(NLL / tokens), word perplexity = exp(NLL / words), words counted by
whitespace splitting.

Corpora available offline: any UTF-8 text file, the answers of a data split (a JSON/JSONL file of
question-answer records), or ``pydoc``: the prose of the Python language reference that every Python
installation ships (``pydoc_data.topics``, PSF licence), a generic English text for a fluency check
where WikiText cannot be downloaded.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from geffect.errors import DataError

BUILTIN_TEXTS = ("pydoc",)


def builtin_text(name: str, max_chars: int = 40_000) -> str:
    """A built-in corpus (``pydoc``), the first ``max_chars`` characters of it."""
    if name == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k].strip() for k in sorted(topics))[:max_chars]
    raise DataError(f"unknown built-in text {name!r} (choose one of {', '.join(BUILTIN_TEXTS)} or give a file)")


def load_text(source: str, max_chars: int = 40_000) -> str:
    """The corpus named by ``source``: a built-in name, a text file, or a data file's answers."""
    if source in BUILTIN_TEXTS:
        return builtin_text(source, max_chars)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: perplexity text not found (a UTF-8 text file, a data file, or one of "
                        f"{', '.join(BUILTIN_TEXTS)})")
    if path.suffix in (".json", ".jsonl"):
        from geffect.data.records import load_records
        return "\n".join(r.answer for r in load_records(path))[:max_chars]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{path}: empty text")
    return text[:max_chars]


@torch.no_grad()
def perplexity(model, tok, text: str, window: int = 512, batch_size: int = 4) -> dict:
    """Token and word perplexity of ``text`` and the counts they divide by."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise DataError("perplexity: the tokenizer has neither a BOS nor an EOS token to start a window with")
    if not ids:
        raise DataError("perplexity: the text has no tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [ids[i:i + window - 1] for i in range(0, len(ids), window - 1)]
    total = 0.0
    try:
        for i in range(0, len(chunks), batch_size):
            part = chunks[i:i + batch_size]
            width = 1 + max(len(c) for c in part)
            x = torch.full((len(part), width), start, dtype=torch.long, device=device)     # (B, W)
            mask = torch.zeros_like(x)
            for j, c in enumerate(part):
                x[j, 1:1 + len(c)] = torch.tensor(c, dtype=torch.long, device=device)
                mask[j, :1 + len(c)] = 1
            logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits      # (B, W, V)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), x[:, 1:],
                                                    reduction="none")                     # (B, W-1)
            total += float((nll * mask[:, 1:]).sum())
    finally:
        model.train(was_training)
    words = len(text.split())
    return {"perplexity_token": _exp(total / len(ids)), "perplexity_word": _exp(total / max(words, 1)),
            "perplexity_tokens": len(ids), "perplexity_words": words}


def _exp(x: float) -> float:
    """exp, with inf past float64's range (a collapsed model's perplexity)."""
    return math.exp(x) if x < 709 else float("inf")
