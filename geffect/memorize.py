"""Teach a model the bundled fictitious facts before unlearning them, and cache the result.

The default model cannot know fictitious authors, so nothing measurable would be unlearned.
As TOFU fine-tunes on all its authors before unlearning, this fine-tunes on the forget and retain
splits (NLL on answer tokens) and caches the model under ``$GEFFECT_CACHE`` (default
``~/.cache/geffect``), keyed by the model, the data and the settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from geffect.data.batching import collate, qa
from geffect.data.records import QARecord
from geffect.models import LoadedModel
from geffect.objectives import functional as fn


def cache_root() -> Path:
    return Path(os.environ.get("GEFFECT_CACHE", Path.home() / ".cache" / "geffect"))


def memorize_key(model_name: str, records: list[QARecord], epochs: int, lr: float, seed: int) -> str:
    h = hashlib.sha256(json.dumps([model_name, epochs, lr, seed, [(r.question, r.answer) for r in records]])
                       .encode()).hexdigest()
    return h[:16]


EPOCHS, LR = 4, 3e-4


def cached(model_name: str, records: list[QARecord], epochs: int = EPOCHS, lr: float = LR,
           seed: int = 0) -> LoadedModel | None:
    """The memorised model and tokenizer from the cache, without loading the base model; or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_root() / "memorized" / memorize_key(model_name, records, epochs, lr, seed)
    if not (path / "config.json").exists() or not (path / "tokenizer_config.json").exists():
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), model_name)


def memorize(loaded: LoadedModel, records: list[QARecord], epochs: int = EPOCHS, lr: float = LR,
             batch_size: int = 8, max_length: int = 128, seed: int = 0, use_cache: bool = True,
             progress: bool = True) -> LoadedModel:
    """Fine-tune ``loaded`` on ``records`` (cached); returns the tuned model."""
    from transformers import AutoModelForCausalLM

    path = cache_root() / "memorized" / memorize_key(loaded.name, records, epochs, lr, seed)
    if use_cache and (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        if not (path / "tokenizer_config.json").exists():   # a cache from before tokenizers were kept:
            loaded.tokenizer.save_pretrained(path)           # complete it, so `cached` hits next time
        return LoadedModel(model, loaded.tokenizer, loaded.name)
    model, tok = loaded.model, loaded.tokenizer
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = list(range(len(records)))
    n_steps = epochs * ((len(records) + batch_size - 1) // batch_size)
    bar = tqdm(total=n_steps, desc="memorize (teach the forget/retain facts)", disable=not progress)
    for _ in range(epochs):
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [records[j] for j in order[i:i + batch_size]]
            batch = collate(tok, {"train": qa(chunk)}, max_length)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = fn.nll_loss(*fn.token_nll(logits, batch.labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(nll=f"{loss.item():.3f}")
    bar.close()
    del opt
    model.eval()
    if use_cache:
        tmp = path.with_name(path.name + ".partial")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(path) if not path.exists() else None
    return LoadedModel(model, tok, loaded.name)
