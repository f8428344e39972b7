"""The ``geffect`` command line: ``geffect <verb> --help`` explains every option.

Options come from the typed config dataclasses of :mod:`geffect.config` (one source for defaults,
help, validation and the saved config). Heavy imports happen inside the verbs, so ``--help``
loads no torch. Every user error is one line ``geffect: error: …`` and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from geffect.config import DiagnoseConfig, Hyper, ProfileConfig, SpungeConfig, UnlearnConfig
from geffect.errors import DivergenceError, GeffectError


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same one-line form as every other error."""

    def error(self, message: str):
        self.exit(2, f"geffect: error: {message} (see {self.prog} --help)\n")


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        typ = hints[f.name]
        base = [a for a in typing.get_args(typ) if a is not type(None)]
        typ = base[0] if base else typ
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{helptext} (default: {f.default})")
        else:
            parser.add_argument(flag, dest=f.name, type=typ, default=f.default,
                                help=f"{helptext} (default: {f.default})")


def _add_run_fields(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """A subset of the UnlearnConfig options (for verbs that do not run a whole job)."""
    by_name = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    for name in names:
        f = by_name[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=type(f.default) if f.default is not None
                            else str, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="geffect", description="G-effect profiler for LLM unlearning.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs = {
        "unlearn": ("run an unlearning job and write a run directory",
                    ("Unlearn the forget set from a model; write config.json, records.csv, summary.json and "
                     "the final model into --out.")),
        "profile": ("unlearn with the G-effect engine on (geffect.csv, instances.csv)",
                    ("geffect unlearn plus per-step G-effects per layer group and per instance, from the "
                     "training step's own forward and backward pass.")),
    }
    for verb, (short, long) in verbs.items():
        v = sub.add_parser(verb, help=short, description=long)
        _add_dataclass_args(v, UnlearnConfig)
        _add_dataclass_args(v.add_argument_group("objective hyperparameters"), Hyper)
        if verb == "profile":
            _add_dataclass_args(v.add_argument_group("G-effect engine"), ProfileConfig)
        if verb == "profile":
            v.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                           help="draw the figures (RUN/figures) and RUN/report.html when done (default: on)")
        v.add_argument("--out", default=None, help="run directory to create (must not exist or be empty; profile "
                                                    "without --out writes runs/profile-<time>)")
        v.add_argument("--overwrite", action="store_true",
                       help="replace an existing run folder --out (only one geffect wrote) or its interrupted OUT.partial")
        v.add_argument("--json", action="store_true", help="print the summary as JSON")

    pl = sub.add_parser("plot", help="draw figures and report.html from run directories (records only)",
                        description="Read the records of one or more run directories (never a model) and write "
                                    "PNG figures into each run's figures/ and its report.html; with several runs, "
                                    "also the comparison figures (one colour per method) into --out.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by geffect profile")
    pl.add_argument("--out", default=None,
                    help="folder for the figures (one run) or the comparison figures (several runs; default: "
                         "comparison/ beside the first run)")
    pl.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                    help="also write report.html into each run directory (default: on)")

    d = sub.add_parser("diagnose", help="compare objectives on your data from a few profiled steps each",
                       description="Run each candidate objective for --steps profiled steps from the same weights "
                                   "(restored exactly between candidates), measure its G-effects along its own "
                                   "optimizer update (a scale-free basis), rank the candidates by Pareto front over "
                                   "removal and retention, and write diagnosis.json, diagnosis.csv and "
                                   "diagnosis.png into --out.")
    _add_run_fields(d, ("model", "forget", "retain", "tofu", "tofu_split", "memorize", "max_length", "seed", "device",
                        "dtype", "prompt_format"))
    d.add_argument("--methods", nargs="+", default=None,
                   help=DiagnoseConfig.__dataclass_fields__["methods"].metadata["help"])
    _add_dataclass_args(d, DiagnoseConfig, skip=("methods",))
    d.add_argument("--out", default=None, help="directory to create for the diagnosis (must not exist or be empty)")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    d.add_argument("--json", action="store_true", help="print diagnosis.json's content")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress per candidate (default: on)")

    r = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint",
                       description="Continue the run whose staging folder OUT.partial was left by Ctrl-C, SIGTERM or "
                                   "a crash, from its last checkpoint (written every --checkpoint-every steps and when "
                                   "stopped): the same options, records from the checkpoint's step on, and then the "
                                   "folder moved into place as OUT.")
    r.add_argument("run", metavar="OUT.partial", help="the interrupted run's staging folder")
    r.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the figures and report.html of a profiled run when done (default: on)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")

    m = sub.add_parser("measure", help="one step's G-effects at the given weights (no update)",
                       description="G-effects of one step of --method with the whole forget and retain sets "
                                   "as one batch each; the model is not updated.")
    _add_run_fields(m, ("method", "model", "forget", "retain", "tofu", "tofu_split", "memorize", "max_length", "seed",
                        "device", "dtype", "prompt_format"))
    m.add_argument("--batch-size", type=int, default=16,
                   help="rows per forward (memory stays bounded; the value is the exact mean over each split) "
                        "(default: 16)")
    m.add_argument("--probe-size", type=int, default=0,
                   help="measure on a seeded sample of at most this many records of each split (0: all) (default: 0)")
    _add_dataclass_args(m.add_argument_group("objective hyperparameters"), Hyper)
    _add_dataclass_args(m.add_argument_group("G-effect engine"), ProfileConfig,
                        skip=("probe_every", "probe_retain", "probe_size", "probe_batch", "probe_forget"))
    m.add_argument("--json", action="store_true", help="print JSON: unlearn, retain, per_instance")
    _add_eval_parser(sub)
    _add_merge_parsers(sub)
    return p


def _add_merge_parsers(sub) -> None:
    lam_help = SpungeConfig.__dataclass_fields__["lam"].metadata["help"]
    g = sub.add_parser("merge", help="merge models fine-tuned from one base (TIES or task arithmetic)",
                       description="θ = θ_base + λ·merge(θ_i − θ_base): TIES (trim each task vector to its --density "
                                   "share of largest entries, elect each coordinate's sign by mass, average the "
                                   "agreeing entries) or task arithmetic (the sum). Streams tensor by tensor from "
                                   "safetensors; writes a Hugging Face model folder.")
    g.add_argument("base", metavar="BASE", help="the base model: a safetensors model folder (streamed), or any "
                                                "--model geffect loads (built-in name, .gguf, hub id)")
    g.add_argument("models", nargs="+", metavar="MODEL", help="safetensors model folders fine-tuned from BASE")
    for name in ("merge", "density", "trim"):
        f = SpungeConfig.__dataclass_fields__[name]
        g.add_argument("--method" if name == "merge" else "--" + name, dest=name, type=type(f.default),
                       default=f.default, choices=f.metadata.get("choices"),
                       help=f"{'how the models are merged' if name == 'merge' else f.metadata['help']} "
                            f"(default: {f.default})")
    g.add_argument("--lambda", dest="lam", type=float, default=1.0, help=f"{lam_help} (default: 1.0)")
    g.add_argument("--out", required=True, help="model folder to create (must not exist or be empty)")
    g.add_argument("--overwrite", action="store_true", help="replace an --out folder geffect wrote")

    s = sub.add_parser("spunge", help="split the forget set by an attribute, unlearn each split, merge with TIES",
                       description="Spunge (split, unlearn, merge): one unlearning run of --method per value of "
                                   "--split-by, each from the same base model, then a TIES merge of the runs' "
                                   "models; with --compare the method on the whole forget set too. Writes the runs, "
                                   "the merged model, spunge.csv (forget and retain NLL per attribute value for "
                                   "base, plain and Spunge) and figures into --out.")
    _add_dataclass_args(s, UnlearnConfig)
    _add_dataclass_args(s.add_argument_group("objective hyperparameters"), Hyper)
    _add_dataclass_args(s.add_argument_group("Spunge"), SpungeConfig, skip=("lam",))
    s.add_argument("--lambda", dest="lam", type=float, default=1.0, help=f"{lam_help} (default: 1.0)")
    s.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    s.add_argument("--overwrite", action="store_true", help="replace an --out folder geffect wrote")
    s.add_argument("--json", action="store_true", help="print spunge.json's content")


def _add_eval_parser(sub) -> None:
    from geffect.eval.suite import METRICS
    e = sub.add_parser("eval", help="outcome metrics (TOFU, membership inference, toxicity, perplexity) into eval.json",
                       description="Evaluate a model, or a finished run's model, by the metrics unlearning is judged "
                                   "by: TOFU's probability, ROUGE-L recall, truth ratio, model utility and (with "
                                   "--reference) forget quality; membership inference (forget set = members, holdout "
                                   "= non-members); toxicity of greedy answers; perplexity. Prints a table and writes "
                                   "eval.json. With --tofu-logs, reads TOFU's published evaluation logs instead of a "
                                   "model.")
    e.add_argument("target", nargs="?", metavar="MODEL_OR_RUN_DIR",
                   help="a run directory (its saved model, data and prompt format) or a model as --model takes it "
                        "(memorised on the bundled data as a run would start from it)")
    by_name = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    for name in ("forget", "retain", "tofu", "tofu_split", "memorize", "max_length", "seed", "device", "dtype",
                 "prompt_format"):
        f = by_name[name]
        e.add_argument("--" + name.replace("_", "-"), dest=name, type=int if name in ("max_length", "seed") else str,
                       default=None, help=f"{f.metadata['help']} (default: the run's, else {f.default})")
    e.add_argument("--holdout", default=None,
                   help="non-member records for membership inference (default: the bundled holdout authors with "
                        "the bundled data, TOFU's holdout split with --tofu)")
    e.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS, metavar="METRIC",
                   help=f"which metrics: {', '.join(METRICS)} (default: all)")
    e.add_argument("--reference", default=None,
                   help="for forget quality: a model never trained on the forget set (a name, folder or run "
                        "directory; with the bundled data a model name is memorised on the retain split only), or its "
                        "results (a geffect eval.json, a TOFU log folder or eval_log_aggregated.json, an "
                        "open-unlearning TOFU_EVAL.json)")
    e.add_argument("--toxic-prompts", default=None,
                   help="prompts whose greedy continuations are classified (a text file, one per line, or JSON/JSONL "
                        "with 'prompt', 'text' or 'question'); without it toxicity is measured on the answers to the "
                        "forget questions only")
    e.add_argument("--toxicity-model", default=None,
                   help="a Hugging Face sequence classifier (name or folder; e.g. tomh/toxigen_roberta) instead of "
                        "the offline default, alt-profanity-check's classifier (default: profanity-check)")
    e.add_argument("--perplexity-text", default="pydoc",
                   help="corpus for perplexity: a UTF-8 text file, a data file (its answers) or 'pydoc' (the Python "
                        "language reference's prose shipped with Python, offline) (default: pydoc)")
    e.add_argument("--batch-size", type=int, default=16, help="rows per forward and per generation batch (default: 16)")
    e.add_argument("--max-new-tokens", type=int, default=64,
                   help="greedy generation stops at end-of-sequence or after this many tokens (default: 64)")
    e.add_argument("--min-k", type=float, default=0.4, help="k of the Min-K%% and Min-K%%++ attacks (default: 0.4)")
    e.add_argument("--out", default=None,
                   help="eval.json to write (default: RUN_DIR/eval.json for a run directory, runs/eval-<time>.json "
                        "for a model); an existing file is replaced only with --overwrite")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.add_argument("--tofu-logs", default=None,
                   help="read TOFU evaluation logs instead of evaluating a model: a folder with eval_log.json, "
                        "eval_log_forget.json, eval_real_author_wo_options.json and eval_real_world_wo_options.json, "
                        "or an eval_log_aggregated.json, or open-unlearning's TOFU_EVAL.json")
    e.add_argument("--reference-logs", default=None,
                   help="with --tofu-logs: the retain model's logs, for forget quality")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="say what is being measured (default: on)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _split(ns: argparse.Namespace, cls) -> object:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def cmd_unlearn(ns: argparse.Namespace) -> int:
    from geffect.loop import unlearn

    cfg, hyper = _split(ns, UnlearnConfig), _split(ns, Hyper)
    profile = _split(ns, ProfileConfig) if ns.verb == "profile" else None
    out = ns.out
    if out is None and profile is not None:
        from geffect.rundir import default_out
        out = default_out("profile")
        print(f"geffect: no --out given; writing {out}", file=sys.stderr)
    try:
        summary = unlearn(cfg, out, hyper, overwrite=ns.overwrite, profile=profile)
    except DivergenceError as err:      # the records up to the divergence are kept: draw them too
        if profile is not None and ns.report and getattr(err, "run_dir", None):
            from geffect.plots import plot_run, write_report
            print(f"  report of the stopped run: {write_report(err.run_dir, plot_run(err.run_dir))}")
        raise
    return _report(ns, summary, profile is not None)


def cmd_resume(ns: argparse.Namespace) -> int:
    from geffect.loop import resume
    summary = resume(ns.run)
    return _report(ns, summary, "groups" in summary)


def _report(ns: argparse.Namespace, summary: dict, profiled: bool) -> int:
    """Figures and report.html of a profiled run, then the summary printed (by rank 0 alone under torchrun)."""
    import os
    if os.environ.get("RANK", "0") != "0":
        return 0
    if profiled and getattr(ns, "report", True) and "run_dir" in summary:
        from geffect.plots import plot_run, write_report
        summary["report"] = str(write_report(summary["run_dir"], plot_run(summary["run_dir"])))
    summary_rows = summary.get("geffect", [])
    for k in ("records", "geffect", "instances", "conflicts", "pairs", "tokens"):
        summary.pop(k, None)
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        b, a = summary["before"], summary["after"]
        print(f"method {summary['method']}: {summary['steps']} steps, "
              f"{summary['seconds_per_step']:.2f} s/step")
        print(f"  forget NLL  {b['nll_forget']:.3f} -> {a['nll_forget']:.3f}   "
              f"(perturbed answers {b['nll_forget_perturbed']:.3f} -> {a['nll_forget_perturbed']:.3f})")
        print(f"  retain NLL  {b['nll_retain']:.3f} -> {a['nll_retain']:.3f}")
        if "conflict_fraction" in summary:
            print(f"  forget and retain gradients conflicted (cosine < 0) in "
                  f"{100 * summary['conflict_fraction']:.0f}% of steps")
        if profiled:
            import pandas as pd
            print(_effect_table(pd.DataFrame(_last_effects(summary_rows))))
        if "run_dir" in summary:
            print(f"  run directory: {summary['run_dir']}")
        if "report" in summary:
            print(f"  report: {summary['report']}")
    return 0


def _last_effects(rows: list[dict]) -> list[dict]:
    """Cumulative in-batch G-effects over the run, per risk and group."""
    return [r for r in rows if r["source"] == "batch"]


def _effect_table(df) -> str:
    if df.empty:
        return ""
    # a NaN step makes the sum NaN (it is never counted as 0)
    cum = df.pivot_table(index="group", columns="risk", values="value", aggfunc=lambda v: v.sum(skipna=False),
                         sort=False, dropna=False)
    lines = ["  cumulative G-effect over the run (e_u < 0 removes, e_r >= 0 retains):",
             f"    {'group':<8} {'e_u':>12} {'e_r':>12}"]
    for g, row in cum.iterrows():
        lines.append(f"    {g:<8} {row.get('unlearn', float('nan')):>12.4g} {row.get('retain', float('nan')):>12.4g}")
    return "\n".join(lines)


def cmd_plot(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from geffect.plots import plot_comparison, plot_run, write_report
    for i, d in enumerate(ns.runs, 1):
        out = ns.out if ns.out and len(ns.runs) == 1 else None
        figs = plot_run(d, out)
        print(f"[{i}/{len(ns.runs)}] {d}: {len(figs)} figures in {figs[0].parent if figs else '-'}")
        if ns.report:
            print(f"    report: {write_report(d, figs)}")
    if len(ns.runs) > 1:
        out = ns.out or Path(ns.runs[0]).resolve().parent / "comparison"
        figs = plot_comparison(ns.runs, out)
        print(f"comparison: {len(figs)} figures in {out}")
    return 0


def cmd_diagnose(ns: argparse.Namespace) -> int:
    from geffect.apps.diagnose import diagnose
    base = UnlearnConfig(**{k: getattr(ns, k) for k in ("model", "forget", "retain", "tofu", "tofu_split", "memorize",
                                                        "max_length", "seed", "device", "dtype", "prompt_format")})
    res = diagnose(base, _split(ns, DiagnoseConfig), ns.out, overwrite=ns.overwrite, progress=ns.progress)
    if ns.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"basis: {res['basis']}")
    outcome = any("eval" in r for r in res["candidates"])
    print(f"  {'rank':>4} {'method':<22} {'front':>5} {'ΔR_u pred':>10} {'ΔR_r pred':>10} {'ΔNLL_f':>8} "
          f"{'ΔNLL_r':>8} {'conflict':>8}" + (f" {'p_forget':>8} {'utility':>8}" if outcome else ""))
    for r in res["candidates"]:
        conf = f"{100 * r['conflict_fraction']:.0f}%" if r["conflict_fraction"] is not None else "-"
        ev = r.get("eval", {})
        tail = (f" {ev.get('probability_forget', float('nan')):>8.3f} {ev.get('model_utility', float('nan')):>8.3f}"
                if outcome else "")
        print(f"  {r['rank']:>4} {r['method']:<22} {r['front']:>5} {r['predicted_forget_risk_change']:>+10.3g} "
              f"{r['predicted_retain_risk_change']:>+10.3g} {r['nll_forget_change']:>+8.3g} "
              f"{r['nll_retain_change']:>+8.3g} {conf:>8}{tail}")
    if outcome:
        print(f"  p_forget, utility: TOFU's forget probability and model utility after the steps "
              f"(before: {res['before']['tofu']['probability_forget']:.3f}, "
              f"{res['before']['tofu']['model_utility']:.3f})")
    print(res["recommendation"])
    print(f"{len(res['candidates'])} candidates in {res['seconds']:.0f} s"
          + (f"; written to {res['out']}" if "out" in res else ""))
    return 0


def cmd_measure(ns: argparse.Namespace) -> int:
    from geffect.apps.measure import measure

    hyper = _split(ns, Hyper)
    prof = ProfileConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ProfileConfig)
                            if hasattr(ns, f.name)})
    res = measure(ns.method, ns.model, ns.forget, ns.retain, ns.memorize, hyper, prof, ns.max_length, ns.seed,
                  device=ns.device, dtype=ns.dtype, prompt_format=ns.prompt_format, batch_size=ns.batch_size,
                  probe_size=ns.probe_size, tofu=ns.tofu, tofu_split=ns.tofu_split)
    if ns.json:
        print(json.dumps({k: res[k] for k in ("unlearn", "retain", "per_instance")}, indent=2))
    else:
        print(f"G-effects of one {res['method']} step (e_u < 0 removes, e_r >= 0 retains):")
        print(f"  {'group':<8} {'e_u':>12} {'e_r':>12}")
        for g in res["groups"] + ["total"]:
            print(f"  {g:<8} {res['unlearn'][g]:>12.4g} {res['retain'][g]:>12.4g}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from geffect.errors import ConfigError
    if ns.tofu_logs is not None:
        if ns.target is not None:
            raise ConfigError("--tofu-logs reads logs instead of evaluating MODEL_OR_RUN_DIR: give one or the other")
        from geffect.apps.evaluate import eval_logs
        res = eval_logs(ns.tofu_logs, ns.reference_logs)
        print(json.dumps(res, indent=2) if ns.json else _metric_table(res))
        return 0
    if ns.reference_logs is not None:
        raise ConfigError("--reference-logs goes with --tofu-logs; with a model give --reference")
    if ns.target is None:
        raise ConfigError("give MODEL_OR_RUN_DIR to evaluate, or --tofu-logs DIR")
    if ns.batch_size < 1 or ns.max_new_tokens < 1 or not 0 < ns.min_k <= 1:
        raise ConfigError("--batch-size and --max-new-tokens must be ≥ 1 and --min-k in (0, 1]")
    from pathlib import Path

    from geffect.apps.evaluate import eval_target, is_run_dir, write_eval
    from geffect.eval.suite import EvalOptions
    out = Path(ns.out) if ns.out else (Path(ns.target) / "eval.json" if is_run_dir(ns.target) else None)
    if out is not None and out.exists() and not ns.overwrite:       # refuse before the work, not after
        raise GeffectError(f"{out} exists: pass --overwrite to replace it, or --out another file")
    overrides = {k: getattr(ns, k) for k in ("forget", "retain", "tofu", "tofu_split", "memorize", "max_length",
                                             "seed", "device", "dtype", "prompt_format")}
    opts = EvalOptions(metrics=tuple(ns.metrics), batch_size=ns.batch_size, max_new_tokens=ns.max_new_tokens,
                       min_k=ns.min_k, toxicity_model=ns.toxicity_model)
    res = eval_target(ns.target, overrides, opts, ns.holdout, ns.toxic_prompts, ns.perplexity_text, ns.reference,
                      ns.progress)
    if out is None:
        from geffect.rundir import default_out
        out = default_out("eval").with_suffix(".json")
    res["eval_json"] = str(write_eval(res, out, ns.overwrite))
    if ns.json:
        print(json.dumps(res["metrics"], indent=2))
    else:
        print(_metric_table(res["metrics"]))
        for m, why in res["skipped"].items():
            print(f"  {m} skipped: {why}")
        print(f"  {res['seconds']['total']:.0f} s; written to {out}")
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from geffect.config import validate
    from geffect.merge import SafetensorsSource, as_source, merged_tensors, write_merged
    from geffect.rundir import RunDir
    validate(SpungeConfig(merge=ns.merge, density=ns.density, lam=ns.lam, trim=ns.trim))
    run = RunDir(ns.out, ns.overwrite)             # refuses an unsafe --out before any work
    models = [SafetensorsSource(m) for m in ns.models]
    if Path(ns.base).is_dir() and any(Path(ns.base).glob("*.safetensors")):
        base = SafetensorsSource(ns.base)
    else:
        from geffect.models import load_model
        base = as_source(load_model(ns.base).model, ns.base)
    with run:
        write_merged(merged_tensors(base, models, ns.merge, ns.density, ns.lam, ns.trim), run.path,
                     like=Path(ns.models[0]))
        out = run.commit()
    print(f"merged {len(models)} models onto {ns.base} ({ns.merge}"
          + (f", density {ns.density:g}, trim per {ns.trim}" if ns.merge == "ties" else "")
          + f", λ {ns.lam:g}); written to {out}")
    return 0


def cmd_spunge(ns: argparse.Namespace) -> int:
    from geffect.apps.spunge import spunge
    res = spunge(_split(ns, UnlearnConfig), _split(ns, SpungeConfig), ns.out, _split(ns, Hyper),
                 overwrite=ns.overwrite)
    if ns.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    import pandas as pd
    t = pd.DataFrame(res["table"])
    t = t[t["model"].isin(["base", "plain", "spunge"])].pivot_table(index=["split", "value"], columns="model",
                                                                      values="nll", sort=False)
    print(f"mean answer NLL per {res['split_by']} (forget: higher is more forgotten; retain: lower is better)")
    print(t.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"{len(res['splits'])} splits in {res['seconds']:.0f} s; written to {res['out']}")
    return 0


def _metric_table(metrics: dict) -> str:
    lines = [f"  {'metric':<28} {'value':>12}"]
    for k, v in metrics.items():
        lines.append(f"  {k:<28} {v:>12.4g}" if isinstance(v, float) else f"  {k:<28} {v!s:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    verbs = {"unlearn": cmd_unlearn, "profile": cmd_unlearn, "measure": cmd_measure, "plot": cmd_plot,
             "diagnose": cmd_diagnose, "resume": cmd_resume, "eval": cmd_eval,
             "merge": cmd_merge, "spunge": cmd_spunge}
    import torch.distributed as dist
    owns_group = dist.is_available() and not dist.is_initialized()   # a torchrun run's group is made below
    finished = False
    try:
        code = verbs[ns.verb](ns)
        finished = True
        return code
    except GeffectError as err:
        import os
        if os.environ.get("RANK", "0") == "0":     # under torchrun every rank meets the same bad input: say it once
            print(f"geffect: error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if owns_group:        # joined before exit, not left to the interpreter; a caller's own group is left alone
            from geffect.distributed import shutdown
            shutdown(barrier=finished)


if __name__ == "__main__":
    sys.exit(main())
