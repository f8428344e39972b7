"""One object owns the hooks (Kronfluence style): inputs and outputs of every parameter-owning
module in the training step's own forward, and the risk's cotangents at those outputs.

Use as a context manager so hooks never outlive a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import torch

from geffect.distributed import World
from geffect.engine.rules import mark_output_projection, rule_for

full = World.full


@dataclass
class _Seen:
    inputs: tuple
    output: torch.Tensor | None        # dropped once the training backward has run (see drop_outputs)
    rows: torch.Tensor | None = None   # global batch rows of this chunk (None: all rows, in order)
    grad: torch.Tensor | None = None   # the risk's cotangent (or the training one, rescaled per row: reuse path)
    train: torch.Tensor | None = None  # the training backward's cotangent (kept when ``keep_training``)
    in_graph: bool = True              # the output required grad (it has a cotangent)


def _in_backward() -> bool:
    """Whether autograd is running a backward now (a checkpointed block's recompute runs there)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:       # pragma: no cover - older torch
        return False


class Capture:
    """Hooks for one training step. The step's forward may run in row chunks (the retain rows of an
    objective that never reads them): set ``rows`` before each chunk's forward; every module then
    holds one record per chunk.

    Streaming (``stream_to``): when the training backward has accumulated every gradient of a
    module, ``stream_to(names)`` is called with the modules that just became complete, which may
    take their inner products against ``.grad`` at once and :meth:`release_modules` them: their
    inputs and cotangents are then freed during the backward instead of held to its end."""

    def __init__(self, model: torch.nn.Module, assignment: dict[str, str]):
        self.model, self.assignment = model, assignment
        mark_output_projection(model)           # its cotangents: the answer positions alone
        self.modules = {n: model.get_submodule(n) for n in assignment}
        self.seen: dict[str, list[_Seen]] = {}
        self._handles: list = []
        self.stash = False  # when True, the training backward's cotangents are kept as ``grad`` (reuse path)
        self.keep_training = False    # keep the training backward's cotangents as ``train`` (parts' gradients)
        self.training_pass = False    # set by the engine while the training backward runs
        self.row_scale: torch.Tensor | None = None  # (N,) per-row factor turning them into risk cotangents
        self.rows: torch.Tensor | None = None        # global rows of the forward about to run
        self.recomputed = 0                          # module calls seen again in a checkpointed recompute
        self.stream_to = None                        # callback(module names) when their gradients are complete
        self.streamed: dict[str, torch.Tensor] = {}  # per-row inner products already taken, per group
        self.part_stats: dict[int, tuple] = {}       # id(param) -> the parts' statistics taken in Gram form (gramrows)
        self.pair_products: dict[str, torch.Tensor] = {}  # module -> its Fig. 5b pairs (n_f, 2) taken in Gram form
        self.grad_squares: dict[int, tuple] = {}     # id(param) -> (its .grad, that tensor's version, ‖.grad‖²)
        self._owners: dict[int, list[str]] = {}
        for name, mod in self.modules.items():
            for p in mod._parameters.values():
                if p is not None and p.requires_grad:
                    self._owners.setdefault(id(p), []).append(name)
        self._waiting: dict[str, int] = {}

    def __enter__(self) -> Self:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        params = {id(p): p for mod in self.modules.values() for p in mod._parameters.values() if p is not None}
        for pid, names in self._owners.items():
            self._handles.append(params[pid].register_post_accumulate_grad_hook(self._accumulated(names)))
        return self

    def arm_stream(self, callback) -> None:
        """Stream the modules of this capture to ``callback`` as their gradients complete."""
        self.stream_to = callback
        self._waiting = {n: sum(1 for names in self._owners.values() if n in names) for n in self.modules}

    def _accumulated(self, names: list[str]):
        def hook(param):
            if self.stream_to is None or not self.training_pass:
                return
            ready = []
            for n in names:
                self._waiting[n] -= 1
                if self._waiting[n] == 0 and n in self.seen:
                    ready.append(n)
            if ready:
                self.stream_to(ready)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _records(self):
        for name, chunks in self.seen.items():
            for rec in chunks:
                yield name, rec

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            chunks = self.seen.setdefault(name, [])
            if _in_backward():
                # gradient checkpointing recomputes the block inside the backward; the original
                # forward's record stands (the gradients flow through its graph)
                if not any(c.in_graph for c in chunks):
                    raise RuntimeError(f"module {name} was recomputed by reentrant gradient checkpointing, which "
                                       "the G-effect engine cannot follow; use use_reentrant=False")
                self.recomputed += 1
                return
            if any(c.rows is self.rows for c in chunks):
                raise RuntimeError(f"module {name} ran twice in one forward; the G-effect engine needs one call")
            out = output[0] if isinstance(output, tuple) else output
            rec = _Seen(inputs, out, self.rows, in_graph=out.requires_grad)
            chunks.append(rec)
            if out.requires_grad:
                def keep(g, rec=rec):
                    if self.stash:
                        rec.grad = g if rec.grad is None else rec.grad + g
                    if self.keep_training and self.training_pass:
                        rec.train = g if rec.train is None else rec.train + g
                # removed on exit: a hook left on the tensor would form a reference cycle
                # (tensor -> hook -> record -> tensor) that only the cyclic GC frees
                self._handles.append(out.register_hook(keep))
        return hook

    def drop_outputs(self) -> None:
        """Forget the module outputs (needed only to reach their cotangents before the training
        backward); the inner products need the inputs and the cotangents alone."""
        for _, rec in self._records():
            rec.output = None

    def release_modules(self, names) -> None:
        """Drop the captured tensors of these modules (their values are taken). The records' tensors
        are cleared, not only the records: each output's cotangent hook still refers to its record
        until the backward ends and frees the graph, and would keep every cotangent alive to then."""
        for n in names:
            for rec in self.seen.pop(n, []):
                rec.inputs, rec.output, rec.grad, rec.train = (), None, None, None

    def grad_square(self, p: torch.nn.Parameter, known: torch.Tensor | None = None) -> torch.Tensor:
        """‖p.grad‖² (float64, 0-dim), kept with the gradient's version counter: the step's gradient
        norm reuses it (:meth:`known_grad_square`) instead of another pass over the gradient.
        ``known``: the value, when the caller has it from the very tensor now in ``.grad``."""
        g = p.grad
        hit = self.grad_squares.get(id(p))
        if hit is not None and hit[0] is g and hit[1] == g._version:
            return hit[2]
        sq = squared_norm(g) if known is None else known
        self.grad_squares[id(p)] = (g, g._version, sq)
        return sq

    def known_grad_square(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """‖p.grad‖² if taken from this very gradient and nothing has written to it since, else None."""
        hit = self.grad_squares.get(id(p))
        if hit is None or p.grad is None or hit[0] is not p.grad or hit[1] != p.grad._version:
            return None
        return hit[2]

    def release(self) -> None:
        """Drop every captured tensor (call once the step's values are computed)."""
        self.seen.clear()
        self.grad_squares = {}
        self.streamed = {}
        self.part_stats = {}
        self.pair_products = {}
        self.row_scale = None

    def _outputs(self) -> list[_Seen]:
        return [rec for _, rec in self._records() if rec.in_graph and rec.output is not None]

    @staticmethod
    def _of_chunk(rec: _Seen, rows: torch.Tensor) -> bool:
        return rec.rows is not None and torch.equal(rec.rows, rows)

    def has_chunk(self, rows: torch.Tensor) -> bool:
        """Whether exactly these global rows ran as one forward chunk."""
        return any(self._of_chunk(rec, rows) for _, rec in self._records())

    def risk_grads(self, risk: torch.Tensor, chunk: torch.Tensor | None = None) -> None:
        """Cotangents of the risk at every captured output (or at the outputs of the forward chunk
        of rows ``chunk`` only), from one backward without weight grads."""
        recs = [r for r in self._outputs() if chunk is None or self._of_chunk(r, chunk)]
        grads = torch.autograd.grad(risk, [r.output for r in recs], retain_graph=True, allow_unused=True)
        for r, g in zip(recs, grads):
            r.grad = g

    def rescale_rows(self, rows: torch.Tensor, scale: torch.Tensor, n_rows: int) -> None:
        """Treat stashed training cotangents as risk cotangents: g_R[i] = g_L[i] / c_i on ``rows``.

        Inner products are linear in each row's cotangent, so the scale is applied to the per-row
        results rather than to the tensors (no copy of every cotangent).
        """
        wide = torch.float32 if scale.device.type == "mps" else torch.float64    # MPS has no float64
        self.row_scale = torch.zeros(n_rows, dtype=wide, device=scale.device)
        self.row_scale[rows] = scale.to(wide)

    def inner_products(self, V: dict[int, torch.Tensor], rows: slice, names: list[str] | None = None,
                       per_module: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-row ⟨∇ℓ_i restricted to each group's modules, V⟩ for the global rows ``rows``
        (of the modules ``names``, default all still held, plus what was streamed).
        -> {group: (n_rows,)}, unscaled by ``row_scale`` when ``names`` is given. ``per_module``
        also receives each module's own (n_rows,) products (unscaled), keyed by module name.

        ``V`` maps id(parameter) to the direction (∇L or the update) for that parameter.
        """
        n = rows.stop - rows.start
        out: dict[str, torch.Tensor] = {} if names is not None else {g: v.clone() for g, v in self.streamed.items()}
        for name in (names if names is not None else list(self.seen)):
            mod = self.modules[name]
            # a sharded direction is gathered whole for this module only (every rank, same order)
            local = {pn: full(V[id(p)]) for pn, p in mod._parameters.items()
                     if p is not None and p.requires_grad and id(p) in V}
            for rec in self.seen.get(name, []):
                self._module_products(name, mod, rec, local, rows, n, out, per_module)
        if names is None and self.row_scale is not None:
            scale = self.row_scale[rows].float()
            out = {g: v * scale for g, v in out.items()}
        return out

    def _module_products(self, name: str, mod, rec: _Seen, local: dict, rows: slice, n: int,
                         out: dict[str, torch.Tensor], per_module: dict | None = None) -> None:
        """Add one captured chunk's per-row products of module ``name`` along ``local`` into ``out``."""
        grad = rec.grad
        if not local or grad is None:
            return
        n_chunk = grad.shape[0]
        if rec.rows is None:            # one forward over all rows: a slice is a view, no copy
            sel, dest = rows, None
        else:                           # chunk rows are host-side bookkeeping (CPU index tensors)
            hit = (rec.rows >= rows.start) & (rec.rows < rows.stop)
            if not hit.any():
                return
            sel = slice(None) if hit.all() else hit.nonzero().flatten().to(grad.device)
            dest = (rec.rows[hit] - rows.start).to(grad.device)
        inputs = tuple(x[sel] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n_chunk else x
                       for x in rec.inputs)
        with torch.no_grad():
            vals = rule_for(mod)(mod, inputs, grad[sel].detach(), local).float()     # (n_sel,)
        accs = [out.setdefault(self.assignment[name], torch.zeros(n, device=vals.device))]
        if per_module is not None:
            accs.append(per_module.setdefault(name, torch.zeros(n, device=vals.device)))
        for acc in accs:
            if dest is None:
                acc += vals
            else:
                acc.index_add_(0, dest, vals)


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖² as a float64 0-dim tensor (one dot product in x's dtype; no copy)."""
    x = x.reshape(-1)
    return torch.dot(x, x).double()
