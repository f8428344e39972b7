"""The training forward of θ over a batch, optionally in row chunks, and θ_o's values beside it.

Chunks: when a method's two parts need their own gradients (PCGrad, conflict statistics), the
forget-side rows (forget, idk, mismatch) and the retain rows run as separate forwards (the same
total work), so that a part computed on its chunk's *view* back-propagates through that chunk only.
"""
from __future__ import annotations

import inspect

import torch

from geffect.data.batching import answer_window
from geffect.objectives import ForwardOut, Method, ObjectiveContext
from geffect.objectives import functional as fn
from geffect.reference import Reference


def part_rows(segments: dict[str, slice]) -> list[torch.Tensor]:
    """Row chunks of a batch for a backward split into parts: the forget-side rows (forget, idk,
    mismatch) and the retain rows. Each part's loss reads only its own chunk."""
    r = segments["retain"]
    n = max(s.stop for s in segments.values())
    rest = [i for i in range(n) if not r.start <= i < r.stop]
    # host-side bookkeeping (the capture compares them), moved to the batch's device where they index
    return [torch.tensor(rest, dtype=torch.long, device="cpu"), torch.arange(r.start, r.stop, device="cpu")]


def positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Explicit (N, T) positions 0..T-1 per row (right padding): position embeddings then see one row
    per sample, so per-sample quantities stay per sample instead of a broadcast (1, T)."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


FULL_LOGITS = False   # tests: every forward computes every position's logits (the twin of the window)


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs)."""
    return takes(model, "logits_to_keep")


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The keyword a forward takes its key/value cache by: ``cache`` (transformers 5.2x) or
    ``past_key_values`` (before; the newer versions still take it, with a deprecation warning)."""
    return {"cache" if takes(model, "cache") else "past_key_values": cache}


def kv_cache(out):
    """The key/value cache a forward returned (``cache`` or, before transformers 5.2x, ``past_key_values``)."""
    cache = out.get("cache")             # (out.past_key_values itself warns where ``cache`` exists)
    return cache if cache is not None else out.past_key_values


def takes(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward takes keyword ``name``: the innermost model's signature, inside DDP's
    ``module`` and PEFT's base model, which hand keyword arguments on."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "get_base_model"):                 # PEFT
            nxt = inner.get_base_model()
        elif type(inner).__name__ == "DistributedDataParallel":
            nxt = inner.module
        else:
            break
        if nxt is inner:
            break
        inner = nxt
    try:
        return name in inspect.signature(getattr(inner, "forward", inner)).parameters
    except (TypeError, ValueError):                              # no signature to read: every position
        return False


def logits_window(model: torch.nn.Module, batch) -> dict:
    """The forward's keyword for the answer window: logits at the last ``batch.window`` positions only
    (every answer token's NLL reads one of them), where the model takes ``logits_to_keep``; ``{}``
    (every position) otherwise. The output projection, the softmax and their backward then cover
    the answer window instead of the whole row (about a third of a TOFU-style chat row), and the
    (N, k, V) logits, often a step's largest tensor, shrink alike. Every objective reads the logits at
    answer-predicting positions only (:mod:`geffect.objectives.functional`), so the values are the
    same up to rounding."""
    k = batch.window if getattr(batch, "window", None) is not None else answer_window(batch.labels)
    if FULL_LOGITS or k is None or k >= batch.labels.shape[1] or not keeps_logits(model):
        return {}
    return {"logits_to_keep": k}


def forward(model, reference: Reference | None, batch, method: Method, ctx: ObjectiveContext | None = None,
            chunks: list[torch.Tensor] | None = None, cap=None) -> ForwardOut:
    """One forward of θ (with grad) and, if the method needs them, θ_o's values on the same rows.

    ``chunks`` runs θ's forward separately on disjoint row sets and reassembles the rows in order;
    ``cap`` (a Capture) is told which rows each forward covers.
    """
    ctx = ctx or ObjectiveContext()
    layer = ctx.hidden_layer if method.needs_hidden else None
    pos = positions(batch.input_ids)
    window = logits_window(model, batch)          # the same for every chunk: their logits line up
    outs = []
    for idx in chunks or [None]:
        sel = slice(None) if idx is None else idx.to(batch.input_ids.device)
        if cap is not None:
            cap.rows = idx
        outs.append(model(input_ids=batch.input_ids[sel], attention_mask=batch.attention_mask[sel],
                          position_ids=pos[sel], output_hidden_states=layer is not None, use_cache=False, **window))
    if cap is not None:
        cap.rows = None
    if chunks is None:
        out = outs[0]
        nll, mask = fn.token_nll(out.logits, batch.labels)
        fo = ForwardOut(nll, mask, out.logits, batch.labels, batch.segments,
                        hidden=out.hidden_states[layer + 1] if layer is not None else None,
                        attention=batch.attention_mask)
    else:
        fo = _chunked(outs, chunks, batch, layer, method.needs_ref_logits)
    if method.needs_ref:
        present = [s for s in method.reference_rows("nll") if s in batch.segments]
        nll_rows = [i for s in present for i in range(batch.segments[s].start, batch.segments[s].stop)]
        on_rows = [s for s in method.reference_rows("logits") if s in batch.segments]
        hid_rows = [s for s in method.reference_rows("hidden") if s in batch.segments]
        ref = reference.values(batch, nll_rows, tuple(on_rows), tuple(hid_rows), layer)
        for x in [fo, *(fo.views or [])]:
            x.ref_nll, x.ref_logits, x.ref_hidden = ref.nll, ref.logits, ref.hidden
    return fo


def _chunked(outs, chunks: list[torch.Tensor], batch, hidden_layer: int | None, view_logits: bool) -> ForwardOut:
    """Reassemble per-chunk outputs in row order, plus one view per chunk in which the other chunks'
    rows are detached: a part computed on view k back-propagates through chunk k only (a
    concatenation would send zero gradients through every chunk). The views carry the (N, T, V)
    logits only when an objective reads them (``view_logits``: KL terms)."""
    order = torch.cat(chunks)
    inv = None if bool((order[1:] > order[:-1]).all()) else torch.argsort(order).to(batch.labels.device)

    def assemble(ts):
        t = torch.cat(ts)
        return t if inv is None else t[inv]

    per = [fn.token_nll(o.logits, batch.labels[idx.to(batch.labels.device)]) for o, idx in zip(outs, chunks)]
    mask = assemble([m for _, m in per])
    hid = [o.hidden_states[hidden_layer + 1] for o in outs] if hidden_layer is not None else None
    views = []
    for k in range(len(outs)):
        def own(ts, k=k):
            return assemble([t if j == k else t.detach() for j, t in enumerate(ts)])
        views.append(ForwardOut(own([n for n, _ in per]), mask,
                                own([o.logits for o in outs]) if view_logits else None, batch.labels,
                                batch.segments, hidden=own(hid) if hid is not None else None,
                                attention=batch.attention_mask))
    fo = ForwardOut(assemble([n for n, _ in per]), mask, None, batch.labels, batch.segments,
                    hidden=assemble(hid) if hid is not None else None, attention=batch.attention_mask)
    fo.views, fo.nll_leaves, fo.row_inv = views, [n for n, _ in per], inv
    return fo
