"""The detox study's table (Zheng & Wang, "Detoxification via Gradient Surgery", papers/): base,
GradDiff, GradDiff+PCGrad, IdkDPO and IdkDPO+PCGrad, with toxicity, word perplexity, member NLL,
non-member NLL and the LOSS attack's ROC-AUC.

Every method starts from the same weights (restored exactly between methods) and runs the same
steps on the same data; then :func:`geffect.eval.suite.evaluate` measures it. Data:

- ``--toxic FILE``: toxic data as question-answer records (the prompt as ``question``, the toxic
  continuation as ``answer``; e.g. ToxiGen or RealToxicityPrompts converted, which the user
  supplies: none ships in a package on the registries). It is the forget set (members); toxicity
  is the share of toxic greedy continuations of its prompts. ``--retain`` and ``--holdout`` give
  the retain set and the non-members (required with ``--toxic``).
- without it, the bundled fictitious authors (forget = members, holdout authors = non-members)
  and no toxicity column: there is nothing toxic to unlearn in them.

Word perplexity is measured on ``--perplexity-text`` (default ``pydoc``: the Python language
reference's prose, offline; the poster uses WikiText). Writes detox_table.md, .csv and .json into
``--out``.

    python analysis/detox_table.py                                     # bundled data, ~6 min here
    python analysis/detox_table.py --toxic toxigen.jsonl --retain clean.jsonl --holdout held.jsonl \\
        --model gpt2-finetuned/ --prompt-format raw
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from geffect.config import UnlearnConfig
from geffect.eval.suite import EvalOptions, EvalSets, evaluate

METHODS = {"Base Model": None, "GradDiff": "ga+gd", "GradDiff+PCGrad": "ga+gd+pcgrad",
           "IdkDPO": "idkdpo+gd", "IdkDPO+PCGrad": "idkdpo+gd+pcgrad"}
COLUMNS = {"toxicity": "Toxicity ↓", "perplexity_word": "Word PPL ↓", "member_nll": "Member NLL ↑",
           "nonmember_nll": "Non-member NLL ↓", "auc_loss": "ROC-AUC (LOSS)"}


def markdown(df: pd.DataFrame) -> str:
    """A GitHub table of a frame, numbers to 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model to unlearn (default: the embedded default)")
    ap.add_argument("--toxic", default=None, help="toxic records (forget set); see the module docstring")
    ap.add_argument("--retain", default=None, help="retain records (with --toxic)")
    ap.add_argument("--holdout", default=None, help="non-member records (with --toxic)")
    ap.add_argument("--prompt-format", default="chat", help="prompt format (raw for GPT-2-style continuation)")
    ap.add_argument("--steps", type=int, default=20, help="unlearning steps per method (default: 20)")
    ap.add_argument("--lr", type=float, default=2e-5, help="learning rate (default: 2e-5, geffect's default)")
    ap.add_argument("--perplexity-text", default="pydoc", help="word-perplexity corpus (default: pydoc)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="continuation length for toxicity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/detox_table", help="folder for detox_table.md/.csv/.json")
    args = ap.parse_args(argv)
    if args.toxic and not (args.retain and args.holdout):
        ap.error("--toxic needs --retain and --holdout (the non-members of the membership inference attack)")

    from geffect.apps.diagnose import _snapshot, restore
    from geffect.data.records import load_records
    from geffect.data.sampling import load_data
    from geffect.eval.perplexity import load_text
    from geffect.hardware import resolve_device
    from geffect.loop import unlearn
    from geffect.session import starting_model

    cfg = UnlearnConfig(model=args.model, forget=args.toxic, retain=args.retain, steps=args.steps, lr=args.lr,
                        prompt_format=args.prompt_format, seed=args.seed, progress=True, save_model=False)
    data = load_data(cfg.forget, cfg.retain, cfg.seed)
    holdout = load_records(args.holdout) if args.holdout else data.holdout
    loaded = starting_model(cfg, data, resolve_device(cfg.device))
    snap = _snapshot(loaded.model)
    metrics = ("mia", "perplexity") + (("toxicity",) if args.toxic else ())
    sets = EvalSets(data.forget, data.retain, holdout, [r.question for r in data.forget] if args.toxic else [],
                    load_text(args.perplexity_text))
    opts = EvalOptions(metrics=metrics, fmt=args.prompt_format, max_length=cfg.max_length,
                       max_new_tokens=args.max_new_tokens)
    rows, t0 = [], time.perf_counter()
    for name, method in METHODS.items():
        restore(loaded.model, snap)
        tm = time.perf_counter()
        if method is not None:          # trains loaded.model in place (already memorised: no second time)
            unlearn(replace(cfg, method=method, memorize="no"), loaded=loaded)
        res = evaluate(loaded.model, loaded.tokenizer, sets, opts)
        rows.append({"method": name, "objective": method or "-", **res["metrics"],
                     "seconds": time.perf_counter() - tm})
        print(f"{name}: " + ", ".join(f"{COLUMNS[k]} {res['metrics'][k]:.4g}" for k in COLUMNS if k in res["metrics"]),
              flush=True)
    restore(loaded.model, snap)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "detox_table.csv", index=False)
    shown = ["method"] + [k for k in COLUMNS if k in df.columns]
    table = markdown(df[shown].rename(columns=COLUMNS))
    data_note = (f"forget (members) {args.toxic}, retain {args.retain}, non-members {args.holdout}" if args.toxic else
                 f"bundled fictitious authors: forget {len(data.forget)} (members), retain {len(data.retain)}, "
                 f"holdout {len(holdout)} (non-members); no toxicity column (nothing toxic to unlearn)")
    (out / "detox_table.md").write_text(
        f"{table}\n\nModel {args.model}, {args.steps} steps per method at lr {args.lr:g}; data: {data_note}; word "
        f"perplexity on {args.perplexity_text}. ROC-AUC: members (forget) negative, non-members positive; 0.5 = "
        f"forget set indistinguishable from unseen data.\n", encoding="utf-8")
    (out / "detox_table.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
    print(table)
    print(f"{time.perf_counter() - t0:.0f} s; written to {out}/detox_table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
