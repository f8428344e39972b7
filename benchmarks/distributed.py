"""Cost of profiling under torchrun: ``geffect profile`` against ``geffect unlearn`` on 1 and N
processes, DDP and FSDP2, the same global batch, interleaved, measured in one run.

Per-step time is the median of ``records.csv``'s ``time_s`` (rank 0's clock around sampling, the
step and its collectives) over the steps after the first; the ratio is profile / unlearn at the
same world size and parallel mode. Per-token G-effects (a forward-mode jvp) are off in every
variant, as FSDP does not take them. On a CPU machine (gloo, one core per process) the absolute
times say little about GPUs; the ratios say what the engine's extra collectives and work cost
relative to the step. Usage::

    python benchmarks/distributed.py [--model smollm2-135m] [--steps 6] [--nproc 1 2] [--parallel ddp fsdp]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

COMMON = ["--tokens-every", "0"]


def run(verb: str, nproc: int, parallel: str, args: argparse.Namespace, out: Path) -> list[float]:
    """One torchrun launch of ``geffect VERB``; rank 0's per-step seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "geffect", verb, "--model", args.model, "--method", args.method, "--steps", str(args.steps),
           "--forget-batch", str(args.batch), "--retain-batch", str(args.batch), "--parallel", parallel,
           "--no-save-model", "--no-progress", "--out", str(out)]
    if verb == "profile":
        cmd += ["--no-report", *COMMON]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return pd.read_csv(out / "records.csv")["time_s"].tolist()[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="npo+gd")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="global forget and retain rows per step")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            for parallel in args.parallel if nproc > 1 else ["ddp"]:
                t = {}
                for verb in ("unlearn", "profile"):          # interleaved per configuration
                    times = run(verb, nproc, parallel, args, Path(tmp) / f"{verb}-{nproc}-{parallel}")
                    t[verb] = statistics.median(times)
                label = "single process" if nproc == 1 else f"{nproc} processes, {parallel}"
                rows.append({"configuration": label, "unlearn s/step": t["unlearn"],
                             "profile s/step": t["profile"], "profile / unlearn": t["profile"] / t["unlearn"]})
                print(f"{label}: unlearn {t['unlearn']:.2f} s/step, profile {t['profile']:.2f} s/step, "
                      f"ratio {t['profile'] / t['unlearn']:.2f}", flush=True)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
