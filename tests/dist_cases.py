"""The cases the distributed tests run (imported by the test and by its torchrun worker alike).

Each case runs 3 profiled steps of a method on a tiny model from seeded weights, with θ_o perturbed
off θ (at θ = θ_o the KL and RMU retain gradients are rounding noise and so is every cosine with
them), pairs and tokens every step, and returns every record table and the final weights. SGD: the
update is the gradient, so the weights compare the gradients themselves (Adam would turn a
gradient that is rounding noise, e.g. GPT-2's key bias, into a step of ±lr).
"""
from __future__ import annotations

import torch

from geffect.config import ProfileConfig, UnlearnConfig
from geffect.loop import unlearn
from geffect.models import tiny_model
from geffect.objectives import parse_method
from geffect.reference import Reference

# (method, model, PCGrad scope): the methods on the tied (GPT-2) and untied (Llama) tiny models
CASES = [("gd", "tiny-gpt2", "global"), ("gd", "tiny-llama", "global"),
         ("npo+gd", "tiny-llama", "global"), ("npo+gd", "tiny-gpt2", "global"),
         ("npo+kl", "tiny-llama", "global"), ("npo+kl", "tiny-gpt2", "global"),
         ("gd+pcgrad", "tiny-gpt2", "global"), ("gd+pcgrad", "tiny-llama", "group"),
         ("npo+gd+pcgrad", "tiny-llama", "group"), ("rmu", "tiny-llama", "global"), ("rmu", "tiny-gpt2", "global")]
TABLES = ("records", "geffect", "instances", "conflicts", "pairs", "tokens")


def run_case(method: str, model: str, scope: str, parallel: str = "ddp") -> dict:
    """Every record and the final weights (rank 0's full copy under FSDP) of one case."""
    loaded = tiny_model(model, seed=0)
    ref = Reference.frozen_copy(loaded.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for q in ref.model.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=gen))
    cfg = UnlearnConfig(method=method, model=model, memorize="no", steps=3, lr=5e-2, optimizer="sgd", forget_batch=4, retain_batch=4,
                        max_length=96, progress=False, parallel=parallel, save_model=False, memory_check=False,
                        pcgrad_scope=scope)
    out = unlearn(cfg, None, profile=ProfileConfig(pairs_every=1, tokens_every=1), loaded=loaded,
                  reference=ref if parse_method(method).needs_ref else None)
    res = {t: out[t] for t in TABLES}
    from geffect.distributed import World
    world = World.init(parallel)
    if world.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        res["weights"] = get_model_state_dict(loaded.model, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
    else:
        res["weights"] = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    return res
