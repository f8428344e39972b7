"""Overhead of the G-effect engine, measured in one run on the embedded default model.

Variants (NPO+GD, AdamW, bundled data, forget batch = retain batch = B):
- plain:    one training step (forward θ, forward θ_o, backward, optimizer step);
- profiled: the same step with the engine on (per-group and per-instance G-effects, grad direction);
- conflicts: profiled plus the per-step conflict statistics of `geffect profile` (backward once per part);
- naive:    what the official G-effect code does: the plain step plus, per micro-batch, separate
            backward passes for R_u, L and R_r with full parameter gradients copied out
            (flattened to host buffers), EMA-smoothed (0.6·old + 0.4·new) and dotted per group.
Time: median over interleaved repeats. Peak memory: each variant in its own process, resident memory sampled during
the steps (it includes the model, the reference copy and AdamW state).

    python benchmarks/overhead.py [--batches 2 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def setup(model_dir: str, B: int):
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from geffect.data.synthetic import default_splits, idk_answers
    from geffect.engine import Engine
    from geffect.models import LoadedModel, frozen_reference
    from geffect.objectives import parse_method
    from geffect.unlearn import Data, make_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    sp = default_splits(0)
    data = Data(sp["forget"], sp["retain"], [], idk_answers(), True)
    method = parse_method("npo+gd")
    batch = make_batch(tok, method, data.forget[:B], data.retain[:B], data, random.Random(0), 128)
    return {"model": model, "ref": frozen_reference(model), "method": method, "batch": batch,
            "opt": torch.optim.AdamW(model.parameters(), lr=1e-6), "engine": Engine(model),
            "loaded": LoadedModel(model, tok, "smollm2-135m")}


def step_plain(s):
    from geffect.unlearn import forward
    s["opt"].zero_grad(set_to_none=True)
    fo = forward(s["model"], s["ref"], s["batch"], s["method"])
    s["method"].parts(fo).total.backward()
    s["opt"].step()


def step_profiled(s):
    from geffect.unlearn import forward
    eng = s["engine"]
    s["opt"].zero_grad(set_to_none=True)
    with eng.capture() as cap:
        fo = forward(s["model"], s["ref"], s["batch"], s["method"])
        parts = s["method"].parts(fo)
        eng.backward(cap, fo, parts.total)
    eng.summarise(eng.measure(cap, s["batch"].segments, eng.direction_from_grads()))
    s["opt"].step()


def step_conflicts(s):
    """The profiled step plus per-step conflict statistics (the `geffect profile` default): one
    forward per part's rows, a backward per part, the two part gradients dotted per group."""
    from functools import partial

    from geffect.surgery import combine, param_groups
    from geffect.unlearn import backward_parts, forward, part_rows, split_parts
    eng, method, model = s["engine"], s["method"], s["model"]
    params = [p for p in model.parameters() if p.requires_grad]
    s["opt"].zero_grad(set_to_none=True)
    grads = ({}, {})
    with eng.capture() as cap:
        fo = forward(model, s["ref"], s["batch"], method, None, part_rows(s["batch"].segments), cap)
        parts = split_parts(method, fo, None)
        eng.backward(cap, fo, parts.total, False,
                     partial(backward_parts, [method.gamma * parts.forget, method.alpha * parts.retain], grads, params))
    update, _ = combine(*grads, param_groups(model, eng.assignment), "global", apply=False, inplace=True)
    for p in params:
        p.grad = update.get(id(p))
    del update, grads
    eng.summarise(eng.measure(cap, s["batch"].segments, eng.direction_from_grads()))
    s["opt"].step()


def step_naive(s):
    from geffect.objectives import functional as fn
    from geffect.unlearn import forward
    model, eng = s["model"], s["engine"]
    params = [p for p in model.parameters()]
    group_of = {}
    for mod_name, g in eng.assignment.items():
        for p in model.get_submodule(mod_name).parameters(recurse=False):
            group_of.setdefault(id(p), g)
    fo = forward(model, s["ref"], s["batch"], s["method"])
    parts = s["method"].parts(fo)
    grads = {}
    for name, loss in (("R_u", fn.nll_loss(*fo.seg("forget"))), ("L", parts.total),
                       ("R_r", fn.nll_loss(*fo.seg("retain")))):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=name != "R_r")
        flat = torch.cat([p.grad.detach().flatten().clone() for p in params]).numpy().copy()  # "to host"
        old = s.setdefault("ema", {}).get(name)
        grads[name] = flat if old is None else 0.6 * old + 0.4 * flat
        s["ema"][name] = grads[name]
    offs, out = 0, {}
    for p in params:
        n = p.numel()
        g = group_of[id(p)]
        for risk in ("R_u", "R_r"):
            out[(g, risk)] = out.get((g, risk), 0.0) + float(grads[risk][offs:offs + n] @ grads["L"][offs:offs + n])
        offs += n
    step_plain(s)


VARIANTS = {"plain": step_plain, "profiled": step_profiled, "conflicts": step_conflicts, "naive": step_naive}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(model_dir: str, variant: str, B: int) -> None:
    """Peak resident memory *during the steps* (sampled every 2 ms), not during model loading."""
    import threading
    s = setup(model_dir, B)
    VARIANTS[variant](s)  # optimizer state exists from here on
    peak, done = [_rss_mb()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)
    t = threading.Thread(target=sample)
    t.start()
    for _ in range(2):
        VARIANTS[variant](s)
    done.set()
    t.join()
    print(json.dumps({"maxrss_mb": peak[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4], help="forget (= retain) batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (after one warm-up)")
    ap.add_argument("--memory-batch", type=int, default=4, help="batch size of the peak-memory comparison")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return
    from geffect.models import load_model
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model("smollm2-135m")
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        del loaded
        print(f"torch threads: {torch.get_num_threads()}")
        for B in a.batches:
            s = setup(tmp, B)
            times = {v: [] for v in VARIANTS}
            for v, f in VARIANTS.items():
                f(s)  # warm-up
            for _ in range(a.repeats):
                for v, f in VARIANTS.items():
                    t0 = time.perf_counter()
                    f(s)
                    times[v].append(time.perf_counter() - t0)
            med = {v: statistics.median(t) for v, t in times.items()}
            tokens = int(s["batch"].attention_mask.sum())
            print(f"batch {B}+{B} ({tokens} tokens): " + ", ".join(f"{v} {m:.2f} s" for v, m in med.items())
                  + "  |  time ratio to plain: "
                  + ", ".join(f"{v} {med[v] / med['plain']:.2f}" for v in VARIANTS if v != "plain"))
            del s
        rss = {}
        for v in VARIANTS:
            r = subprocess.run([sys.executable, __file__, "--child", tmp, v, str(a.memory_batch)],
                               capture_output=True, text=True, check=True)
            rss[v] = json.loads(r.stdout.strip().splitlines()[-1])["maxrss_mb"]
        print(f"peak memory during steps, batch {a.memory_batch}+{a.memory_batch} (RSS): "
              + ", ".join(f"{v} {m:.0f} MB" for v, m in rss.items())
              + "  |  ratio to plain: " + ", ".join(f"{v} {rss[v] / rss['plain']:.2f}" for v in VARIANTS if v != "plain"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
