"""AdamW's step on SmolLM2-135M-shaped float32 parameters (random values and gradients, no model):
the default per-tensor path against the fused kernel :func:`geffect.optim.make_optimizer` takes where
torch has it, alternated in one process, after one unmeasured step each (state allocation); and the
largest difference of the two after three steps from the same start. Usage::

    python benchmarks/optimizer.py [--steps 6]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ([(49152, 576)] + [(576, 576)] * 60 + [(192, 576)] * 60 + [(1536, 576)] * 90 + [(576,)] * 61)


def make(fused: bool | None, seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps, torch.optim.AdamW(ps, lr=1e-5, fused=fused)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="measured steps of each (default: %(default)s)")
    a = ap.parse_args()
    from geffect.engine.allocator import keep_freed_memory
    keep_freed_memory()                              # as a run on CPU does
    opts = {name: make(fused)[1] for name, fused in (("default", None), ("fused", True))}
    for o in opts.values():
        o.step()                                     # state allocated, pages faulted in
    times: dict[str, list[float]] = {n: [] for n in opts}
    for _ in range(a.steps):
        for n, o in opts.items():
            t = time.perf_counter()
            o.step()
            times[n].append(time.perf_counter() - t)
    for n, t in times.items():
        print(f"AdamW {n:<8} median step {statistics.median(t):.3f} s  ({' '.join(f'{x:.3f}' for x in t)})")
    print(f"fused / default: {statistics.median(times['fused']) / statistics.median(times['default']):.2f}x")
    del opts
    (a_ps, a_opt), (b_ps, b_opt) = make(None, 1), make(True, 1)
    for _ in range(3):
        a_opt.step()
        b_opt.step()
    diff = max((x - y).abs().max().item() for x, y in zip(a_ps, b_ps))
    print(f"after 3 steps from the same start: max |default - fused| = {diff:.2e} "
          f"(parameters up to {max(x.abs().max().item() for x in a_ps):.2f})")


if __name__ == "__main__":
    main()
