"""Tokenisation and batching: prompts, answer-only labels, right padding, named row segments.

One training step runs ONE forward pass over a padded batch whose rows are grouped in named
segments: ``forget`` (forget question + forget answer), ``retain``, and, for some objectives,
``idk`` (forget question + an "I don't know" answer) or ``mismatch`` (forget question + a random
retain answer). Labels are -100 on the prompt and on padding, so losses never see them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from geffect.data.prompts import PromptFormat, prompt_format
from geffect.data.records import QARecord
from geffect.errors import DataError

IGNORE = -100


def answer_window(labels: torch.Tensor) -> int | None:
    """How many trailing positions' logits the answer tokens' NLLs read: the logits at position t
    predict token t+1, so from the first position (in any row) whose next token is an answer token
    to the end. labels (N, T) -> k in [1, T]; T when no row has an answer token; None on the meta
    device (no values to read). One host read where the labels live on an accelerator."""
    if labels.device.type == "meta":
        return None
    T = labels.shape[1]
    answer = (labels[:, 1:] != IGNORE).any(0).nonzero()                  # positions t whose next token is
    return T - int(answer.min()) if len(answer) else T                     # an answer token, in some row


@dataclass
class Batch:
    input_ids: torch.Tensor       # (N, T)
    attention_mask: torch.Tensor  # (N, T) 1 on real tokens
    labels: torch.Tensor          # (N, T) token id on answer tokens, IGNORE elsewhere
    segments: dict[str, slice]    # segment name -> rows
    # trailing positions whose logits any answer token's NLL reads (:func:`answer_window`); taken
    # from the labels while they are on the host (no device read later)
    window: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.window is None and self.labels.device.type == "cpu":
            self.window = answer_window(self.labels)

    def rows(self, name: str) -> slice:
        return self.segments[name]

    def to(self, device) -> Batch:
        """The same batch on ``device`` (the model's)."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.segments, self.window)


def format_prompt(tokenizer, question: str, fmt: str | PromptFormat = "chat") -> str:
    """The prompt text of ``question`` in format ``fmt`` (see :mod:`prompts`)."""
    return prompt_format(fmt).prompt_text(tokenizer, question)


def encode_pair(tokenizer, question: str, answer: str, max_length: int, where: str = "",
                fmt: str | PromptFormat = "chat") -> tuple[list, list]:
    """Token ids of prompt+answer(+eos) in format ``fmt`` and the label ids (IGNORE on prompt tokens)."""
    ids, n_prompt = prompt_format(fmt).encode(tokenizer, question, answer)
    if n_prompt >= max_length:
        raise DataError(f"{where or 'record'}: field 'question': the prompt is {n_prompt} tokens, "
                        f"longer than the maximum length {max_length} (raise --max-length)")
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return ids[:max_length], labels[:max_length]


def collate(tokenizer, segments: dict[str, list[tuple[str, str, str]]], max_length: int,
            fmt: str | PromptFormat = "chat") -> Batch:
    """Build one right-padded batch from named lists of (question, answer, where) triples."""
    all_ids, all_labels, slices, start = [], [], {}, 0
    for name, pairs in segments.items():
        for q, a, where in pairs:
            ids, labels = encode_pair(tokenizer, q, a, max_length, where, fmt)
            all_ids.append(ids)
            all_labels.append(labels)
        slices[name] = slice(start, start + len(pairs))
        start += len(pairs)
    width = max(len(x) for x in all_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(all_ids)
    # built on the host; the step moves each batch to the model's device (Batch.to)
    input_ids = torch.full((n, width), pad, dtype=torch.long, device="cpu")
    labels = torch.full((n, width), IGNORE, dtype=torch.long, device="cpu")
    mask = torch.zeros((n, width), dtype=torch.long, device="cpu")
    for i, (ids, lab) in enumerate(zip(all_ids, all_labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids, device="cpu")
        labels[i, : len(lab)] = torch.tensor(lab, device="cpu")
        mask[i, : len(ids)] = 1
    return Batch(input_ids, mask, labels, slices)


def qa(records: list[QARecord]) -> list[tuple[str, str, str]]:
    return [(r.question, r.answer, r.source) for r in records]


def check_lengths(tokenizer, records: list[QARecord], max_length: int, fmt: str | PromptFormat = "chat") -> int:
    """Fail early, naming file, line and field, if any prompt exceeds ``max_length``; return how many
    records have answers cut to fit (prompt + answer + end-of-sequence longer than ``max_length``)."""
    cut = 0
    for r in records:
        encode_pair(tokenizer, r.question, r.answer, max_length, r.source, fmt)
        cut += len(prompt_format(fmt).encode(tokenizer, r.question, r.answer)[0]) > max_length
    return cut
