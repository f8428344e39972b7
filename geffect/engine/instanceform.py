"""A Linear layer's per-row G-effect products formed inside the training backward (the instance form).

On the engine's reuse path the captured cotangents δ_t are the training ones, and one forward covers
every row, so a Linear layer's weight gradient is the sum of its rows' own:

    ∇L_W = G = Σ_n g_n,   g_n = Δ_nᵀ A_n      (row n's positions; GPT-2's Conv1D: A_nᵀ Δ_n)

and the per-row product of the G-effects (:func:`geffect.engine.rules.linear_rule`,
Σ_{t∈n} δ_tᵀ ∇L_W a_t) is p_n = ⟨g_n, G⟩. The layer's backward (:class:`InstanceForm`, which
replaces autograd's for the layer's call) forms the rows' gradients tile by tile of G's rows, one
batched matmul per tile, with the multiply-adds of autograd's one product: G's tile is their sum,
p gains X_tile·G_tile (N dot products of a cached tile), and when the conflict statistics are due
the two parts' tiles G_f (every row outside the retain segment) and G_r give ⟨G_f, G_r⟩, ‖G_f‖²,
‖G_r‖² (:mod:`geffect.engine.parts`) on the same cached tiles. The Fig. 5b pairs
(:mod:`geffect.engine.pairs`) likewise: the risk R's gradient is Σ_m w_m g_m with w_m = 1/(c_m·n_R)
on R's rows (the reuse path's risk cotangents are the training ones over c_m), so a row's pair is
⟨g_n, Σ_m w_m g_m⟩, summed over a forget instance's rows (its forget, idk or mismatch row). Against the matmul form (one more
product of the layer's size, K·d_in·d_out) or the Gram form (K²(d_in + d_out)), the cost is two
passes over N cached tiles per weight: 2N·d_in·d_out instead of K·d_in·d_out, K = N·T positions.

A bias: p_n = ⟨Σ_{t∈n} δ_t, Σ_s δ_s⟩. The values are unscaled (training cotangents), as
:meth:`~geffect.engine.capture.Capture.inner_products` gives them.

Each layer checks the identity it rests on when its gradient completes: Σ_n p_n = ‖.grad‖² (to
:data:`~geffect.engine.gramrows.TOL`); a layer whose gradient holds anything else (its weight used
outside the module, a hook writing to ``.grad``) or whose forward ran twice is left to
:mod:`geffect.engine.gramrows` and the matmul form. Float32/64 weights; not for an output
projection (its few answer positions take the Gram form more cheaply), not under gradient
checkpointing.
"""
from __future__ import annotations

import torch

from geffect.engine.capture import Capture
from geffect.engine.gramrows import TOL
from geffect.engine.partsform import RoutedLinear, _Site, _three

TILE_BYTES = 2 * 2 ** 20      # the N rows' gradients of one tile of G's rows: cached while summed and dotted (CPU)
ACCELERATOR_TILE_BYTES = 256 * 2 ** 20   # elsewhere: few tiles (each is a handful of kernel launches)
ENABLED: bool | None = None   # tests: force the form on or off (None: ProfileConfig.instance_form decides)
_FAST_DTYPES = (torch.float32, torch.float64)


class InstanceForm(RoutedLinear):
    """Routes the given Linear layers (each owning its parameters alone) through the instance form
    while armed (the reuse path's training backward); :meth:`take` hands each layer's per-row
    products over once its gradient completes. ``rows``: the batch's rows (a layer that ran on a
    chunk of them, or twice, takes autograd's gradient); ``retain``: the retain segment; ``stats``:
    the parts' conflict statistics are due (into the capture's ``part_stats``)."""

    once = False

    def __init__(self, linear: dict[str, torch.nn.Module], rows: int, retain: slice, stats: bool):
        super().__init__({n: m for n, m in linear.items() if m.weight.dtype in _FAST_DTYPES})
        self.rows, self.retain, self.stats = rows, retain, stats
        self.pairs: tuple | None = None

    def arm(self, on: bool = True, pairs: tuple | None = None) -> None:
        """``pairs``: the Fig. 5b pairs are due, with :func:`geffect.engine.gramrows.pair_weights`'
        (owner (N,), w (N, 2), n_f): each row's forget instance and its weights on the two risks."""
        super().arm(on)
        if on:
            self.pairs = pairs

    def weight_grads(self, site: _Site, D: torch.Tensor, A: torch.Tensor, has_bias: bool):
        """G (and the bias's Σ δ) for autograd; per parameter name, (p (N,), the parts' statistics (3,)
        or None, G's identity, the pairs' per-row products (N, 2) or None) into ``site.values``."""
        N = D.shape[0]
        if site.calls != 1 or N != self.rows:          # a forward chunk of the rows: autograd's gradient
            return None
        r = self.retain
        w = self.pairs[1].to(D.dtype) if self.pairs is not None else None                # (N, 2)
        gw, p, stats, pairs = _rows_grad(D, A, site.conv1d, r, self.stats, self.scratch, w)
        site.values["weight"] = (p, stats, _identity(gw), pairs)
        gb = None
        if has_bias:
            Db = D.sum(1)                                                        # (N, out) Σ_{t∈n} δ_t
            gb = Db.sum(0)                                                       # (out,)
            site.values["bias"] = (Db.double() @ gb.double(),
                                   _three(_sum_outside(Db, r, N), Db[r].sum(0)) if self.stats else None,
                                   _identity(gb), Db @ (Db.T @ w) if w is not None else None)
        return gw, gb

    def take(self, cap: Capture, names: list[str], products: dict[str, torch.Tensor], span: slice) -> list[str]:
        """Per-row products (over ``span``'s rows) of the layers among ``names`` that took the form
        and pass the identity check into ``products``, their statistics into ``cap.part_stats``;
        returns the layers taken. Their sites' values are released."""
        done = []
        for n in names:
            site = self.sites.get(n)
            if site is None:
                continue
            values, site.values = site.values, {}
            mod = self.linear[n]
            params = {pn: p for pn, p in mod._parameters.items() if p is not None and p.requires_grad}
            if (site.calls != 1 or not values or set(values) != set(params)
                    or any(p.grad is None for p in params.values())):
                continue
            # the identity check: Σ_n p_n = ‖.grad‖² for each parameter; when autograd kept the very
            # gradient the form made, unwritten since, it holds as Σ_n p_n = ⟨Σ_n g_n, G⟩ (no pass). Read
            # with the statistics in one host transfer
            checks = [t for pn, p in params.items() for t in (
                values[pn][0].sum(), cap.grad_square(p, values[pn][0].sum() if _identity(p.grad) == values[pn][2]
                                                     else None))]
            stats = [values[pn][1] for pn in params] if self.stats else []
            got = torch.cat([torch.stack(checks)] + stats).tolist()
            if not all(abs(got[2 * i] - got[2 * i + 1]) <= TOL * got[2 * i + 1] for i in range(len(params))):
                continue
            products[n] = sum(values[pn][0][span] for pn in params).float()
            if values["weight"][3] is not None:      # each forget instance's pairs: its rows' sum
                owner, _, n_f = self.pairs
                side = owner >= 0
                rows = sum(values[pn][3] for pn in params)[side].float()                # (n_side, 2)
                cap.pair_products[n] = torch.zeros(n_f, 2, dtype=torch.float32, device=rows.device).index_add_(
                    0, owner[side], rows)
            if self.stats:                            # (⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖²) per parameter, after the checks
                flat = got[2 * len(params):]
                cap.part_stats |= {id(params[pn]): tuple(flat[3 * i:3 * i + 3]) for i, pn in enumerate(params)}
            done.append(n)
        return done


def _identity(t: torch.Tensor) -> tuple[int, int]:
    """What tells a tensor that nothing has written to since: its storage address and version."""
    return t.data_ptr(), t._version


def _rows_grad(D: torch.Tensor, A: torch.Tensor, conv1d: bool, retain: slice, stats: bool, buffer,
               pair_w: torch.Tensor | None = None):
    """G = Σ_n g_n, p_n = ⟨g_n, G⟩ (N,) float64; with ``stats``, (⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖²) (3,)
    float64; with the pairs' weights ``pair_w`` (N, 2), ⟨g_n, Σ_m w_mk g_m⟩ (N, 2) (else None). In
    tiles of G's rows (``TILE_BYTES`` for the N rows' tiles, from ``buffer(numel, dtype, device)``):
    G's own tile is the only full-size write, as autograd's."""
    L, R = (A, D) if conv1d else (D, A)                      # G = Σ_n L_nᵀ R_n: (rows, cols)
    N, rows, cols = L.shape[0], L.shape[-1], R.shape[-1]
    budget = TILE_BYTES if D.device.type == "cpu" else ACCELERATOR_TILE_BYTES
    tile = max(1, min(rows, budget // (N * cols * D.element_size())))
    G = torch.empty(rows, cols, dtype=D.dtype, device=D.device)
    p = torch.zeros(N, dtype=D.dtype, device=D.device)
    # the tile's sums as one product with the rows' weights W (k, N) (a reduction with out= would zero
    # its output first): with the statistics the forget side's and the retain rows' indicators first;
    # then all ones (G), unless the two parts are there to sum (no pairs); then the pairs' two weight columns
    o = 2 if stats else 0
    ones = int(pair_w is not None or not stats)      # a row of ones for G itself
    W = torch.ones(o + ones + (2 if pair_w is not None else 0), N, dtype=D.dtype, device=D.device)
    if stats:
        W[0, retain] = 0
        W[1] = 1 - W[0]
    if pair_w is not None:
        W[o + 1:] = pair_w.T
    dots = torch.zeros(2, 2, dtype=D.dtype, device=D.device) if stats else None       # the parts' Gram
    Pfull = torch.empty(len(W), tile * cols, dtype=D.dtype, device=D.device) if len(W) > 1 else None
    prods = torch.zeros(N, 3, dtype=D.dtype, device=D.device) if pair_w is not None else None
    scratch = buffer(N * tile * cols, D.dtype, D.device)
    views = None
    # every full tile reuses one set of views: a handful of kernels per tile, no indexing
    for Lk, Gk in zip(L.transpose(1, 2).split(tile, 1), G.view(-1).split(tile * cols)):   # (N, h, T), (h·cols,)
        h = Lk.shape[1]
        if views is None or h != tile:
            X = scratch[:N * h * cols].view(N, h, cols)       # each row's gradient tile
            P = Pfull[:, :h * cols] if Pfull is not None else None
            views = X, X.view(N, -1), P, (P[:2], P[:2].T) if stats else None, P[o:].T if prods is not None else None
        X, X2, P, P2, PoT = views
        torch.bmm(Lk, R, out=X)                              # (N, h, cols)
        if P is None:
            torch.mm(W, X2, out=Gk.view(1, -1))              # G's tile
        else:
            torch.mm(W, X2, out=P)                           # (k, h·cols): [G_f, G_r,] [G,] [the pairs' sums]
            if ones:
                Gk.copy_(P[o])
            else:
                torch.add(P[0], P[1], out=Gk)
            if stats:
                dots.addmm_(*P2)                             # [[‖G_f‖², ⟨G_f, G_r⟩], [·, ‖G_r‖²]]
        if prods is None:
            p.addmv_(X2, Gk)                                 # p_n += ⟨g_n, G⟩ on this tile
        else:
            prods.addmm_(X2, PoT)                            # (N, 3): ⟨g_n, G⟩, ⟨g_n, Σ_m w_m g_m⟩ per risk
    if prods is not None:
        p, pairs = prods[:, 0], prods[:, 1:].double()
    else:
        pairs = None
    if stats:
        dots = torch.stack([dots[0, 1], dots[0, 0], dots[1, 1]]).double()
    return G, p.double(), dots, pairs


def _sum_outside(X: torch.Tensor, r: slice, N: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the rows of X (N, …) outside the slice ``r`` (the forget side), into ``out`` if given."""
    parts = [s for s in (slice(0, r.start), slice(r.stop, N)) if s.stop > s.start]
    if out is None:
        out = X.new_empty(X.shape[1:])
    if not parts:
        return out.zero_()
    torch.sum(X[parts[0]], 0, out=out)
    for s in parts[1:]:
        out.add_(X[s].sum(0))
    return out


def wanted(setting: str, device: torch.device) -> bool:
    """Whether to take the instance form without timing it: ``setting``
    (:attr:`ProfileConfig.instance_form`) on, off, or auto (on CPU, where :class:`FormChoice` then times
    both ways; elsewhere off: on a GPU the other forms' product runs at matmul throughput while the
    passes are memory-bound, and no measurement says which wins)."""
    if ENABLED is not None:
        return ENABLED
    return setting == "on" or (setting == "auto" and device.type == "cpu")


class FormChoice:
    """A run's choice between the instance form and the other forms (one more product per Linear
    layer: :mod:`geffect.engine.gramrows`), which give the same values. Which is faster depends on the
    machine, not the model: the instance form's passes are memory-bound, the product compute-bound
    (SmolLM2-135M, conflicts every step, in one process: 1.22–1.26× a plain step against 1.33× on one
    2-core CPU, 1.45× against 1.20× on another). With ``auto`` on CPU the run times both on its own
    steps: after one unmeasured step (the first one faults in the gradients' memory), the next four
    such steps without pairs take on, off, off, on (ABBA: a drift of the machine's speed weighs on
    both alike), each timed over the phases the choice changes (backward, effects, conflicts, pairs)
    per position of the batch; the rest of the run takes the one with the lower mean. Where the first
    two already differ by ``CLEAR`` (20%) the choice is made then: choosing wrong needs noise that
    reverses a difference that large, and where the two forms cost about the same either will do. The values
    differ between the two only by rounding, so two runs of the same seed can differ by rounding where
    they chose differently (``on``/``off``, or a test's ``ENABLED``, fix the choice; a resumed run keeps
    its checkpoint's). Models with under ``MIN_WEIGHTS`` Linear weights are not timed (auto: on)."""

    ORDER = (True, False, False, True)
    CLEAR = 1.2                # after one step each, a difference this large decides at once
    MIN_WEIGHTS = 10_000_000   # fewer Linear weights: a step too short to time (tiny models), not timed

    def __init__(self, setting: str, device: torch.device, weights: int = MIN_WEIGHTS):
        """``weights``: the number of weights of the Linear layers the form would take."""
        self.setting, self.device, self.weights = setting, device, weights
        self.trials: dict[bool, list[float]] = {True: [], False: []}
        self.chosen: bool | None = None
        self._warm = False          # the run's first step that could take the form is done

    @property
    def timing(self) -> bool:
        """Whether the run is still timing the two ways."""
        return self._timed() and self.chosen is None

    def _timed(self) -> bool:
        return (ENABLED is None and self.setting == "auto" and self.device.type == "cpu"
                and self.weights >= self.MIN_WEIGHTS)

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run goes on with the same choice (JSON)."""
        return {"warm": self._warm, "on": self.trials[True], "off": self.trials[False], "chosen": self.chosen}

    def restore(self, state: dict | None) -> None:
        if state:
            self._warm, self.chosen = state["warm"], state["chosen"]
            self.trials = {True: list(state["on"]), False: list(state["off"])}

    def use(self) -> bool:
        """Whether this step takes the instance form."""
        if not self._timed():
            return wanted(self.setting, self.device)
        if self.chosen is not None:
            return self.chosen
        if not self._warm:
            return True
        k = len(self.trials[True]) + len(self.trials[False])
        return self.ORDER[k] if k < len(self.ORDER) else True

    def observe(self, used: bool, seconds: float, positions: int, pairs: bool = False) -> None:
        """A step that could take the form is done: ``used`` it or not, ``seconds`` in the phases the
        choice changes, over ``positions`` (N·T) of the batch; ``pairs``: a pair step (more work in
        both ways, not compared)."""
        if not self.timing:
            return
        if not self._warm:                          # the run's first such step is not measured
            self._warm = True
            return
        if not pairs:
            self.trials[used].append(seconds / max(1, positions))
        on, off = self.trials[True], self.trials[False]
        if len(on) >= 2 and len(off) >= 2 or (
                len(on) == len(off) == 1 and max(on[0], off[0]) >= self.CLEAR * min(on[0], off[0])):
            self.chosen = _mean(on) <= _mean(off)

    def report(self) -> dict:
        """For summary.json: the setting, what the run took and, when it timed them, the two ways'
        mean seconds per position (µs)."""
        if self._timed():
            chosen = None if self.chosen is None else ("on" if self.chosen else "off")
        else:
            chosen = "on" if wanted(self.setting, self.device) else "off"
        out = {"setting": self.setting, "chosen": chosen}       # None: the run ended before both were timed
        if any(self.trials.values()):
            out["us_per_position"] = {("on" if k else "off"): round(_mean(v) * 1e6, 3)
                                      for k, v in self.trials.items() if v}
        return out


def _mean(x: list[float]) -> float:
    return sum(x) / len(x)


def eligible_linear(model: torch.nn.Module, assignment: dict[str, str]) -> dict[str, torch.nn.Module]:
    """The engine's Linear (and Conv1D) modules whose trainable parameters no other module owns,
    the weight trainable, less the output projection."""
    from geffect.engine.grouponly import owners
    from geffect.engine.partsform import _LINEAR
    owned = owners(model, assignment)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for n in assignment:
        mod = model.get_submodule(n)
        if not isinstance(mod, _LINEAR) or mod is head or not mod.weight.requires_grad:
            continue
        if all(owned.get(id(p)) == [n] for p in mod._parameters.values() if p is not None and p.requires_grad):
            out[n] = mod
    return out
