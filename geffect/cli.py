"""The ``geffect`` command line: ``geffect <verb> --help`` explains every option.

Options come from the typed config dataclasses (one source for defaults, help and the saved
config). Heavy imports happen inside the verbs so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing


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


def _build_parser() -> argparse.ArgumentParser:
    from geffect.objectives.methods import Hyper
    from geffect.unlearn import UnlearnConfig

    p = argparse.ArgumentParser(prog="geffect", description="G-effect profiler for LLM unlearning.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    u = sub.add_parser("unlearn", help="run an unlearning job and write a run directory",
                       description="Unlearn the forget set from a model; write config.json, records.csv, "
                                   "summary.json and the final model into --out.")
    _add_dataclass_args(u, UnlearnConfig)
    _add_dataclass_args(u.add_argument_group("objective hyperparameters"), Hyper)
    u.add_argument("--out", default=None, help="run directory to create (must not exist or be empty)")
    u.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    u.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _split(ns: argparse.Namespace, cls) -> object:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def cmd_unlearn(ns: argparse.Namespace) -> int:
    from geffect.objectives.methods import Hyper
    from geffect.unlearn import UnlearnConfig, unlearn

    cfg, hyper = _split(ns, UnlearnConfig), _split(ns, Hyper)
    summary = unlearn(cfg, ns.out, hyper, overwrite=ns.overwrite)
    summary.pop("records")
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        b, a = summary["before"], summary["after"]
        print(f"method {summary['method']}: {summary['steps']} steps, "
              f"{summary['seconds_per_step']:.2f} s/step")
        print(f"  forget NLL  {b['nll_forget']:.3f} -> {a['nll_forget']:.3f}   "
              f"(perturbed answers {b['nll_forget_perturbed']:.3f} -> {a['nll_forget_perturbed']:.3f})")
        print(f"  retain NLL  {b['nll_retain']:.3f} -> {a['nll_retain']:.3f}")
        if "run_dir" in summary:
            print(f"  run directory: {summary['run_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    from geffect.data.records import DataError
    from geffect.models import ModelLoadError
    from geffect.objectives.methods import MethodError
    from geffect.rundir import RunDirError
    try:
        return {"unlearn": cmd_unlearn}[ns.verb](ns)
    except (DataError, MethodError, ModelLoadError, RunDirError) as err:
        print(f"geffect: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
