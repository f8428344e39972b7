"""Spunge (split, unlearn, merge): split the forget set by an attribute, unlearn each part from
the same base, merge the unlearned models with TIES (REFERENCE.md §4; the Spunge paper, §3).

``spunge(cfg, scfg, out)`` writes one folder:

- ``splits/<value>.json`` (each split's forget records) and ``splits/retain.json``;
- ``runs/<value>/``: a normal run directory per split (profiled with ``profile=True``), and
  ``runs/all/``: the method on the whole forget set with the same steps (``compare``);
- ``merged/``: the merged model, a Hugging Face model folder;
- ``spunge.csv``: forget and retain NLL per attribute value for the base, the plain run, Spunge and
  each split's own run; ``spunge.json``: the summary; ``figures/``: the per-attribute bars and,
  when profiled, the G-effect per layer group of each split's run side by side.

Every run starts from the same weights, restored exactly (and verified) between runs.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from geffect.config import Hyper, ProfileConfig, SpungeConfig, UnlearnConfig, validate
from geffect.data.records import QARecord
from geffect.errors import ConfigError, DataError

POOLED = "pooled"


def split_records(records: list[QARecord], field: str, min_split: int = 2,
                  small: str = "error") -> dict[str, list[QARecord]]:
    """Forget records by the value of ``field`` (in order of first appearance). Records without the
    field, a single value, or splits under ``min_split`` (with ``small="error"``) raise DataError."""
    groups: dict[str, list[QARecord]] = {}
    for i, r in enumerate(records):
        if field not in r.attributes:
            where = r.source or f"forget record {i + 1} ({r.question[:40]!r})"
            have = ", ".join(sorted(r.attributes)) or "none"
            raise DataError(f"{where}: no field '{field}' (--split-by {field}); its other fields: {have}")
        groups.setdefault(str(r.attributes[field]), []).append(r)
    small_ones = [v for v, rs in groups.items() if len(rs) < min_split]
    if small_ones and small == "error":
        sizes = ", ".join(f"{v!r}: {len(groups[v])}" for v in small_ones)
        raise DataError(f"--split-by {field}: splits with fewer than --min-split {min_split} records ({sizes}); "
                        "lower --min-split or pass --small-splits pool")
    if small_ones:
        pooled = [r for v in small_ones for r in groups.pop(v)]
        if POOLED in groups:
            raise DataError(f"--split-by {field}: a value is named {POOLED!r}, the name of the pooled split")
        groups[POOLED] = pooled
    if len(groups) < 2:
        raise DataError(f"--split-by {field}: the forget set has one value only ({next(iter(groups))!r}); Spunge "
                        "needs at least two splits")
    return groups


def slug(value: str) -> str:
    """A folder name for an attribute value."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-.") or "value"
    return s if s != "all" else "value-all"


def spunge(cfg: UnlearnConfig, scfg: SpungeConfig, out: str | Path, hyper: Hyper | None = None,
           profile: ProfileConfig | None = None, overwrite: bool = False, loaded=None) -> dict:
    """Split, unlearn each split from the same base, TIES-merge; evaluate per attribute value."""
    from geffect.apps.diagnose import restore, snapshot
    from geffect.data.records import write_records
    from geffect.loop import unlearn
    from geffect.merge import SafetensorsSource, load_into, merged_tensors, write_merged
    from geffect.objectives import parse_method
    from geffect.rundir import RunDir
    from geffect.session import prepare

    validate(scfg)
    validate(cfg)
    parse_method(cfg.method)
    if cfg.lora:
        raise ConfigError("geffect spunge merges whole models: --lora is not supported (each split's run would save "
                          "adapters only; merge their ΔW = (α/r)·B·A with geffect.merge.lora_delta)")
    if out is None:
        raise ConfigError("geffect spunge needs --out (it writes one run folder per split and the merged model)")
    if profile is None and scfg.profile:
        profile = ProfileConfig(pairs_every=0, tokens_every=0)
    run = RunDir(out, overwrite)                   # refuses an unsafe --out before any work
    t0 = time.perf_counter()
    st = prepare(replace(cfg, method="ga"), None, loaded, profile=ProfileConfig())
    model, tok, data = st.model, st.tokenizer, st.data
    splits = split_records(data.forget, scfg.split_by, scfg.min_split, scfg.small_splits)
    retain_by = _retain_groups(data.retain, scfg.split_by)
    with run:
        stage = run.path
        (stage / "splits").mkdir()
        (stage / "runs").mkdir()
        files = {v: write_records(rs, stage / "splits" / f"{slug(v)}.json") for v, rs in splits.items()}
        retain_file = write_records(data.retain, stage / "splits" / "retain.json")
        model.eval()
        base_state = snapshot(model)
        table = _table("base", model, tok, cfg, splits, retain_by)
        # views of the model's own tensors (tied weights once): they hold the base again after the
        # restore that precedes the merge, so no second copy of the base is kept
        base_view = dict(model.state_dict())
        common = replace(cfg, retain=str(retain_file), tofu=None, memorize="no", save_model=True)
        runs = {}
        jobs = [(v, files[v]) for v in splits] + ([("all", None)] if scfg.compare else [])
        for value, path in jobs:
            restore(model, base_state)
            name = "all" if path is None else slug(value)
            rcfg = replace(common, forget=str(path) if path else None, save_model=path is not None)
            if path is None:                  # the plain baseline: the whole forget set
                rcfg = replace(rcfg, forget=str(write_records(data.forget, stage / "splits" / "all.json")))
            label = "plain" if path is None else f"split {value}"
            print(f"geffect spunge: {label}: {cfg.method}, {cfg.steps} steps on "
                  f"{len(data.forget) if path is None else len(splits[value])} forget records", file=sys.stderr)
            summary = unlearn(rcfg, str(stage / "runs" / name), hyper, loaded=st.loaded, profile=profile)
            runs[value] = {"dir": f"runs/{name}", "records": len(data.forget) if path is None else len(splits[value]),
                           "before": summary["before"], "after": summary["after"],
                           "seconds": summary["seconds_unlearning"]}
            table += _table("plain" if path is None else f"split:{value}", model, tok, cfg, splits, retain_by)
        restore(model, base_state)
        tm = time.perf_counter()
        models = [SafetensorsSource(stage / "runs" / slug(v) / "model") for v in splits]
        write_merged(merged_tensors(base_view, models, scfg.merge, scfg.density, scfg.lam, scfg.trim),
                     stage / "merged", like=stage / "runs" / slug(next(iter(splits))) / "model")
        seconds_merge = time.perf_counter() - tm
        merged = SafetensorsSource(stage / "merged")
        load_into(model, {n: merged.get(n) for n in merged.names()})
        table += _table("spunge", model, tok, cfg, splits, retain_by)
        restore(model, base_state)
        result = {"method": cfg.method, "model": cfg.model, "split_by": scfg.split_by,
                  "splits": {v: len(rs) for v, rs in splits.items()}, "runs": runs,
                  "merge": {"method": scfg.merge, "density": scfg.density, "lambda": scfg.lam, "trim": scfg.trim,
                            "seconds": seconds_merge},
                  "table": table, "config": {"run": asdict(cfg), "spunge": asdict(scfg)},
                  "seconds": time.perf_counter() - t0, "device": str(next(model.parameters()).device)}
        _write(run, result, profiled=profile is not None)
        result["out"] = str(run.commit())
    return result


def _retain_groups(retain: list[QARecord], field: str) -> dict[str, list[QARecord]]:
    """The retain set by the same field when every retain record has it, else one group 'all'."""
    if retain and all(field in r.attributes for r in retain):
        groups: dict[str, list[QARecord]] = {}
        for r in retain:
            groups.setdefault(str(r.attributes[field]), []).append(r)
        return groups
    return {"all": retain}


def _table(model_name: str, model, tok, cfg: UnlearnConfig, splits: dict, retain_by: dict) -> list[dict]:
    """Per attribute value, forget and retain, of the model's current weights: the mean answer NLL
    (the risk R) and TOFU's probability, the mean of p(answer | question)^(1/|answer|) = exp(−NLL_i)."""
    from geffect.eval.nll import row_nll
    model.eval()
    rows = []
    for split, groups in (("forget", splits), ("retain", retain_by)):
        for value, recs in groups.items():
            nll = row_nll(model, tok, recs, cfg.max_length, fmt=cfg.prompt_format)     # (n,)
            rows.append({"model": model_name, "split": split, "value": value, "records": len(recs),
                         "nll": nll.mean().item(), "probability": nll.neg().exp().mean().item()})
    return rows


def _write(run, result: dict, profiled: bool) -> None:
    import pandas as pd

    from geffect.plots.figures import spunge_attributes
    run.write_json("spunge.json", result)
    table = pd.DataFrame(result["table"])
    table.to_csv(run.path / "spunge.csv", index=False)
    figs = run.path / "figures"
    figs.mkdir()
    spunge_attributes(table, result).savefig(figs / "spunge_attributes.png", dpi=90)
    if profiled:
        from geffect.plots.figures import compare_groups
        from geffect.plots.records import load_run
        runs = [load_run(run.path / r["dir"]) for r in result["runs"].values()]
        fig = compare_groups(runs)
        if fig is not None:
            fig.suptitle(f"Spunge: cumulative G-effect per layer group of each split's {result['method']} run "
                         f"(split by {result['split_by']})")
            fig.savefig(figs / "spunge_groups.png", dpi=90)
