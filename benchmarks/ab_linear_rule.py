"""A/B of the Linear inner-product rule in one process: the dense rule (every position) against the
registered one (only positions with a cotangent, e.g. the lm head's answer tokens). Interleaved,
NPO+GD on the embedded default, batch 4+4; prints medians and ratios to the plain step.

    python benchmarks/ab_linear_rule.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dense_linear_rule(mod, inputs, g, V) -> torch.Tensor:
    from geffect.engine.rules import _flat
    a, g = _flat(inputs[0]), _flat(g)                       # (N, T, in), (N, T, out)
    out = torch.zeros(g.shape[0])
    if "weight" in V:
        out = out + ((a @ V["weight"].T) * g).sum((1, 2))
    if "bias" in V:
        out = out + g.sum(1) @ V["bias"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    import overhead as ob

    from geffect.engine import rules
    from geffect.models import load_model
    registered = rules._RULES[torch.nn.Linear]
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model("smollm2-135m")
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        del loaded
        s = ob.setup(tmp, a.batch, keep_freed=True)
        ob.step_plain(s)
        ob.step_profiled(s)   # warm-up
        times = {"plain": [], "dense rule": [], "registered rule": []}
        try:
            for _ in range(a.repeats):
                for k, record in times.items():
                    rules._RULES[torch.nn.Linear] = dense_linear_rule if k == "dense rule" else registered
                    step = ob.step_plain if k == "plain" else ob.step_profiled
                    t0 = time.perf_counter()
                    step(s)
                    record.append(time.perf_counter() - t0)
        finally:
            rules._RULES[torch.nn.Linear] = registered
    med = {k: statistics.median(v) for k, v in times.items()}
    print(", ".join(f"{k} {v:.2f} s" for k, v in med.items()) + "  |  profiled/plain: "
          + ", ".join(f"{k} {med[k] / med['plain']:.2f}" for k in times if k != "plain"))


if __name__ == "__main__":
    main()
