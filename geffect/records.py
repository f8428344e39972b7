"""Every record table of a run directory: its columns, what a row means, how rows are built and written.

Computation writes records; plotting reads them (``geffect/plots/records.py`` reads through these
same definitions). Rows are appended to the run's staging folder and flushed each step, so the
folder holds a valid prefix of every table at any moment. Torch-free: builders take tensors but
only call ``.tolist()`` on them.

Tables (one CSV each; ``{g}`` columns repeat per layer group, e.g. ``value_shallow``):

- ``records.csv``: one row per optimizer step: losses, batch NLLs, learning rate, weight summary, the
  step's seconds (``time_s``) and their split by phase (``t_forward``, ``t_backward``, ``t_effects``,
  ``t_conflicts``, ``t_pairs``, ``t_tokens``, ``t_probe``, ``t_optimizer``: self time, see
  ``geffect/timing.py``), the gradient's norm, what (if anything) was not finite and whether the
  update was applied.
- ``geffect.csv``: long format, one row per step, source (``batch``: the step's own rows;
  ``probe``: the fixed probe set), direction, risk (``unlearn`` = e_u, ``retain`` = e_r) and group
  (the five groups and ``total``).
- ``instances.csv``: the PG-effect of every forget and retain instance of the step, per group.
- ``conflicts.csv``: per step and scope (``global`` and each group), the conflict statistics of the
  two parts' gradients and the running fraction of steps in conflict.
- ``pairs.csv``: Fig. 5b, every pairs step: each forget instance's own objective term against the
  forget risk (``unlearn``) and the retain risk (``retain``), per group.
- ``tokens.csv``: every token step: per forget answer token its text, NLL, weight and G-effect.
- ``eval.csv``: every ``--eval-every`` steps, long format: step (updates made so far), metric,
  value, the items per split it was measured on and the seconds the evaluation took.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Self


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[str, ...]             # fixed columns, in file order
    per_group: tuple[str, ...] = ()      # column prefixes repeated per group: f"{prefix}_{group}"
    required: tuple[str, ...] = ()       # what a reader needs (a subset of ``columns``)
    numeric: tuple[str, ...] = ()        # columns a reader checks are numbers

    @property
    def file(self) -> str:
        return f"{self.name}.csv"

    def header(self, groups: list[str]) -> list[str]:
        return list(self.columns) + [f"{p}_{g}" for p in self.per_group for g in groups]


WEIGHT_STATS = ("weight_mean", "weight_std", "weight_min", "weight_max")
LOSSES = ("loss", "loss_forget", "loss_retain", "nll_forget", "nll_retain")
# seconds of the step in each phase (geffect.timing.PHASES; kept here so this module stays torch-free)
PHASE_COLUMNS = tuple(f"t_{p}" for p in ("forward", "backward", "effects", "conflicts", "pairs", "tokens", "probe",
                                          "optimizer"))

TABLES = {t.name: t for t in (
    Table("records", "one row per optimizer step: the objective's parts, the batch NLLs, the learning rate "
                     "and the weights the objective applied",
          ("step", *LOSSES, "lr", *WEIGHT_STATS, "time_s", *PHASE_COLUMNS, "grad_norm", "clipped", "nonfinite",
           "update"),
          required=("step", "nll_forget", "nll_retain"), numeric=("step", "nll_forget", "nll_retain")),
    Table("geffect", "G-effect e = ∇Rᵀ V per step, source, direction, risk and layer group (and total)",
          ("step", "source", "direction", "risk", "group", "value"),
          required=("step", "source", "risk", "group", "value"), numeric=("step", "value")),
    Table("instances", "PG-effect ∇ℓ_iᵀ V of every instance of the step (total and per group) with its weight",
          ("step", "source", "split", "index", "value", "weight"), per_group=("value",),
          required=("step", "split", "index", "value"), numeric=("step", "value")),
    Table("conflicts", "conflict statistics of the forget and retain parts' gradients per step and scope",
          ("step", "group", "cosine", "magnitude_similarity", "conflict", "dot", "norm_forget", "norm_retain",
           "removed_norm", "pcgrad_applied", "conflict_fraction", "scope"),
          required=("step", "group", "cosine", "magnitude_similarity", "conflict"), numeric=("step", "cosine")),
    Table("pairs", "Fig. 5b: each forget instance's own term against the forget (unlearn) and retain risks",
          ("step", "index", "weight", "unlearn", "retain"), per_group=("unlearn", "retain"),
          required=("step", "index", "weight", "unlearn", "retain"), numeric=("step",)),
    Table("tokens", "per forget answer token: its text, NLL, the objective's weight and its G-effect",
          ("step", "index", "position", "token", "nll", "weight", "geffect"),
          required=("step", "index", "position", "token", "nll", "weight"), numeric=("step",)),
    Table("eval", "outcome metrics (TOFU's probability, ROUGE-L recall, truth ratio, model utility, forget "
                  "quality) every --eval-every steps; step k = after k updates (0: before unlearning)",
          ("step", "metric", "value", "items", "seconds"),
          required=("step", "metric", "value"), numeric=("step", "value")),
)}


def _nan() -> float:
    return float("nan")


# ---- row builders --------------------------------------------------------------------------------

def step_row(step: int, lr: float, res, seconds: float) -> dict:
    """``records.csv`` from a :class:`~geffect.step.StepResult` (``weights``: what the objective
    applied this step, flat, or None)."""
    row = {"step": step, **{k: res.losses.get(k, _nan()) for k in LOSSES}, "lr": lr}
    weights = res.weights
    if weights is not None and len(weights):
        w = weights.detach().float()
        row.update({"weight_mean": w.mean().item(), "weight_std": w.std().item() if w.numel() > 1 else 0.0,
                    "weight_min": w.min().item(), "weight_max": w.max().item()})
    phases = {f"t_{k}": v for k, v in getattr(res, "phases", {}).items()}
    return row | {"time_s": seconds, **{c: phases.get(c, 0.0) for c in PHASE_COLUMNS}, "grad_norm": res.grad_norm,
                  "clipped": res.clipped, "nonfinite": "+".join(res.nonfinite),
                  "update": "applied" if res.applied else "skipped"}


def effect_rows(step: int, effects) -> list[dict]:
    """``geffect.csv`` from an :class:`~geffect.engine.engine.Effects`."""
    return [{"step": step, "source": effects.source, "direction": effects.direction, "risk": risk, "group": g,
             "value": v} for risk, d in effects.summary().items() for g, v in d.items()]


def instance_rows(step: int, effects) -> list[dict]:
    """``instances.csv`` from an :class:`~geffect.engine.engine.Effects`."""
    rows = []
    weights = effects.weights.tolist() if effects.weights is not None else None
    for split, table, index in (("forget", effects.forget, effects.forget_index),
                                ("retain", effects.retain, effects.retain_index)):
        values = table.tolist()
        for i, ds_index in enumerate(index):
            row = {"step": step, "source": effects.source, "split": split, "index": ds_index,
                   "value": table[i].sum().item(),
                   "weight": weights[i] if split == "forget" and weights is not None else _nan()}
            row.update({f"value_{g}": values[i][gi] for gi, g in enumerate(effects.groups)})
            rows.append(row)
    return rows


def conflict_rows(step: int, stats: list[dict], scope: str) -> list[dict]:
    """``conflicts.csv`` without the running fraction (the writer adds it)."""
    return [{"step": step, **s, "scope": scope} for s in stats]


def pair_rows(step: int, pairs) -> list[dict]:
    """``pairs.csv`` from a :class:`~geffect.engine.engine.Pairs`."""
    weights = pairs.weights.tolist() if pairs.weights is not None else None
    un, re = pairs.unlearn.tolist(), pairs.retain.tolist()
    rows = []
    for i, ds_index in enumerate(pairs.forget_index):
        row = {"step": step, "index": ds_index, "weight": weights[i] if weights is not None else _nan(),
               "unlearn": pairs.unlearn[i].sum().item(), "retain": pairs.retain[i].sum().item()}
        for risk, vals in (("unlearn", un), ("retain", re)):
            row.update({f"{risk}_{g}": vals[i][gi] for gi, g in enumerate(pairs.groups)})
        rows.append(row)
    return rows


def token_rows(step: int, tokens, decode) -> list[dict]:
    """``tokens.csv`` from a :class:`~geffect.engine.tokens.TokenRecords`; ``decode(id) -> str``."""
    rows = []
    for i, ds_index in enumerate(tokens.forget_index):
        for pos in tokens.mask[i].nonzero().flatten().tolist():
            rows.append({"step": step, "index": ds_index, "position": pos, "token": decode(int(tokens.labels[i, pos])),
                         "nll": tokens.nll[i, pos].item(),
                         "weight": tokens.weight[i, pos].item() if tokens.weight is not None else _nan(),
                         "geffect": tokens.geffect[i, pos].item() if tokens.geffect is not None else _nan()})
    return rows


# ---- writing -------------------------------------------------------------------------------------

def _parse(v: str):
    """A CSV field back to a Python value (the inverse of what the writer wrote)."""
    if v == "":
        return float("nan")
    if v in ("True", "False"):
        return v == "True"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _cell(v):
    if isinstance(v, float) and math.isnan(v):
        return ""          # as pandas writes NaN: an empty field
    return v


class RecordWriter:
    """Appends rows to each table's CSV in ``path`` (flushed per call) and keeps them in memory.

    A table's file is created with its header at its first row; a row with a column the table does
    not define is refused. ``conflicts`` rows get their running ``conflict_fraction`` (steps in
    conflict so far / steps so far) here, unless they carry one.
    """

    def __init__(self, path: Path | None, groups: list[str], keep: bool = True, lead: tuple[str, ...] = (),
                 resume_after: int | None = None):
        self.path, self.groups, self.keep = Path(path) if path is not None else None, list(groups), keep
        self.lead = lead      # extra leading columns (diagnose: ``method``)
        self.rows: dict[str, list[dict]] = {name: [] for name in TABLES}
        self._files: dict[str, tuple] = {}
        self._conflicts: dict[str, int] = {}
        if resume_after is not None and self.path is not None:
            self._resume(resume_after)

    def _resume(self, last: int) -> None:
        """Reopen the tables of an interrupted run, keeping the rows of steps ≤ ``last`` (the
        checkpoint's) and dropping the rest (a cut last line included)."""
        for name, table in TABLES.items():
            f = self.path / table.file
            if not f.exists():
                continue
            with open(f, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames
                kept = [r for r in reader if None not in r and None not in r.values() and r.get("step", "").isdigit()
                        and int(r["step"]) <= last]
            tmp = f.with_name(f.name + ".tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
                w.writeheader()
                w.writerows(kept)
            tmp.replace(f)
            rows = [{k: v if k == "token" else _parse(v) for k, v in r.items()} for r in kept]
            if name == "conflicts":
                for r in rows:
                    self._conflicts[r["group"]] = self._conflicts.get(r["group"], 0) + bool(r["conflict"])
            if self.keep:
                self.rows[name].extend(rows)
            fh = open(f, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
            # a folder written by an older geffect keeps its columns (e.g. without the t_* phase times)
            self._files[name] = (fh, csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", lineterminator="\n"))

    def add(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        if table == "conflicts":
            for r in (r for r in rows if "conflict_fraction" not in r):
                self._conflicts[r["group"]] = self._conflicts.get(r["group"], 0) + bool(r["conflict"])
                r["conflict_fraction"] = self._conflicts[r["group"]] / (r["step"] + 1)
        if self.keep:
            self.rows[table].extend(rows)
        if self.path is None:
            return
        if table not in self._files:
            # kept open across steps (closed by close()): appended and flushed every step
            f = open(self.path / TABLES[table].file, "w", newline="", encoding="utf-8")  # noqa: SIM115
            w = csv.DictWriter(f, fieldnames=[*self.lead, *TABLES[table].header(self.groups)],
                               extrasaction="raise", lineterminator="\n")
            w.writeheader()
            self._files[table] = (f, w)
        f, w = self._files[table]
        w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        f.flush()

    def add_step(self, step: int, lr: float, res, seconds: float, decode, scope: str) -> None:
        """Every row of one :class:`~geffect.step.StepResult`; ``decode(token_id) -> str``."""
        self.add("records", [step_row(step, lr, res, seconds)])
        self.add("conflicts", conflict_rows(step, res.conflicts, scope))
        for e in res.effects:
            self.add("geffect", effect_rows(step, e))
        for e in res.effects:
            self.add("instances", instance_rows(step, e))
        for p in res.pairs:
            self.add("pairs", pair_rows(step, p))
        for t in res.tokens:
            self.add("tokens", token_rows(step, t, decode))

    def conflict_fraction(self, n_steps: int) -> dict:
        """``{"conflict_fraction": steps whose parts conflicted globally / steps}``, or {} without conflicts."""
        if "global" not in self._conflicts:
            return {}
        return {"conflict_fraction": self._conflicts["global"] / max(1, n_steps)}

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
