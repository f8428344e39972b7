"""Shared test set-up: tiny data, batches and one engine step through the product's own Step."""
from __future__ import annotations

import random

import torch

from geffect.config import Hyper, ProfileConfig
from geffect.data.sampling import Data, MicroBatch, make_batch
from geffect.data.synthetic import default_splits, idk_answers
from geffect.engine import Due, Engine
from geffect.models import byte_tokenizer, tiny_model
from geffect.objectives import parse_method
from geffect.reference import Reference
from geffect.step import Step


def tiny_data(n_forget: int = 3, n_retain: int = 2) -> Data:
    sp = default_splits(0)
    return Data(sp["forget"][:n_forget], sp["retain"][:n_retain], [], idk_answers(), True)


def method_of(spec: str, **hyper):
    """A method; RMU reads block 1 (of the tiny models' two)."""
    return parse_method(spec, Hyper(rmu_layer=1, **hyper))


def micro_batch(tok, method, data: Data, max_length: int = 96) -> MicroBatch:
    batch = make_batch(tok, method.segments, data.forget, data.retain, data, random.Random(0), max_length)
    return MicroBatch(batch, list(range(len(data.forget))), list(range(len(data.retain))))


def setup(model, method, seed: int = 0):
    """The method's context (RMU: freezes all but its blocks) and a frozen θ_o copy."""
    ctx = method.setup(model, seed)
    return ctx, Reference.frozen_copy(model) if method.needs_ref else None


EFFECTS = Due(effects=True)


def engine_step(model, method, mb: MicroBatch, ref=None, cfg: ProfileConfig | None = None, ctx=None,
                due: Due = EFFECTS):
    """One step without update with the engine on; returns (engine, StepResult)."""
    eng = Engine(model, cfg)
    res = Step(model, method, ref, ctx, eng)([mb], due)
    return eng, res


def per_split(res) -> dict:
    """{"forget": (n_f, G), "retain": (n_r, G)} of the step's batch effects."""
    e = next(e for e in res.effects if e.source == "batch")
    return {"forget": e.forget, "retain": e.retain}


def tied_llama():
    """A tiny Llama with tied embeddings (SmolLM2's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tok = byte_tokenizer(None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, tok


def models():
    for kind in ("tiny-llama", "tiny-gpt2"):
        lm = tiny_model(kind, seed=0)
        yield kind, lm.model, lm.tokenizer
    yield ("tied-llama", *tied_llama())
