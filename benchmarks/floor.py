"""How close the profiled step is to its floor, measured in one process.

Per-instance G-effects need, for every Linear layer, p_n = ⟨g_n, G⟩ (row n's own weight gradient
against the layer's whole one). Any exact way of getting them touches every weight once more: the
matmul form takes one more product of the layer's size (K·d_in·d_out, K positions), the instance
form (``geffect/engine/instanceform.py``) forms the N rows' gradients tile by tile and passes over
them. The issue's floor for per-instance values is that one more pass of the Linear products.
This script measures, on ``benchmarks/overhead.py``'s setup (one fixed batch, AdamW), interleaved:

- the plain step and the profiled step with the conflict statistics (``geffect profile``'s
  ordinary step), and the profiled step's excess per phase (``t_*`` self seconds);
- the floor: one weight-gradient product ``Dᵀ A`` of every Linear layer the instance form takes,
  on the cotangents and inputs of a real step (timed alone, cache as in a step: layer by layer);
- the instance form's own work on the same tensors (``_rows_grad`` with the statistics), and its
  excess over the product it replaces (autograd's, the same ``Dᵀ A``).

Prints medians and the ratios (plain + floor) / plain and profiled / plain. Usage::

    python benchmarks/floor.py [--repeats 5] [--method npo+gd] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overhead import setup, step_conflicts, step_plain


def layer_tensors(s) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(D (N, T, out), A (N, T, in), conv1d) of every instance-form Linear layer, from one plain step."""
    from geffect.engine.instanceform import eligible_linear
    from geffect.engine.rules import _CONV1D
    layers = eligible_linear(s["model"], s["engine"].assignment)
    got: dict[str, list] = {n: [None, None] for n in layers}
    hooks = []
    for n, m in layers.items():
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: got[n].__setitem__(1, inp[0].detach())))
        hooks.append(m.register_full_backward_hook(
            lambda mod, gin, gout, n=n: got[n].__setitem__(0, gout[0].detach().clone())))
    try:
        step_plain(s)
    finally:
        for h in hooks:
            h.remove()
    return [(D, A, _CONV1D is not None and isinstance(layers[n], _CONV1D)) for n, (D, A) in got.items() if D is not None and A is not None]


def products(tensors) -> None:
    """One weight-gradient product of every layer (autograd's, and the matmul form's extra one)."""
    for D, A, conv1d in tensors:
        D2, A2 = D.reshape(-1, D.shape[-1]), A.reshape(-1, A.shape[-1])
        torch.mm(A2.T, D2) if conv1d else torch.mm(D2.T, A2)


def instance_form(tensors, retain: slice) -> None:
    """The instance form's work on every layer: rows' gradients, G, p, the parts' statistics."""
    from geffect.engine.instanceform import _rows_grad
    buffers: dict = {}

    def buffer(numel, dtype, device):
        b = buffers.get(numel)
        if b is None:
            b = buffers[numel] = torch.empty(numel, dtype=dtype, device=device)
        return b
    for D, A, conv1d in tensors:
        _rows_grad(D, A, conv1d, retain, True, buffer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model (default: %(default)s)")
    ap.add_argument("--method", default="npo+gd", help="unlearning method (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4, help="forget (= retain) rows (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default: %(default)s)")
    a = ap.parse_args()
    s = setup(a.model, a.batch, True, method=a.method)
    step_plain(s), step_conflicts(s)                       # warm-up: optimizer state, heap
    tensors = layer_tensors(s)
    retain = s["micro"][0].batch.segments["retain"]
    t: dict[str, list[float]] = {k: [] for k in ("plain", "profiled", "floor", "form")}
    phases: dict[str, list[dict]] = {"plain": [], "profiled": []}
    for r in range(a.repeats):
        for name, fn in (("plain", step_plain), ("profiled", step_conflicts),
                         ("floor", lambda s: products(tensors)), ("form", lambda s: instance_form(tensors, retain))):
            t0 = time.perf_counter()
            res = fn(s)
            t[name].append(time.perf_counter() - t0)
            if name in phases:
                phases[name].append(res.phases)
        print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in t.items()), flush=True)
    med = {k: statistics.median(v) for k, v in t.items()}
    n_layers = len(tensors)
    shape = tuple(s["micro"][0].batch.input_ids.shape)
    print(f"\n{a.model}, {a.method}, batch {a.batch}+{a.batch} {shape}, {n_layers} Linear layers, "
          f"torch threads {torch.get_num_threads()}; medians of {a.repeats}:")
    print(f"  plain step                     {med['plain']:.3f} s")
    print(f"  profiled step (conflicts)      {med['profiled']:.3f} s   {med['profiled'] / med['plain']:.3f}x plain")
    print(f"  floor: one more product D^T A  {med['floor']:.3f} s   (plain + floor) / plain = "
          f"{(med['plain'] + med['floor']) / med['plain']:.3f}x")
    print(f"  instance form on those layers  {med['form']:.3f} s   its excess over the product it replaces "
          f"{med['form'] - med['floor']:.3f} s ({(med['form'] - med['floor']) / med['floor']:.2f} of a product)")
    print("  profiled step's excess per phase (median self seconds, profiled - plain):")
    for k in phases["plain"][0]:
        d = statistics.median(p[k] for p in phases["profiled"]) - statistics.median(p[k] for p in phases["plain"])
        if abs(d) >= 0.005:
            print(f"    {k:<12} {d:+.3f} s")


if __name__ == "__main__":
    main()
