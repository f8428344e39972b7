"""The forget part's gradient g_f = ∇(γ·L_f) one module at a time, from the training backward:
conflict statistics and PCGrad without a second backward.

L = γ·L_f + α·L_r, where L_f reads only the forget-side rows (forget, idk, mismatch) and L_r only
the retain rows (every registry entry declares its rows), and rows do not interact in the model.
So the training cotangents on the forget-side rows are those of γ·L_f, g_f of each module is the
weight-gradient product of those rows alone (:mod:`gradients`), and g_r = ∇L − g_f. Per tensor
the statistics need only three numbers, with g = ∇L in ``.grad``:

    ⟨g_f, g_r⟩ = ⟨g_f, g⟩ − ‖g_f‖²,   ‖g_r‖² = ‖g‖² − 2⟨g_f, g⟩ + ‖g_f‖²

and PCGrad's update c_f·g_f + c_r·g_r = c_r·g + (c_f − c_r)·g_f is applied to ``.grad`` in place,
module by module (g_f recomputed, on steps that change anything). No full-size copy of either
part's gradient is ever held: one module's g_f at a time, plus one buffer per tied tensor (the
embedding shared with the output projection gets g_f from both uses before it is used).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Self

import torch

from geffect.engine.engine import Captured
from geffect.engine.gradients import embedding_grad, grad_rule_for


def forget_side(segments: dict[str, slice]) -> list[int]:
    """The rows every part but the retain part reads: all rows outside the retain segment."""
    r = segments["retain"]
    n = max(s.stop for s in segments.values())
    return [i for i in range(n) if not r.start <= i < r.stop]


def _rows_of(rec, rows: list[int], device) -> torch.Tensor | slice | None:
    """Local indices of ``rows`` within the record's chunk: a slice (a view, no copy) when they are
    contiguous, else an index tensor; None when none of them is in the chunk."""
    if rec.rows is None:
        local = rows
    else:
        pos = {int(r): k for k, r in enumerate(rec.rows.tolist())}
        local = [pos[i] for i in rows if i in pos]
    if not local:
        return None
    if local == list(range(local[0], local[-1] + 1)):
        return slice(local[0], local[-1] + 1)
    return torch.tensor(local, device=device)


def forget_gradients(model: torch.nn.Module, assignment: dict[str, str],
                     captured: list[Captured]) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, g_f of that parameter, float32) for every trainable parameter with a gradient,
    summed over the micro-batches; each module's products exist only while it is processed. A tensor
    used by several modules (tied embeddings) collects every use in one buffer, the embedding's
    rows added into the output projection's dense gradient (Embedding modules come last)."""
    owners: dict[int, int] = {}
    for name in assignment:
        for p in model.get_submodule(name)._parameters.values():
            if p is not None and p.requires_grad:
                owners[id(p)] = owners.get(id(p), 0) + 1
    shared: dict[int, torch.Tensor] = {}
    seen_shared: dict[int, int] = {}
    order = sorted(assignment, key=lambda n: isinstance(model.get_submodule(n), torch.nn.Embedding))
    for name in order:
        mod = model.get_submodule(name)
        names = tuple(n for n, p in mod._parameters.items() if p is not None and p.requires_grad)
        total: dict[str, torch.Tensor] = {}
        for k in names:                     # add into a tied tensor's buffer, no second dense copy
            if owners[id(mod._parameters[k])] > 1 and id(mod._parameters[k]) in shared:
                total[k] = shared.pop(id(mod._parameters[k]))
        for c in captured:
            for rec in c.cap.seen.get(name, []):
                if rec.train is None:
                    continue
                idx = _rows_of(rec, forget_side(c.segments), rec.train.device)
                if idx is None:
                    continue
                n_chunk = rec.train.shape[0]
                inputs = tuple(x[idx] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n_chunk else x
                               for x in rec.inputs)
                with torch.no_grad():
                    if isinstance(mod, torch.nn.Embedding) and "weight" in total:
                        embedding_grad(mod, inputs, rec.train[idx].detach(), names, into=total["weight"])
                        continue
                    for k, G in grad_rule_for(mod)(mod, inputs, rec.train[idx].detach(), names).items():
                        total[k] = G if k not in total else total[k] + G
        for k in names:
            p = mod._parameters[k]
            if p.grad is None:
                continue
            G = total[k] if k in total else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if owners[id(p)] == 1:
                yield p, G
                continue
            shared[id(p)] = G
            seen_shared[id(p)] = seen_shared.get(id(p), 0) + 1
            if seen_shared[id(p)] == owners[id(p)]:
                yield p, shared.pop(id(p))


CHUNK = 1 << 22    # elements per piece of a large tensor's dot products


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def part_scalars(model, assignment, captured, world=None) -> dict[int, tuple[float, float, float]]:
    """Per tensor (⟨g_f, g_r⟩, ‖g_f‖², ‖g_r‖²) from g_f and ``.grad`` = g_f + g_r (float32 dots).

    g_r = ``.grad`` − g_f is formed for one tensor at a time: differencing the squared norms
    instead would lose ‖g_r‖² to cancellation wherever the retain part's gradient is small. Across
    processes (``world``) g_f is this rank's rows' products, reduced to the global g_f in ``.grad``'s
    layout (:meth:`World.reduce_part`); sharded, each rank sums over its shard and one all-reduce
    adds the shards' sums."""
    out = {}
    with torch.no_grad():
        for p, Gf in forget_gradients(model, assignment, captured):
            if world is not None:
                Gf = world.reduce_part(p, Gf)
            f = Gf.reshape(-1)
            g = (world.local(p.grad) if world is not None else p.grad).reshape(-1)
            host = f.device.type == "mps"              # no float64 there: summed on the host as they come
            acc = torch.zeros(3, dtype=torch.float64, device="cpu" if host else f.device)
            for k in range(0, f.numel(), CHUNK):      # g_r in pieces: no second full-size temporary
                fk = _f32(f[k:k + CHUNK])
                rk = _f32(g[k:k + CHUNK]) - fk
                dots = torch.stack([torch.dot(fk, rk), torch.dot(fk, fk), torch.dot(rk, rk)])
                acc += dots.cpu().double() if host else dots.double()
            out[id(p)] = tuple(acc.tolist())           # one host transfer per tensor
    if world is not None and world.sharded and out:
        flat = world.sum_floats([v for acc in out.values() for v in acc])
        out = {pid: tuple(flat[3 * k:3 * k + 3]) for k, pid in enumerate(out)}
    return out


def apply_coefficients(model, assignment, captured, coef: dict[int, tuple[float, float]], world=None) -> None:
    """``.grad`` ← c_f·g_f + c_r·g_r = c_r·.grad + (c_f − c_r)·g_f per tensor (PCGrad's update);
    across processes with the global g_f (each rank its shard under FSDP)."""
    if all(c == (1.0, 1.0) for c in coef.values()):
        return
    with torch.no_grad():
        for p, Gf in forget_gradients(model, assignment, captured):
            cf, cr = coef.get(id(p), (1.0, 1.0))
            if world is not None:           # every rank reduces every tensor: the collectives stay in step
                Gf = world.reduce_part(p, Gf)
            if (cf, cr) != (1.0, 1.0):
                grad = world.local(p.grad) if world is not None else p.grad
                grad.mul_(cr).add_(Gf.to(grad.dtype), alpha=cf - cr)


class TwoPassDots:
    """Per tensor (⟨X, Y⟩, ‖X‖², ‖Y‖²) of two backward passes, taken as the second pass's gradient
    arrives: X is what the first pass left in ``.grad``, Y the second pass's gradient, seen by a
    tensor hook before it is accumulated (a tensor used twice in one pass, e.g. tied embeddings,
    reaches it once, summed). Three dot products per tensor; nothing is copied.

    With the forget part's loss backpropagated first and the retain part's second (each over the
    forward chunk of its own rows), X = g_f and Y = g_r: the conflict statistics without forming
    either part's gradient. ``keep_first=False`` drops X from ``.grad`` as Y arrives, so ``.grad``
    ends as the second pass's gradient alone (a risk's gradient measured against the loss's)::

        with TwoPassDots(params) as dots:
            first.backward()
            dots.arm()
            second.backward()
        scalars = dots.result()          # {id(p): (⟨X,Y⟩, ‖X‖², ‖Y‖²)}
    """

    def __init__(self, params: list[torch.nn.Parameter], keep_first: bool = True, phases=None):
        """``phases`` (:class:`geffect.timing.Phases`): the dots count as ``conflicts``."""
        self.params, self.keep_first, self.phases = list(params), keep_first, phases
        self.armed = False
        self._handles: list = []
        self._dots: dict[int, list[torch.Tensor]] = {}     # per tensor, one (3,) float32 per piece

    def __enter__(self) -> Self:
        for p in self.params:
            self._handles.append(p.register_hook(self._hook(p)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def arm(self) -> None:
        """Call between the passes: the hooks take the products from here on."""
        self.armed = True

    def _hook(self, p: torch.nn.Parameter):
        def hook(y: torch.Tensor) -> None:
            if not self.armed:
                return
            with torch.no_grad(), self.phases("conflicts") if self.phases is not None else nullcontext():
                self._dots[id(p)] = _three_dots(p.grad, y)
            if not self.keep_first:
                p.grad = None          # AccumulateGrad then stores Y alone
        return hook

    def result(self) -> dict[int, tuple[float, float, float]]:
        """{id(p): (⟨X,Y⟩, ‖X‖², ‖Y‖²)} for every tensor with a gradient from either pass (one host
        transfer). A tensor only the first pass reached has Y = 0 (dropped from ``.grad`` when
        ``keep_first`` is off)."""
        with torch.no_grad():
            for p in self.params:
                if id(p) not in self._dots and p.grad is not None:
                    self._dots[id(p)] = _three_dots(p.grad, None)
                    if not self.keep_first:
                        p.grad = None
        if not self._dots:
            return {}
        ids = list(self._dots)
        pieces = [torch.stack(self._dots[i]).double().sum(0) for i in ids]     # (3,) each, float64 sums
        flat = torch.stack(pieces).cpu().tolist()
        return {i: tuple(v) for i, v in zip(ids, flat)}


def _three_dots(x: torch.Tensor | None, y: torch.Tensor | None) -> list[torch.Tensor]:
    """[(⟨x,y⟩, ‖x‖², ‖y‖²) per piece of CHUNK elements] in float32 (None: a zero vector)."""
    ref = x if x is not None else y
    xf, yf = (t.reshape(-1) if t is not None else None for t in (x, y))
    out = []
    for k in range(0, ref.numel(), CHUNK):
        xk = _f32(xf[k:k + CHUNK]) if xf is not None else None
        yk = _f32(yf[k:k + CHUNK]) if yf is not None else None
        zero = torch.zeros((), dtype=torch.float32, device=ref.device)
        out.append(torch.stack([torch.dot(xk, yk) if xk is not None and yk is not None else zero,
                                torch.dot(xk, xk) if xk is not None else zero,
                                torch.dot(yk, yk) if yk is not None else zero]))
    return out
