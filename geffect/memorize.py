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
from geffect.forward import logits_window
from geffect.models import LoadedModel
from geffect.objectives import functional as fn


def cache_root() -> Path:
    return Path(os.environ.get("GEFFECT_CACHE", Path.home() / ".cache" / "geffect"))


def source_fingerprint(model_name: str) -> list:
    """What identifies the weights behind a model name: the size and modification time of its files
    (a GGUF file, or a directory's weight and config files), so that replacing a model at the same
    path misses the cache; a built-in or hub name stands for itself."""
    from geffect.models import smollm2_gguf_path
    path = smollm2_gguf_path() if model_name == "smollm2-135m" else Path(model_name)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model"))
    else:
        return [model_name]
    return [model_name] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def memorize_key(model_name: str, records: list[QARecord], epochs: int, lr: float, seed: int,
                 dtype: str = "float32", fmt: str = "chat") -> str:
    extra = [] if fmt == "chat" else [fmt]
    h = hashlib.sha256(json.dumps([source_fingerprint(model_name), dtype, epochs, lr, seed,
                                   [(r.question, r.answer) for r in records], *extra]).encode()).hexdigest()
    return h[:16]


EPOCHS, LR = 4, 3e-4


def _load(path: Path, device, dtype: str):
    from transformers import AutoModelForCausalLM

    from geffect.hardware import torch_dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
    model.eval()
    return model


def cached(model_name: str, records: list[QARecord], epochs: int = EPOCHS, lr: float = LR,
           seed: int = 0, device="cpu", dtype: str = "float32", fmt: str = "chat") -> LoadedModel | None:
    """The memorised model and tokenizer from the cache, without loading the base model; or None."""
    from transformers import AutoTokenizer

    path = cache_root() / "memorized" / memorize_key(model_name, records, epochs, lr, seed, dtype, fmt)
    if not (path / "config.json").exists() or not (path / "tokenizer_config.json").exists():
        return None
    return LoadedModel(_load(path, device, dtype), AutoTokenizer.from_pretrained(path), model_name)


def memorize(loaded: LoadedModel, records: list[QARecord], epochs: int = EPOCHS, lr: float = LR,
             batch_size: int = 8, max_length: int = 128, seed: int = 0, use_cache: bool = True,
             progress: bool = True, dtype: str = "float32", fmt: str = "chat") -> LoadedModel:
    """Fine-tune ``loaded`` on ``records`` (cached) in prompt format ``fmt``; returns the tuned model."""
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    path = cache_root() / "memorized" / memorize_key(loaded.name, records, epochs, lr, seed, dtype, fmt)
    if use_cache and (path / "config.json").exists():
        if not (path / "tokenizer_config.json").exists():   # a cache from before tokenizers were kept:
            tok.save_pretrained(path)                         # complete it, so `cached` hits next time
        return LoadedModel(_load(path, device, dtype), tok, loaded.name)
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
            batch = collate(tok, {"train": qa(chunk)}, max_length, fmt).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           **logits_window(model, batch)).logits                       # (n, k, V) the answer window
            loss = fn.nll_loss(*fn.token_nll(logits, batch.labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(nll=f"{loss.item():.3f}")
    bar.close()
    del opt
    model.zero_grad(set_to_none=True)
    model.eval()
    if use_cache:
        save_atomically(model, tok, path)
    return LoadedModel(model, tok, loaded.name)


def save_atomically(model, tok, path: Path) -> None:
    """Write into ``path.partial`` (cleared first), then rename; a concurrent writer's copy wins."""
    import shutil
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:           # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
