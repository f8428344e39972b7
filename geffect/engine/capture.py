"""One object owns the hooks (Kronfluence style): inputs and outputs of every parameter-owning
module in the training step's own forward, and the risk's cotangents at those outputs.

Use as a context manager so hooks never outlive a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import torch

from geffect.engine.rules import rule_for


@dataclass
class _Seen:
    inputs: tuple
    output: torch.Tensor
    grad: torch.Tensor | None = None


class Capture:
    def __init__(self, model: torch.nn.Module, assignment: dict[str, str]):
        self.model, self.assignment = model, assignment
        self.modules = {n: model.get_submodule(n) for n in assignment}
        self.seen: dict[str, _Seen] = {}
        self._handles: list = []
        self.stash = False  # when True, the training backward's cotangents are kept (reuse path)
        self.row_scale: torch.Tensor | None = None  # (N,) per-row factor turning them into risk cotangents

    def __enter__(self) -> Self:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            if name in self.seen:
                raise RuntimeError(f"module {name} ran twice in one forward; the G-effect engine needs one call")
            out = output[0] if isinstance(output, tuple) else output
            seen = self.seen[name] = _Seen(inputs, out)
            if out.requires_grad:
                def keep(g, seen=seen):
                    if self.stash:  # a backward split into parts: cotangents add up
                        seen.grad = g if seen.grad is None else seen.grad + g
                # removed on exit: a hook left on the tensor would form a reference cycle
                # (tensor -> hook -> record -> tensor) that only the cyclic GC frees
                self._handles.append(out.register_hook(keep))
        return hook

    def release(self) -> None:
        """Drop every captured tensor (call once the step's values are computed)."""
        self.seen.clear()
        self.row_scale = None

    def risk_grads(self, risk: torch.Tensor) -> None:
        """Cotangents of the risk at every captured output, from one backward without weight grads."""
        names = [n for n, s in self.seen.items() if s.output.requires_grad]
        grads = torch.autograd.grad(risk, [self.seen[n].output for n in names], retain_graph=True,
                                    allow_unused=True)
        for n, g in zip(names, grads):
            self.seen[n].grad = g

    def rescale_rows(self, rows: torch.Tensor, scale: torch.Tensor) -> None:
        """Treat stashed training cotangents as risk cotangents: g_R[i] = g_L[i] / c_i on ``rows``.

        Inner products are linear in each row's cotangent, so the scale is applied to the per-row
        results rather than to the tensors (no copy of every cotangent).
        """
        n = next((s.grad.shape[0] for s in self.seen.values() if s.grad is not None), 0)
        self.row_scale = torch.zeros(n, dtype=torch.float64)
        self.row_scale[rows] = scale.to(torch.float64)

    def output_grads(self, scalar: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cotangents of ``scalar`` at every captured output (graph kept; nothing stored)."""
        names = [n for n, s in self.seen.items() if s.output.requires_grad]
        grads = torch.autograd.grad(scalar, [self.seen[n].output for n in names], retain_graph=True,
                                    allow_unused=True)
        return {n: g for n, g in zip(names, grads) if g is not None}

    def inner_products(self, V: dict[int, torch.Tensor], rows: torch.Tensor | slice,
                       cotangents: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-row ⟨∇ℓ_i restricted to each group's modules, V⟩. -> {group: (n_rows,)}.

        ``V`` maps id(parameter) to the direction (∇L or the update) for that parameter.
        ``cotangents`` (module name -> tensor) replaces the captured risk cotangents, e.g. by the
        objective's own, giving per-row ⟨∇L_i, V⟩ instead.
        """
        out: dict[str, torch.Tensor] = {}
        for name, s in self.seen.items():
            mod = self.modules[name]
            local = {pn: V[id(p)] for pn, p in mod._parameters.items()
                     if p is not None and p.requires_grad and id(p) in V}
            grad = s.grad if cotangents is None else cotangents.get(name)
            if not local or grad is None:
                continue
            n_rows = grad.shape[0]
            inputs = tuple(x[rows] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n_rows else x
                           for x in s.inputs)
            with torch.no_grad():
                vals = rule_for(mod)(mod, inputs, grad[rows].detach(), local).float()
            g = self.assignment[name]
            out[g] = out[g] + vals if g in out else vals
        if cotangents is None and self.row_scale is not None:
            scale = self.row_scale[rows].float()
            out = {g: v * scale for g, v in out.items()}
        return out
