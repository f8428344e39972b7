"""θ_o, the frozen starting weights that NPO, TNPO, WTNPO, IdkDPO, KL and RMU compare against.

Three ways to hold it, chosen per run (``--reference``; :func:`make_reference`):

- ``cache``: θ_o's per-token log-probabilities of every row the objective can read (the forget
  answers, and for IdkDPO every forget question with every "I don't know" answer) computed once
  before unlearning, then no model at all: exact for objectives that read only those (NPO, TNPO,
  WTNPO, IdkDPO), and it removes the reference forward from every step.
- ``copy``: a frozen copy of the starting weights (on ``--reference-device``, e.g. the CPU), for
  objectives that read θ_o's whole distribution (KL) or a hidden state (RMU); each step forwards
  only the rows those parts read.
- with LoRA, the trained model itself with its adapters disabled: exact and no copy.

A reference answers :meth:`Reference.values` for the rows each part reads (the method says which:
:meth:`~geffect.objectives.methods.Method.reference_rows`).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from geffect.errors import ConfigError
from geffect.objectives import functional as fn


@dataclass
class ReferenceValues:
    """θ_o's values on one batch's rows."""
    nll: torch.Tensor | None = None                       # (N, T-1) answer-token NLL (0 on rows not asked for)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)   # segment -> (n, k, V), the batch's window
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)   # segment -> (n, T, d)


class Reference:
    """θ_o: a model to run (a frozen copy, or the trained model with adapters disabled), a cache of
    per-token NLLs by row, or both."""

    def __init__(self, model: torch.nn.Module | None = None, disable_adapters: bool = False,
                 device: torch.device | None = None):
        self.model, self.disable_adapters = model, disable_adapters
        self.device = device
        self.cache: dict[tuple, torch.Tensor] | None = None      # row key -> (L-1,) NLL; None: not caching

    @classmethod
    def frozen_copy(cls, model: torch.nn.Module, device: str | torch.device | None = None) -> Reference:
        """A frozen copy of the model's current weights (on ``device``; default the model's)."""
        ref = copy.deepcopy(model)
        ref.eval()
        ref.requires_grad_(False)
        if device is not None:
            ref.to(device)
        return cls(ref)

    @classmethod
    def adapters_disabled(cls, peft_model: torch.nn.Module) -> Reference:
        """The trained PEFT model with its adapters disabled: θ_o exactly, no copy."""
        return cls(peft_model, disable_adapters=True)

    # ---- running θ_o ----------------------------------------------------------------------------

    @contextmanager
    def _as_reference(self):
        m = self.model
        if not self.disable_adapters:
            yield m
            return
        was_training = m.training
        m.eval()
        try:
            with m.disable_adapter():
                yield m
        finally:
            m.train(was_training)

    @torch.no_grad()
    def _run(self, batch, rows: list[int], hidden_layer: int | None):
        """θ_o's output on some rows of a batch (inputs moved to θ_o's device, outputs back)."""
        if self.model is None:
            raise ConfigError("θ_o was cached for the forget rows only, and a row outside them was asked for; "
                              "use --reference copy")
        dev = next(self.model.parameters()).device
        idx = torch.tensor(rows, device=batch.input_ids.device)
        ids, att = batch.input_ids[idx].to(dev), batch.attention_mask[idx].to(dev)
        from geffect.forward import logits_window, positions
        with self._as_reference() as m:
            # the batch's answer window (every row's): θ_o's logits line up with θ's (KL)
            out = m(input_ids=ids, attention_mask=att, position_ids=positions(ids),
                    output_hidden_states=hidden_layer is not None, use_cache=False, **logits_window(m, batch))
        back = batch.input_ids.device
        hid = out.hidden_states[hidden_layer + 1].to(back) if hidden_layer is not None else None
        return out.logits.to(back), hid

    # ---- the cache ------------------------------------------------------------------------------

    @staticmethod
    def _keys(batch, rows: list[int]) -> list[tuple]:
        """Each row's cache key: (prompt length, its n token ids), n = its attention mask's sum. One
        host transfer for all rows (each read is a device sync on an accelerator)."""
        if not rows:
            return []
        idx = torch.tensor(rows, device=batch.input_ids.device)
        ids = batch.input_ids[idx]                                                    # (R, T)
        n = batch.attention_mask[idx].sum(1)                                          # (R,)
        inside = torch.arange(ids.shape[1], device=ids.device)[None, :] < n[:, None]  # (R, T)
        prompt = ((batch.labels[idx] == -100) & inside).sum(1)                       # (R,)
        host = torch.cat([n[:, None], prompt[:, None], ids], 1).tolist()
        return [(r[1], *r[2:2 + r[0]]) for r in host]

    def fill_cache(self, tok, pairs: list[tuple[str, str]], max_length: int, batch_size: int = 16,
                   fmt="chat") -> int:
        """Cache θ_o's per-token NLL of every (question, answer) row in ``pairs``; returns rows cached."""
        from geffect.data.batching import collate
        self.cache = {} if self.cache is None else self.cache
        dev = next(self.model.parameters()).device
        for k in range(0, len(pairs), batch_size):
            b = collate(tok, {"x": [(q, a, "") for q, a in pairs[k:k + batch_size]]}, max_length, fmt).to(dev)
            self._store(b, list(range(len(b.input_ids))), None)
        return len(self.cache)

    def _store(self, batch, rows: list[int], logits: torch.Tensor | None) -> None:
        """Compute (if ``logits`` is None) and cache the NLL of ``rows`` of ``batch``."""
        if logits is None:
            logits, _ = self._run(batch, rows, None)
        nll, _ = fn.token_nll(logits, batch.labels[rows])
        for j, key in enumerate(self._keys(batch, rows)):
            self.cache[key] = nll[j, :len(key) - 2].clone()                 # key: (prompt, n ids) -> n - 1 NLLs

    def drop_model(self) -> None:
        """Free θ_o once everything it will be asked for is cached."""
        self.model = None

    # ---- what objectives read -------------------------------------------------------------------

    def values(self, batch, nll_rows: list[int], logit_segments: tuple[str, ...] = (),
               hidden_segments: tuple[str, ...] = (), hidden_layer: int | None = None) -> ReferenceValues:
        """θ_o's per-token NLL on ``nll_rows``, logits and hidden states on the named segments."""
        out = ReferenceValues()
        seg_rows = {s: list(range(batch.segments[s].start, batch.segments[s].stop))
                    for s in (*logit_segments, *hidden_segments)}
        todo = sorted({i for rows in seg_rows.values() for i in rows})
        keys = dict(zip(nll_rows, self._keys(batch, nll_rows))) if self.cache is not None else {}
        missing = nll_rows if self.cache is None else [i for i in nll_rows if keys[i] not in self.cache]
        run = sorted(set(todo) | set(missing))
        logits = hidden = None
        if run:
            logits, hidden = self._run(batch, run, hidden_layer if hidden_segments else None)
        at = {i: j for j, i in enumerate(run)}
        if nll_rows:
            N, T = batch.input_ids.shape
            out.nll = torch.zeros(N, T - 1, device=batch.input_ids.device)
            if missing:
                sel = [at[i] for i in missing]
                if self.cache is not None:
                    self._store(batch, missing, logits[sel])
                else:
                    nll, _ = fn.token_nll(logits[sel], batch.labels[missing])
                    out.nll[missing] = nll
            if self.cache is not None:
                for i in nll_rows:
                    v = self.cache[keys[i]]
                    out.nll[i, :len(v)] = v
        for s in logit_segments:        # a segment without rows (a measure micro-batch) gets nothing
            if seg_rows[s]:
                out.logits[s] = logits[[at[i] for i in seg_rows[s]]]
        for s in hidden_segments:
            if seg_rows[s]:
                out.hidden[s] = hidden[[at[i] for i in seg_rows[s]]]
        return out


IDK_CACHE_LIMIT = 4096   # forget × idk rows precomputed at most; above, θ_o is kept and rows cached as seen


def make_reference(model, method, mode: str, tok=None, data=None, max_length: int = 128, lora: bool = False,
                   device: str | None = None, fmt="chat") -> Reference | None:
    """θ_o for a run (see the module docstring). ``mode``: auto, copy or cache."""
    if not method.needs_ref:
        return None
    reads_more = bool(method.reference_rows("logits") or method.reference_rows("hidden"))
    if mode == "cache" and reads_more:
        raise ConfigError(f"--reference cache: {method.name} reads θ_o's distribution or hidden state, which is "
                          "not cached; use --reference copy (or auto)")
    if lora:
        ref = Reference.adapters_disabled(model)
    else:
        ref = Reference.frozen_copy(model, device) if mode == "copy" or reads_more else Reference(model)
    if mode == "copy" or reads_more or tok is None:
        return ref
    pairs = [(r.question, r.answer) for r in data.forget]
    idk = "idk" in method.reference_rows("nll")
    combos = len(data.forget) * len(data.idk) if idk else 0
    if combos <= IDK_CACHE_LIMIT:
        pairs += [(r.question, a) for r in data.forget for a in data.idk] if idk else []
        ref.fill_cache(tok, pairs, max_length, fmt=fmt)
        if not lora:
            ref.drop_model()           # everything θ_o will be asked for is cached: no copy is kept
        return ref
    if not lora:                       # too many rows to precompute: keep a copy, cache rows as they come
        ref = Reference.frozen_copy(model, device)
    ref.fill_cache(tok, pairs, max_length)
    return ref
