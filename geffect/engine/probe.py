"""The fixed probe set: G-effects against the risk over the same rows every time it is measured."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from geffect.data.batching import collate, qa


@dataclass
class Probe:
    input_ids: torch.Tensor       # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor          # (N, T)
    segments: dict                # forget, retain
    forget_index: list
    retain_index: list


def probe_retain_indices(n_total: int, n: int, seed: int) -> list[int]:
    """The probe's seeded retain sample (indices into the retain set)."""
    return sorted(random.Random(seed + 99).sample(range(n_total), min(n, n_total)))


def make_probe(tok, data, n_retain: int, max_length: int, seed: int, forget: bool = True, fmt="chat",
               n_forget: int = 0, batch: int = 16) -> list[Probe]:
    """The whole forget set (or a seeded sample of ``n_forget``; none unless ``forget``) and a seeded
    sample of the retain set, in chunks of at most ``batch`` rows (one forward each)."""
    r_idx = probe_retain_indices(len(data.retain), n_retain, seed)
    f_idx = [] if not forget else (list(range(len(data.forget))) if n_forget <= 0 or n_forget >= len(data.forget)
                                   else sorted(random.Random(seed + 98).sample(range(len(data.forget)), n_forget)))
    rows = [("forget", i) for i in f_idx] + [("retain", i) for i in r_idx]
    chunks = []
    for k in range(0, len(rows), batch):
        part = rows[k:k + batch]
        fi, ri = [i for s, i in part if s == "forget"], [i for s, i in part if s == "retain"]
        b = collate(tok, {"forget": qa([data.forget[i] for i in fi]), "retain": qa([data.retain[i] for i in ri])},
                    max_length, fmt)
        chunks.append(Probe(b.input_ids, b.attention_mask, b.labels, b.segments, fi, ri))
    return chunks


class BaseProbe:
    """The probe's captures at one set of base weights, shared by runs that each start from them
    (``diagnose``: every candidate's first step starts from the same restored weights, so the probe
    rows' activations and risk cotangents there are the same for all; captured once, not once per
    candidate). Call :meth:`at_base` when the weights are (restored to) the base; the step calls
    :meth:`left_base` when it updates them. Keyed by which parameters train (RMU freezes all but
    a few blocks: fewer modules then carry a cotangent)."""

    def __init__(self):
        self._captured: dict[tuple, list] = {}
        self._here = False

    def at_base(self) -> None:
        self._here = True

    def left_base(self) -> None:
        self._here = False

    def captures(self, engine, probes: list[Probe]) -> tuple[list, bool]:
        """(the probe chunks' captures at the current weights, whether they are shared: a shared
        capture must not be released by its user)."""
        if not self._here:
            return [engine.capture_probe(p) for p in probes], False
        key = tuple(p.requires_grad for p in engine.model.parameters())
        if key not in self._captured:
            caps = [engine.capture_probe(p) for p in probes]
            for c in caps:          # plain tensors: no autograd graph of the probe forward kept alive
                for chunks in c.cap.seen.values():
                    for rec in chunks:
                        rec.inputs = tuple(x.detach() if torch.is_tensor(x) else x for x in rec.inputs)
            self._captured[key] = caps
        return self._captured[key], True
