"""The two parts' per-tensor dot products in the one training backward (``--no-instances``, GA and GD).

L = L_f + L_r where L_f reads the forget-side rows and L_r the retain rows (:mod:`geffect.engine.parts`),
and rows do not interact in the model, so a Linear layer's weight gradient splits by rows:

    ∇L_W = G_f + G_r,   G_X = Δ_Xᵀ A_X  (the rows of part X; GPT-2's Conv1D: A_Xᵀ Δ_X),

two matmuls with the multiply-adds of autograd's one. Forming both parts inside the training
backward (:class:`_PartsLinear`, whose backward replaces autograd's for the layer's call) and
handing autograd their sum gives each tensor's (⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖²) for three dot products,
from which :func:`geffect.engine.grouponly.group_effects` takes GA/GD's G-effects: one forward and
one backward instead of :class:`~geffect.engine.parts.TwoPassDots`' two.

A weight tied between the output projection and the input embedding adds the embedding's rows:
G_X = H_X + E_X, with H_X the projection's part and E_X = Σ_{s∈X} onehot(id_s) e_sᵀ nonzero on the
batch's U distinct token ids only. The projection's backward keeps its three dots and H_X's U rows;
the embedding's parts, kept as U rows, then complete them:

    ‖G_X‖² = ‖H_X‖² + 2⟨H_X[U], E_X⟩ + ‖E_X‖²,   ⟨G_f, G_r⟩ = ⟨H_f, H_r⟩ + ⟨H_f[U], E_r⟩ + ⟨E_f, H_r[U]⟩ + ⟨E_f, E_r⟩.

Every other module (norms, an untied embedding) gets its forget part formed from its captured
cotangents (:func:`geffect.engine.parts.part_scalars`).

GA's loss does not read the retain rows: the backward is that of L + n_r·R_r (the retain rows' mean
NLLs summed), the Linear layers hand autograd G_f alone (``keep_retain`` off), and afterwards the
tied weight's retain embedding rows are taken back out of ``.grad`` and every other captured
module's ``.grad`` is set to its forget part: ``.grad`` ends as ∇L, as the plain step's.

The Linear layers' dots are taken inside the backward (timed as its phase). The output projection
sums over the positions that carry a cotangent only (its answer positions): exact, and cheaper than
autograd's product over every position.
"""
from __future__ import annotations

import bisect
from typing import Self

import torch
from torch.autograd.function import once_differentiable

from geffect.engine.capture import Capture
from geffect.engine.engine import Captured
from geffect.engine.gramrows import embedding_rows
from geffect.engine.parts import apply_coefficients, forget_side, part_scalars
from geffect.engine.rules import _CONV1D, live_positions

_LINEAR = (torch.nn.Linear,) + ((_CONV1D,) if _CONV1D is not None else ())
TILE_BYTES = 4 * 2 ** 20      # one tile of a weight gradient's two parts: a few MB, cached while dotted


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether a Hugging Face model recomputes its blocks in the backward (gradient checkpointing):
    the recompute would save other tensors than the parts form's forward did."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), attr, None), property):
            return bool(getattr(model, attr))
    return False


class _Site:
    """One Linear layer's call: what its backward leaves (``dots`` (3,) float64 per parameter name,
    and for a tied output projection ``rows``: its two parts' rows at the batch's token ids)."""

    def __init__(self, owner: RoutedLinear, name: str, conv1d: bool, tied_ids: torch.Tensor | None = None):
        self.owner, self.name, self.conv1d, self.tied_ids = owner, name, conv1d, tied_ids
        self.calls = 1
        self.dots: dict[str, torch.Tensor] = {}
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.values: dict[str, tuple] = {}         # the instance form's (see geffect.engine.instanceform)


class RoutedLinear:
    """Routes every given Linear layer's forward through :class:`_PartsLinear` (a context manager
    around the step's forward and backward), whose backward hands the weight gradient to
    :meth:`weight_grads` while armed (:meth:`arm`) and forms autograd's own otherwise. ``once``: a
    layer called twice in one forward is an error (else its site is marked, ``calls`` > 1, and the
    second call left to autograd)."""

    once = True

    def __init__(self, linear: dict[str, torch.nn.Module]):
        self.linear = linear
        self.sites: dict[str, _Site] = {}
        self.armed = False
        self._handles: list = []
        self._scratch: torch.Tensor | None = None

    def __enter__(self) -> Self:
        for name, mod in self.linear.items():
            # before any other forward hook (the capture's): they see the routed output
            self._handles.append(mod.register_forward_hook(self._hook(name), prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def arm(self, on: bool = True) -> None:
        self.armed = on

    def site(self, name: str, mod: torch.nn.Module) -> _Site:
        return _Site(self, name, _CONV1D is not None and isinstance(mod, _CONV1D))

    def scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``numel`` elements for one tile, shared by every layer."""
        b = self._scratch
        if b is None or b.dtype != dtype or b.device != device or b.numel() < numel:
            self._scratch = b = torch.empty(numel, dtype=dtype, device=device)
        return b

    def weight_grads(self, site: _Site, D: torch.Tensor, A: torch.Tensor, has_bias: bool):
        """(weight gradient, bias gradient or None) of the armed backward, or None for autograd's;
        D (N, T, out), A (N, T, in)."""
        raise NotImplementedError

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            x = inputs[0] if inputs else None
            if not torch.is_tensor(x) or not torch.is_tensor(output) or not output.requires_grad or x.dim() < 2:
                return None
            if name in self.sites:
                if self.once:
                    raise RuntimeError(f"module {name} ran twice in one forward; the parts form needs one call")
                self.sites[name].calls += 1
                return None
            site = self.sites[name] = self.site(name, mod)
            return _PartsLinear.apply(x, mod.weight, mod.bias, output.detach(), site)
        return hook


class PartsForm(RoutedLinear):
    """The parts form (see the module docstring); :meth:`arm` before the training backward."""

    def __init__(self, model: torch.nn.Module, linear: dict[str, torch.nn.Module], segments: dict[str, slice],
                 tied_ids: dict[str, torch.Tensor], keep_retain: bool = True):
        super().__init__(linear)
        self.model, self.keep_retain = model, keep_retain
        r = segments["retain"]
        self.forget = _slices(forget_side(segments))                  # the forget-side rows, as slices
        self.retain = [r] if r.stop > r.start else []
        self.tied_ids = tied_ids                                     # output projection -> (U,) token ids
        self.streamed: dict[int, tuple[float, float, float]] = {}   # captured modules' values (stream)

    def site(self, name: str, mod: torch.nn.Module) -> _Site:
        s = super().site(name, mod)
        s.tied_ids = self.tied_ids.get(name)
        return s

    def weight_grads(self, site: _Site, D: torch.Tensor, A: torch.Tensor, has_bias: bool):
        """Both parts of the weight (and bias) gradient, their dots into the site."""
        forget, retain = self.forget, self.retain
        idx = live_positions(self.linear[site.name], D)   # (K,) flat, or None: dense (every position)
        if idx is not None:           # the output projection: its answer positions only (the rest add 0)
            T = D.shape[1]
            forget = [_position_slices(idx, s, T) for s in self.forget]
            retain = [_position_slices(idx, s, T) for s in self.retain]
            D, A = _gather(D, idx), _gather(A, idx)        # (K, 1, out), (K, 1, in): a position per "row"
        gw, site.dots["weight"], site.rows = _split_grad(D, A, site.conv1d, forget, retain, site.tied_ids,
                                                         self.keep_retain, self.scratch)
        gb = None
        if has_bias:
            bf, br = _rows_sum(D, forget), _rows_sum(D, retain)
            site.dots["bias"] = _three(bf, br)
            gb = bf.add_(br) if self.keep_retain else bf
        return gw, gb

    def stream(self, cap: Capture, segments: dict[str, slice]) -> None:
        """Take each captured module's values the moment its gradient completes and free its tensors
        then (GA: its ``.grad`` set to the forget part then); a tied embedding's stay held, its rows
        complete the output projection's after the backward (:func:`one_pass_scalars`)."""
        keep = {_tied_embedding(cap, n, self.linear[n]) for n in self.tied_ids}
        captured = [Captured(cap, segments, [], [])]

        def done(names: list[str]) -> None:
            rest = {n: cap.assignment[n] for n in names if n not in keep}
            if not rest:
                return
            stats = part_scalars(self.model, rest, captured)
            if not self.keep_retain:
                apply_coefficients(self.model, rest, captured, dict.fromkeys(stats, (1.0, 0.0)))
            self.streamed |= stats
            cap.release_modules(list(rest))
        cap.arm_stream(done)

    def statistics(self) -> dict[int, torch.Tensor]:
        """{id(parameter): (⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖²) (3,) float64} of every untied Linear tensor.
        Raises where a trainable Linear tensor got a gradient but no parts (its call did not take
        the parts form): its values would be missing from the groups' sums."""
        out = {}
        for name, mod in self.linear.items():
            site = self.sites.get(name)
            for pn, p in mod._parameters.items():
                if p is None or not p.requires_grad or p.grad is None or name in self.tied_ids:
                    continue
                if site is None or pn not in site.dots:
                    raise RuntimeError(f"{name}.{pn} has a gradient but took no parts in this backward "
                                       "(its forward did not go through the parts form)")
                out[id(p)] = site.dots[pn]
        return out


def one_pass_scalars(model: torch.nn.Module, parts: PartsForm, cap: Capture | None,
                     segments: dict[str, slice]) -> dict[int, tuple[float, float, float]]:
    """Per tensor (⟨g_f, g_r⟩, ‖g_f‖², ‖g_r‖²) after the one backward: the Linear layers' from their
    parts (:class:`PartsForm`), a tied weight's completed by its embedding's rows, every other
    captured module's from its forget part formed (``cap``: the training cotangents kept)."""
    stats = parts.statistics()
    tied_emb = set()
    for name, ids in parts.tied_ids.items():
        site = parts.sites.get(name)
        mod = parts.linear[name]
        emb = _tied_embedding(cap, name, mod)
        tied_emb.add(emb)
        if site is None or site.rows is None:
            raise RuntimeError(f"the tied output projection {name} took no parts in this backward")
        stats[id(mod.weight)], E_r = _tied_dots(site, cap, emb, ids, parts)
        if not parts.keep_retain:             # the embedding's retain rows out of .grad (autograd added them)
            mod.weight.grad.index_add_(0, ids, E_r.to(mod.weight.grad.dtype), alpha=-1)
        if "bias" in site.dots:
            stats[id(mod.bias)] = site.dots["bias"]
    out = {}
    if stats:
        ids = list(stats)
        flat = torch.stack([stats[i] for i in ids]).cpu().tolist()        # one host transfer
        out = {i: tuple(v) for i, v in zip(ids, flat)}
    out |= parts.streamed
    if cap is not None:                       # modules still held (not streamed)
        rest = {n: cap.assignment[n] for n in cap.seen if n not in tied_emb}
        captured = [Captured(cap, segments, [], [])]
        held = part_scalars(model, rest, captured)
        if not parts.keep_retain:             # their .grad holds both parts: keep the forget part alone
            apply_coefficients(model, rest, captured, dict.fromkeys(held, (1.0, 0.0)))
        out |= held
    return out


def _tied_embedding(cap: Capture, name: str, mod: torch.nn.Module) -> str:
    """The embedding module that shares the output projection ``name``'s weight."""
    return next(n for n in cap._owners[id(mod.weight)] if n != name)


def _tied_dots(site: _Site, cap: Capture, emb: str, ids: torch.Tensor,
               parts: PartsForm) -> tuple[torch.Tensor, torch.Tensor]:
    """The tied weight's (⟨G_f, G_r⟩, ‖G_f‖², ‖G_r‖²): the projection's, completed by the
    embedding's parts E_f, E_r as rows at the token ids ``ids`` (U,) (see the module docstring);
    and E_r (U, d)."""
    H_f, H_r = site.rows                                                      # (U, d) each
    E = []
    for rows in (parts.forget, parts.retain):                                # onto the batch's ids (U,)
        acc = torch.zeros(len(ids), H_f.shape[-1], dtype=torch.float32, device=H_f.device)
        for s in rows:
            tok, e = embedding_rows(cap, emb, s)                             # (u,), (u, d) of these rows
            acc.index_add_(0, torch.searchsorted(ids, tok), e.float())
        E.append(acc)
    E_f, E_r = E
    xy, xx, yy = site.dots["weight"]
    return torch.stack([xy + _dot(H_f, E_r) + _dot(E_f, H_r) + _dot(E_f, E_r),
                        xx + 2 * _dot(H_f, E_f) + _dot(E_f, E_f),
                        yy + 2 * _dot(H_r, E_r) + _dot(E_r, E_r)]), E_r


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1)).double()


class _PartsLinear(torch.autograd.Function):
    """y = x Wᵀ + b (Linear; GPT-2 Conv1D: y = x W + b), its forward value given (``out``); the
    backward forms the weight gradient its owner's way (:meth:`RoutedLinear.weight_grads`) when
    the owner is armed, autograd's way otherwise."""

    @staticmethod
    def forward(ctx, x, weight, bias, out, site):
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.has_bias = site, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        site = ctx.site
        w = weight.T if site.conv1d else weight                                   # (out, in)
        gx = grad_out @ w.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        N, d_in, d_out = x.shape[0], x.shape[-1], grad_out.shape[-1]
        D = grad_out.reshape(N, -1, d_out).to(weight.dtype)                       # (N, T, out)
        A = x.reshape(N, -1, d_in).to(weight.dtype)                               # (N, T, in)
        grads = site.owner.weight_grads(site, D, A, ctx.has_bias) if site.owner.armed else None
        if grads is None:                    # any other backward through the layer: autograd's gradient
            gw = _part(*((A, D) if site.conv1d else (D, A)), [slice(0, N)])
            gb = D.reshape(-1, d_out).sum(0) if ctx.has_bias else None
            return gx, gw, gb, None, None
        return gx, *grads, None, None


def _split_grad(D: torch.Tensor, A: torch.Tensor, conv1d: bool, forget: list[slice], retain: list[slice],
                tied_ids: torch.Tensor | None, keep_retain: bool, scratch):
    """The weight gradient G = G_f + G_r (G_f alone unless ``keep_retain``), its parts' (⟨G_f, G_r⟩,
    ‖G_f‖², ‖G_r‖²) (3,) float64 and, for a tied projection, the parts' rows at ``tied_ids``. In tiles
    of G's rows (``TILE_BYTES``): G_f is formed in G's own tile, G_r in a buffer from ``scratch(numel,
    dtype, device)`` (shared by every layer), so the only allocation is G's, as autograd's, and the
    dots run on cached tiles."""
    L, R = (A, D) if conv1d else (D, A)                                          # G = Σ_n L_nᵀ R_n (rows, cols)
    rows, cols = L.shape[-1], R.shape[-1]
    tile = max(1, min(rows, TILE_BYTES // (cols * D.element_size())))
    G = torch.empty(rows, cols, dtype=D.dtype, device=D.device)
    dots = torch.zeros(3, dtype=torch.float64, device=D.device)
    buffer = scratch(tile * cols, D.dtype, D.device)
    ids = tied_ids.tolist() if tied_ids is not None else None                   # sorted, host side
    picked: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k in range(0, rows, tile):
        Lk, Gf = L[..., k:k + tile], G[k:k + tile]                              # G_f formed in place
        _part(Lk, R, forget, Gf)
        Gr = _part(Lk, R, retain, buffer[:Gf.numel()].view(Gf.shape))           # (tile, cols)
        dots += _three(Gf, Gr)
        if ids is not None:
            lo, hi = bisect.bisect_left(ids, k), bisect.bisect_left(ids, k + tile)
            if hi > lo:
                local = tied_ids[lo:hi] - k
                picked.append((Gf.index_select(0, local).float(), Gr.index_select(0, local).float()))
        if keep_retain:
            Gf.add_(Gr)
    tied_rows = None
    if ids is not None:
        tied_rows = tuple(torch.cat([p[j] for p in picked]) if picked else
                          torch.zeros(0, cols, dtype=torch.float32, device=D.device) for j in (0, 1))
    return G, dots, tied_rows


def _part(L: torch.Tensor, R: torch.Tensor, rows: list[slice], out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the rows ``rows`` of L_nᵀ R_n (L's width, R's width), into ``out`` when given."""
    if out is None:
        out = torch.empty(L.shape[-1], R.shape[-1], dtype=L.dtype, device=L.device)
    if not rows:
        return out.zero_()
    for j, s in enumerate(rows):
        Ls, Rs = L[s].reshape(-1, L.shape[-1]), R[s].reshape(-1, R.shape[-1])
        if j == 0:
            torch.mm(Ls.T, Rs, out=out)
        else:
            out.addmm_(Ls.T, Rs)
    return out


def _gather(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions ``idx`` (K,) of X (N, T, d), flat over N·T, as (K, 1, d)."""
    return X.reshape(-1, X.shape[-1]).index_select(0, idx).unsqueeze(1)


def _position_slices(idx: torch.Tensor, rows: slice, T: int) -> slice:
    """The entries of the sorted flat positions ``idx`` that lie in the rows ``rows`` (T per row)."""
    lo, hi = torch.searchsorted(idx, torch.tensor([rows.start * T, rows.stop * T], device=idx.device)).tolist()
    return slice(lo, hi)


def _rows_sum(D: torch.Tensor, rows: list[slice]) -> torch.Tensor:
    out = torch.zeros(D.shape[-1], dtype=D.dtype, device=D.device)
    for s in rows:
        out += D[s].reshape(-1, D.shape[-1]).sum(0)
    return out


def _three(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(⟨x, y⟩, ‖x‖², ‖y‖²) (3,) float64, float32 dot products."""
    xf, yf = x.reshape(-1).float(), y.reshape(-1).float()
    return torch.stack([torch.dot(xf, yf), torch.dot(xf, xf), torch.dot(yf, yf)]).double()


def _slices(rows: list[int]) -> list[slice]:
    """Sorted row indices as maximal contiguous slices."""
    out: list[slice] = []
    for i in rows:
        if out and out[-1].stop == i:
            out[-1] = slice(out[-1].start, i + 1)
        else:
            out.append(slice(i, i + 1))
    return out
