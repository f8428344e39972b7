"""``geffect.measure``: one step's G-effects at the given weights, with no update."""
from __future__ import annotations

import random

from geffect.data.batching import collate, qa
from geffect.engine.profiler import Engine, ProfileConfig
from geffect.objectives import Hyper
from geffect.unlearn import UnlearnConfig, forward, instance_weights, prepare


def measure(method: str = "npo+gd", model: str = "smollm2-135m", forget: str | None = None,
            retain: str | None = None, memorize: str = "auto", hyper: Hyper | None = None,
            profile: ProfileConfig | None = None, max_length: int = 128, seed: int = 0, loaded=None) -> dict:
    """G-effects of one step of ``method``, with the whole forget and retain sets as one batch each.

    Returns ``{"unlearn": {group: v, …, "total": v}, "retain": {…}, "per_instance": [{"split",
    "index", "value", "weight"}, …], "groups": [...]}``. The model is not updated.
    """
    cfg = UnlearnConfig(method=method, model=model, forget=forget, retain=retain, memorize=memorize,
                        max_length=max_length, seed=seed, progress=False)
    st = prepare(cfg, hyper, loaded)
    meth, data, mdl, tok = st["method"], st["data"], st["model"], st["tok"]
    segs = {"forget": qa(data.forget), "retain": qa(data.retain)}
    rng = random.Random(seed)
    if "idk" in meth.segments:
        segs["idk"] = [(r.question, rng.choice(data.idk), r.source) for r in data.forget]
    if "mismatch" in meth.segments:
        segs["mismatch"] = [(r.question, rng.choice(data.retain).answer, r.source) for r in data.forget]
    batch = collate(tok, segs, max_length)
    engine = Engine(mdl, profile or ProfileConfig())
    mdl.zero_grad(set_to_none=True)
    with engine.capture() as cap:
        fo = forward(mdl, st["ref"], batch, meth, st["rmu_layer"])
        parts = meth.parts(fo, st["control"])
        engine.backward(cap, fo, parts.total, meth.needs_hidden)
    res = engine.measure(cap, batch.segments, engine.direction_from_grads())
    mdl.zero_grad(set_to_none=True)
    out = engine.summarise(res)
    w = instance_weights(parts)
    out["per_instance"] = [
        {"split": split, "index": i, "value": res[split][i].sum().item(),
         "weight": (w[i].item() if split == "forget" and w is not None else None)}
        for split in ("forget", "retain") for i in range(res[split].shape[0])]
    out["groups"] = engine.groups
    out["method"] = meth.name
    return out
