"""Host synchronisations per step: the calls that read a tensor's value on the host (``item``,
``bool``, ``int``, ``float``, ``tolist``, ``nonzero``), counted by caller, for a plain step and the
profiled step (`geffect profile`'s default: per-instance G-effects and conflict statistics).

On an accelerator each such call waits for every kernel queued before it, so a profiled step that
reads one value per layer stalls the device once per layer. On CPU they cost nothing, which is why
they are counted here rather than timed. Counts are per step, after two warm-up steps::

    python benchmarks/host_syncs.py [--model smollm2-135m] [--method npo+gd] [--top 15]
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="npo+gd")
    ap.add_argument("--batch", type=int, default=4, help="forget and retain rows per step (default: %(default)s)")
    ap.add_argument("--top", type=int, default=15, help="callers listed per step (default: %(default)s)")
    a = ap.parse_args()
    from overhead import setup, step_conflicts, step_plain

    s = setup(a.model, a.batch, True, method=a.method)
    root = str(Path(__file__).resolve().parents[1]) + "/"
    counts: collections.Counter = collections.Counter()
    counting = [False]

    def counted(name: str):
        read = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if counting[0]:
                f = sys._getframe(1)
                counts[(name, f.f_code.co_filename.replace(root, ""), f.f_lineno)] += 1
            return read(self, *args, **kwargs)
        return wrapper
    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    for label, step in (("plain step", step_plain), ("profiled step (effects + conflicts)", step_conflicts)):
        step(s)
        step(s)
        counts.clear()
        counting[0] = True
        step(s)
        counting[0] = False
        geffect = sum(c for (_, f, _), c in counts.items() if f.startswith("geffect/"))
        print(f"{label}: {sum(counts.values())} host reads, {geffect} of them in geffect/")
        for (name, f, line), c in counts.most_common(a.top):
            print(f"  {c:5d}  {name:9s} {f}:{line}")


if __name__ == "__main__":
    main()
