"""A Linear layer's per-row G-effect products and its parts' conflict statistics in Gram form.

On the engine's reuse path the captured cotangents δ_t are the training ones and one forward
covered every row, so a Linear layer's gradient is ∇L_W = Σ_s δ_s a_sᵀ over every position s of
the step (∇L_b = Σ_s δ_s for a bias). The per-row products of the G-effects
(:func:`geffect.engine.rules.linear_rule`, Σ_{t∈i} δ_tᵀ ∇L_W a_t) are then sums of one K×K matrix
over the step's K positions:

    p_i = Σ_{t∈i} Σ_s M_ts,   M = (Δ Δᵀ) ∘ (A Aᵀ)       (+ Σ_{t∈i} Σ_s (Δ Δᵀ)_ts for the bias)

for K²(d_in + d_out) multiply-adds against K·d_in·d_out for the matmul form, and A Aᵀ is shared
by the layers that read one input (q/k/v, gate/up). The same M gives the conflict statistics of
the two parts (:mod:`geffect.engine.parts`: forget = every row outside the retain segment) with
no part's gradient formed: ‖g_f‖² = 1_fᵀ M 1_f, ⟨g_f, g_r⟩ = 1_fᵀ M 1_r, ‖g_r‖² = 1_rᵀ M 1_r.

The Fig. 5b pairs (:mod:`geffect.engine.pairs`) come from the same M: the risks' cotangents on
the reuse path are the training ones scaled per row (g_t = δ_t/c_t), so a forget instance's pair
is Σ_{s∈i} Σ_{t∈R} M_st /(c_t·n_R) over the forget-side positions s of instance i and the risk
R's rows t (forget rows for R_u, retain rows for R_r).

An output projection tied to the input embedding has ∇L_W = Σ_s δ_s a_sᵀ + E, E the embedding's
cotangents summed per token id (U compact rows): p_i gains Σ_{t∈i} Σ_u δ_t[id_u] (a_t·E_u), and
‖.grad‖² = 1ᵀM1 + 2⟨ΣΔAᵀ, E⟩ + ‖E‖² (its parts' statistics stay :mod:`geffect.engine.gram`'s).

Each layer checks the identity it rests on: 1ᵀ M 1 must equal ‖.grad‖² (to TOL). A layer whose
gradient holds anything else (its weight used outside the module, a hook writing to ``.grad``)
or whose Gram sums cancel fails it and takes the matmul form; statistics whose block sums cancel
(below CANCEL of their terms' magnitudes) are left to the formed path of :mod:`geffect.engine.gram`.
Taken where the flop count says it is cheaper (short batches; the output projection's few answer
positions), float32/64 only.
"""
from __future__ import annotations

import torch

from geffect.engine.capture import Capture, squared_norm
from geffect.engine.rules import _CONV1D, live_positions, nonzero_rows

TOL = 1e-3                # |1ᵀM1 − ‖.grad‖²| at most this share of ‖.grad‖², else the matmul form
CANCEL = 1e-3             # a part's block sum at least this share of Σ|M| over the block, else formed
FORCE: bool | None = None  # tests: the Gram form wherever eligible (True) or never (False); None: where cheaper
_FAST_DTYPES = (torch.float32, torch.float64)
_LINEAR = (torch.nn.Linear,) + ((_CONV1D,) if _CONV1D is not None else ())


class GramRows:
    """The Gram-form products of one streamed backward: :meth:`take` the layers that just completed.

    ``span`` is the rows of the per-row products (M covers every row of the step's one forward), ``retain``
    the retain segment, ``stats``: the conflict statistics are due (their cost in the matmul form
    counts in the choice, and the capture's ``part_stats`` receives them per tensor). ``segments``
    with ``pairs``: the capture's ``pair_products`` receives each layer's pairs, (n_f, 2) for
    (R_u, R_r) per forget instance, as :class:`geffect.engine.pairs.PairsAccumulator` adds them."""

    def __init__(self, cap: Capture, span: slice, retain: slice, stats: bool,
                 segments: dict[str, slice] | None = None, pairs: bool = False):
        self.cap, self.span, self.retain, self.want_stats = cap, span, retain, stats
        self._pairs = pair_weights(cap, segments) if pairs and segments is not None else None
        self._users: dict[int, int] = {}          # id(input) -> layers still to take
        self._outs: dict[int, list[int]] = {}     # id(input) -> output widths of the Linear layers reading it
        for name, recs in cap.seen.items():
            if len(recs) == 1 and recs[0].inputs and torch.is_tensor(recs[0].inputs[0]):
                k = id(recs[0].inputs[0])
                self._users[k] = self._users.get(k, 0) + 1
                if isinstance(cap.modules[name], _LINEAR):
                    self._outs.setdefault(k, []).append(_out_features(cap.modules[name]))
        self._choice: dict[int, bool] = {}        # id(input) -> Gram form for its layers (decided once, jointly)
        self._gram_a: dict[int, tuple] = {}      # id(input) -> (input, its positions (K,), A Aᵀ (K, K))
        # per layout of positions (N·T flat; the output projection may see only the answer window's N·k):
        # the step's positions that carry a cotangent and those that carry none (padding)
        self._shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.input_grams = 0                                               # A Aᵀ computed (shared ones once)

    def take(self, names: list[str], products: dict[str, torch.Tensor], skip=()) -> list[str]:
        """Per-row products (n_rows,) of the eligible layers among ``names`` into ``products``
        (unscaled, as :meth:`Capture.inner_products` gives them); returns the layers taken.
        ``skip``: layers of ``names`` already taken another way (counted as done with their input)."""
        done = []
        for n in names:
            recs = self.cap.seen.get(n, [])
            x = recs[0].inputs[0] if len(recs) == 1 and recs[0].inputs else None
            try:
                if n not in skip and self._eligible(n) and self._take(n, products):
                    done.append(n)
            finally:
                if torch.is_tensor(x) and id(x) in self._users:
                    self._users[id(x)] -= 1
                    if self._users[id(x)] <= 0:
                        self._users.pop(id(x))
                        self._gram_a.pop(id(x), None)
                        self._choice.pop(id(x), None)
        return done

    def _eligible(self, name: str) -> bool:
        """A Linear (or GPT-2 Conv1D) owning its parameters alone, one forward over every row, the
        training cotangents captured (the reuse path), float32/64."""
        cap, mod = self.cap, self.cap.modules[name]
        if not isinstance(mod, _LINEAR) or cap.row_scale is None:
            return False
        params = [p for p in mod._parameters.values() if p is not None and p.requires_grad]
        if not any(p is mod.weight for p in params) or any(
                p.grad is None or p.dtype not in _FAST_DTYPES
                or cap._owners.get(id(p)) != [name] and not (p is mod.weight and self._tied_to(name))
                for p in params):
            return False
        return self._one_record(name)

    def _one_record(self, name: str) -> bool:
        """One forward over every row, its cotangents captured (float32/64)."""
        recs = self.cap.seen.get(name, [])
        if len(recs) != 1:
            return False
        rec = recs[0]
        return (rec.rows is None and rec.grad is not None and rec.grad.dtype in _FAST_DTYPES
                and torch.is_tensor(rec.inputs[0]) and self.span.stop <= rec.grad.shape[0])

    def _tied_to(self, name: str) -> str | None:
        """The input embedding whose weight this output projection shares (its gradient then holds
        the embedding's rows too), if its record is at hand; not while the Fig. 5b pairs are due
        (their tied term is the pairs path's)."""
        mod, cap = self.cap.modules[name], self.cap
        owners = cap._owners.get(id(mod.weight), [])
        if self._pairs is not None or not isinstance(mod, torch.nn.Linear) or len(owners) != 2 or name not in owners:
            return None
        emb = owners[0] if owners[1] == name else owners[1]
        ok = isinstance(cap.modules[emb], torch.nn.Embedding) and self._one_record(emb)
        return emb if ok else None

    def _positions(self, mod: torch.nn.Module, g: torch.Tensor, d: torch.Tensor,
                   own: bool = False) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """The flat positions (K,) to sum over, whether they are the step's shared set, and the check
        still to read on the host, if any: a layer with cotangents on most positions takes every
        position that carries one in this step (found once: the padding carries none in any layer,
        checked per layer on those positions alone, ``d[dead].any()``, read with the layer's other
        values; if it holds, the layer is taken again with ``own`` positions), one with
        position-local cotangents (the output projection) its own."""
        idx = live_positions(mod, g)
        if idx is not None:
            return idx, False, None
        shared = self._shared.get(d.shape[0])
        if shared is not None and not own:
            keep, dead = shared
            return keep, True, (d[dead].any() if len(dead) else None)
        live = nonzero_rows(d)                                                       # (N·T,)
        if shared is None:
            keep = live.nonzero().flatten()
            self._shared[d.shape[0]] = keep, (~live).nonzero().flatten()
            return keep, True, None
        return live.nonzero().flatten(), False, None

    def _matmul_cost(self, K: int, N: int, d_in: int, d_out: int) -> float:
        """Multiply-adds of the matmul form: the per-row products, plus the retain part's norm in
        :mod:`geffect.engine.gram`'s cheaper form when the statistics are due."""
        cost = K * d_in * d_out
        if self.want_stats:
            K_r = K * (self.retain.stop - self.retain.start) // N
            cost += min(K_r * K_r * (d_in + d_out), K_r * d_in * d_out)
        return cost

    @staticmethod
    def _cheaper(gram_cost: float, matmul_cost: float) -> bool:
        return FORCE if FORCE is not None else gram_cost < matmul_cost

    def _take(self, name: str, products: dict[str, torch.Tensor], own: bool = False) -> bool:
        cap, mod = self.cap, self.cap.modules[name]
        rec = cap.seen[name][0]
        x, g = rec.inputs[0], rec.grad                                   # (N, T, in), (N, T, out)
        N, d_in, d_out = g.shape[0], x.shape[-1], g.shape[-1]
        T = g.numel() // (N * d_out)
        a, d = x.reshape(-1, d_in), g.reshape(-1, d_out)                 # (N·T, in), (N·T, out)
        idx, shared, unchecked = self._positions(mod, g.reshape(N, T, d_out), d, own)
        K = len(idx)
        emb = self._tied_to(name)
        if emb is not None:       # a tied output projection: + its embedding's U compact rows
            ids, E = embedding_rows(cap, emb, slice(None))                          # (U,), (U, in)
            use = not shared and self._cheaper(K * K * (d_in + d_out) + K * len(ids) * d_in, K * d_in * d_out)
        elif shared:              # one choice for all layers reading this input
            if id(x) not in self._choice:
                outs = self._outs.get(id(x), [d_out])
                self._choice[id(x)] = self._cheaper(K * K * (d_in + sum(outs)),
                                                    sum(self._matmul_cost(K, N, d_in, o) for o in outs))
            use = self._choice[id(x)]
        else:                     # this layer's live positions alone
            use = self._cheaper(K * K * (d_in + d_out), self._matmul_cost(K, N, d_in, d_out))
        if not use:
            return False
        row = torch.div(idx, T, rounding_mode="floor")                                # (K,) each position's row
        d = d[idx]                                                                    # (K, out)
        with torch.no_grad():
            cached = self._gram_a.get(id(x)) if shared else None
            if cached is not None and cached[0] is x and cached[1] is idx:
                Ga = cached[2]
            else:
                a = a[idx]                                                           # (K, in)
                Ga = a @ a.T                                                         # (K, K) a_t·a_s
                self.input_grams += 1
                if shared and len(self._outs.get(id(x), ())) > 1:
                    self._gram_a[id(x)] = (x, idx, Ga)
            # tied (never shared: a is gathered): .grad = H + E with E = Σ_u onehot(id_u) E_uᵀ, so
            # per position δ_tᵀ E a_t = Σ_u δ_t[id_u] (a_t·E_u)
            cross = (d[:, ids].to(E.dtype) * (a.to(E.dtype) @ E.T)).sum(1) if emb is not None else None   # (K,)
            Gd = d @ d.T                                                             # (K, K) δ_t·δ_s
            r = ((row >= self.retain.start) & (row < self.retain.stop)).to(Gd.dtype)
            B = torch.stack([1 - r, r], 1)                                           # (K, 2) forget side, retain
            vals = torch.zeros(N, dtype=torch.float64, device=g.device)
            stats = {}
            pair_sums = None                                                         # (K, 2) Σ_t M_st·w_t per risk
            for pn in ("bias", "weight"):                                           # the bias's M = Gd first
                p = mod._parameters.get(pn)
                if p is None or not p.requires_grad:
                    continue
                M = Gd if pn == "bias" else Gd.mul_(Ga)                              # (K, K) M_ts
                P = (M @ B).double()                                                 # (K, 2) Σ_s over each part
                blocks = B.T.double() @ P                                            # (2, 2) 1_Xᵀ M 1_Y
                sq = self.cap.grad_square(p)
                total, per_position = blocks.sum(), P.sum(1)
                if cross is not None and pn == "weight":    # ‖H + E‖² = 1ᵀM1 + 2⟨H, E⟩ + ‖E‖²
                    total = total + 2 * cross.double().sum() + squared_norm(E)
                    per_position = per_position + cross.double()
                # what the host decides on, in one transfer (each is a device sync on an accelerator):
                # the identity check, and the statistics with their blocks' magnitudes
                want = self.want_stats and cross is None     # (a tied weight's: gram's unit statistics)
                mags = (B.T @ (M.abs() @ B)).double().reshape(-1) if want else blocks.new_zeros(4)   # Σ|M| per block
                dead = unchecked.double() if unchecked is not None else blocks.new_zeros(())
                unchecked = None
                err, bound, xy, ff, rr, m_ff, m_rr, dead = torch.cat([
                    torch.stack([(total - sq).abs(), TOL * sq, blocks[0, 1], blocks[0, 0], blocks[1, 1]]),
                    mags[[0, 3]], dead[None]]).tolist()
                if dead:              # a cotangent where the step's shared set has none: own positions
                    return self._take(name, products, own=True)
                if not err <= bound:
                    return False
                vals.index_add_(0, row, per_position)                               # Σ_{t∈i} (Σ_s M_ts + δ_tᵀE a_t)
                if self._pairs is not None:
                    w = self._pairs[1][row].to(M.dtype)                              # (K, 2) 1/(c_t·n_R) on R's rows
                    pair_sums = M @ w if pair_sums is None else pair_sums + M @ w
                if want and ff >= CANCEL * m_ff and rr >= CANCEL * m_rr:
                    stats[id(p)] = (xy, ff, rr)
        self.cap.part_stats |= stats
        if pair_sums is not None:
            owner, _, n_f = self._pairs
            inst = owner[row]                                                        # (K,) forget instance or -1
            side = inst >= 0
            self.cap.pair_products[name] = torch.zeros(n_f, 2, dtype=torch.float32, device=g.device).index_add_(
                0, inst[side], pair_sums[side].float())
        products[name] = vals[self.span].float()           # (rows outside the span, e.g. idk rows: in M only)
        return True


def pair_weights(cap: Capture, segments: dict[str, slice]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Per row: the forget instance it belongs to (its forget, idk or mismatch row; -1 for the
    retain rows), and the weights (N, 2) 1/(c_t·n_R) turning a training cotangent into the risk's
    mean gradient term on R_u's rows (forget) and R_r's (retain), 0 elsewhere; and n_f."""
    f, r = segments["forget"], segments["retain"]
    n_f, n_r = f.stop - f.start, r.stop - r.start
    if cap.row_scale is None or not n_f or not n_r:
        return None
    scale = cap.row_scale                                                            # (N,) 1/c_t
    owner = torch.full((len(scale),), -1, dtype=torch.long, device=scale.device)
    for name in ("forget", "idk", "mismatch"):
        if name in segments:
            seg = segments[name]
            owner[seg] = torch.arange(seg.stop - seg.start, device=scale.device)
    w = torch.zeros(len(scale), 2, dtype=scale.dtype, device=scale.device)
    w[f, 0], w[r, 1] = scale[f] / n_f, scale[r] / n_r
    return owner, w, n_f


def _out_features(mod: torch.nn.Module) -> int:
    return mod.weight.shape[0] if isinstance(mod, torch.nn.Linear) else mod.weight.shape[1]   # Conv1D: (in, out)


def embedding_rows(cap: Capture, name: str, f: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """E_X compactly: the distinct token ids of rows ``f`` and Σ of their cotangents per id (the
    padding row receives none). -> (U,), (U, d)"""
    mod, rec = cap.modules[name], cap.seen[name][0]
    ids = rec.inputs[0][f].reshape(-1)
    e = rec.grad[f].reshape(-1, rec.grad.shape[-1])
    if mod.padding_idx is not None:
        keep = ids != mod.padding_idx
        ids, e = ids[keep], e[keep]
    rows, inverse = torch.unique(ids, return_inverse=True)
    E = torch.zeros(len(rows), e.shape[-1], dtype=e.dtype, device=e.device).index_add_(0, inverse, e)
    return rows, E
