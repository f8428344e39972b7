"""End-to-end cost of profiling, through the CLI: ``geffect profile`` (its defaults: conflict
statistics every step, per-token G-effects and Fig. 5b pairs every 5 steps) against ``geffect
unlearn`` on the same data, seed and steps, interleaved, measured in one run. ``profile-groups``
is ``--no-instances`` (the layer groups' G-effects and the conflict statistics only; GA and GD take
them from per-tensor dot products); ``profile-form-on``/``-off`` are the defaults with the Linear
layers' per-instance form fixed instead of timed on the run's first steps (``--instance-form``).

- Per-step time: ``records.csv``'s ``time_s`` (the loop's own clock around sampling and the
  step) of every step of every repeat; the median and the mean; the ratio profile / unlearn.
- Peak memory: the maximum resident set size of each whole process (``os.wait4``'s rusage, what
  ``/usr/bin/time -v`` reports), model loading and evaluation included; the median over repeats.
- With several repeats, each repeat's own ratios (min–max): the spread the shared machine adds.

The memorise cache is filled first by an unmeasured one-step run. Usage::

    python benchmarks/end_to_end.py [--steps 8] [--repeats 3] [--method npo+gd] [--variants unlearn profile …]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

VARIANTS = {
    "unlearn": ["unlearn"],
    "profile": ["profile", "--no-report"],
    "profile-no-conflicts": ["profile", "--no-report", "--no-conflicts"],
    "profile-no-tokens-pairs": ["profile", "--no-report", "--tokens-every", "0", "--pairs-every", "0"],
    "profile-groups": ["profile", "--no-report", "--no-instances"],     # group G-effects and conflicts only
    "profile-form-on": ["profile", "--no-report", "--instance-form", "on"],     # the defaults, the form fixed
    "profile-form-off": ["profile", "--no-report", "--instance-form", "off"],
}


def run(argv: list[str], out: Path, log: Path) -> tuple[pd.DataFrame, float]:
    """Run ``python -m geffect …`` to completion; (its records.csv, max RSS in MB)."""
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "geffect", *argv, "--out", str(out)], stdout=f, stderr=f)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"geffect {' '.join(argv)} failed ({p.returncode}):\n{log.read_text()[-3000:]}")
    return pd.read_csv(out / "records.csv"), usage.ru_maxrss / 1024


def _instance_form(out: Path) -> str:
    """The per-instance form a profile run took (summary.json), for the log line; '' for unlearn."""
    f = out / "summary.json"
    got = json.loads(f.read_text()).get("instance_form") if f.is_file() else None
    if not got:
        return ""
    timed = ", ".join(f"{k} {v:.2f}" for k, v in got.get("us_per_position", {}).items())
    return f", instance form {got['chosen']}" + (f" (timed, µs per position: {timed})" if timed else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="npo+gd")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved (default: %(default)s)")
    ap.add_argument("--variants", nargs="+", default=["unlearn", "profile"], choices=list(VARIANTS))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="options passed to every run (e.g. --forget-batch 4 --retain-batch 4)")
    a = ap.parse_args()
    common = ["--method", a.method, "--model", a.model, "--steps", str(a.steps), "--no-progress",
              "--no-save-model", *a.extra]
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    records: dict[str, list[pd.DataFrame]] = {v: [] for v in a.variants}
    rss: dict[str, list[float]] = {v: [] for v in a.variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["unlearn", *common[:4], "--steps", "1", "--no-progress", "--no-save-model", *a.extra],
            tmp / "warm", tmp / "warm.log")                      # fills the memorise cache
        for r in range(a.repeats):
            for v in a.variants:
                rec, m = run(VARIANTS[v] + common, tmp / f"{v}-{r}", tmp / f"{v}-{r}.log")
                t = rec["time_s"].tolist()
                times[v] += t
                records[v].append(rec)
                rss[v].append(m)
                form = _instance_form(tmp / f"{v}-{r}")
                print(f"repeat {r + 1}/{a.repeats} {v:<24} median step {statistics.median(t):.2f} s, "
                      f"max RSS {m:.0f} MB{form}", flush=True)
    base = a.variants[0]
    print(f"\n{a.method}, {a.steps} steps x {a.repeats} repeats ({a.model}); ratios to {base}:")
    print(f"  {'variant':<24} {'median s':>9} {'mean s':>8} {'median x':>9} {'mean x':>7} {'max RSS MB':>11} {'RSS x':>6}")
    for v in a.variants:
        med, mean, m = statistics.median(times[v]), statistics.fmean(times[v]), statistics.median(rss[v])
        print(f"  {v:<24} {med:>9.2f} {mean:>8.2f} {med / statistics.median(times[base]):>9.2f} "
              f"{mean / statistics.fmean(times[base]):>7.2f} {m:>11.0f} {m / statistics.median(rss[base]):>6.2f}")
    if a.repeats > 1:          # each repeat's own ratios: how much of a difference is the machine
        print(f"\nper repeat (each variant against {base}'s run of the same repeat), min-max over {a.repeats} repeats:")
        for v in a.variants[1:]:
            med = [statistics.median(p["time_s"]) / statistics.median(b["time_s"]) for p, b in zip(records[v], records[base])]
            mean = [p["time_s"].mean() / b["time_s"].mean() for p, b in zip(records[v], records[base])]
            mem = [x / y for x, y in zip(rss[v], rss[base])]
            print(f"  {v:<24} median x {min(med):.2f}-{max(med):.2f}, mean x {min(mean):.2f}-{max(mean):.2f}, "
                  f"max RSS x {min(mem):.2f}-{max(mem):.2f}")
    phase_table({v: pd.concat(r) for v, r in records.items()})


def phase_table(records: dict[str, pd.DataFrame]) -> None:
    """Where the time goes: the mean seconds per phase (records.csv's t_* columns, self time) over
    each run's first step (optimizer state allocated, pages faulted in), the other steps that took
    per-token G-effects or pairs, and the rest; ``other`` is the step's time outside every phase
    (sampling the batch, the records)."""
    print("\nper phase, mean seconds per step (t_* columns of records.csv):")
    rows = []
    for v, d in records.items():
        cols = [c for c in d.columns if c.startswith("t_")]
        if not cols:
            continue
        first = d["step"] == d["step"].min()
        special = ((d.get("t_tokens", 0) > 0) | (d.get("t_pairs", 0) > 0)) & ~first
        for label, sel in (("first steps", first), ("token/pair steps", special), ("other steps", ~special & ~first)):
            if sel.any():
                part = d[sel]
                means = {c[2:]: part[c].mean() for c in cols}
                means["other"] = part["time_s"].mean() - sum(means.values())
                rows.append((f"{v}, {label} ({int(sel.sum())})", part["time_s"].mean(), means))
    if not rows:
        return
    names = list(rows[0][2])
    print(f"  {'steps':<40} {'time_s':>7} " + " ".join(f"{n:>9}" for n in names))
    for label, total, means in rows:
        print(f"  {label:<40} {total:>7.2f} " + " ".join(f"{means.get(n, 0.0):>9.3f}" for n in names))


if __name__ == "__main__":
    main()
