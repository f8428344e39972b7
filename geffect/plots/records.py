"""Read a run directory's records (CSV/JSON only: plotting never touches a model or a tensor)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


class RecordsError(ValueError):
    """A run directory whose records are missing or malformed (names the file and field)."""


REQUIRED = {
    "records.csv": ("step", "nll_forget", "nll_retain"),
    "geffect.csv": ("step", "source", "risk", "group", "value"),
    "instances.csv": ("step", "split", "index", "value"),
    "conflicts.csv": ("step", "group", "cosine", "magnitude_similarity", "conflict"),
    "pairs.csv": ("step", "index", "weight", "unlearn", "retain"),
    "tokens.csv": ("step", "index", "position", "token", "nll", "weight"),
}


@dataclass
class RunRecords:
    path: Path
    config: dict
    summary: dict
    steps: pd.DataFrame                 # records.csv: one row per optimizer step
    geffect: pd.DataFrame | None        # long format: step, source, direction, risk, group, value
    instances: pd.DataFrame | None
    conflicts: pd.DataFrame | None
    pairs: pd.DataFrame | None
    tokens: pd.DataFrame | None

    @property
    def method(self) -> str:
        return self.summary.get("method", self.path.name)

    def batch_effects(self) -> pd.DataFrame | None:
        """In-batch G-effects (probe rows excluded)."""
        if self.geffect is None:
            return None
        return self.geffect[self.geffect["source"] == "batch"]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise RecordsError(f"{path}: missing (is this a geffect run directory?)") from err
    except json.JSONDecodeError as err:
        raise RecordsError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err


def _csv(path: Path, required: bool) -> pd.DataFrame | None:
    if not path.exists():
        if required:
            raise RecordsError(f"{path}: missing (is this a geffect run directory?)")
        return None
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise RecordsError(f"{path}: cannot parse: {err}") from err
    missing = [c for c in REQUIRED[path.name] if c not in df.columns]
    if missing:
        raise RecordsError(f"{path}: missing column(s) {', '.join(missing)} (header line 1)")
    for col in ("step", "value", "nll_forget", "nll_retain", "cosine"):
        if col in df.columns and not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            line = int(bad.to_numpy().nonzero()[0][0]) + 2
            raise RecordsError(f"{path}:{line}: field {col!r} is not a number: {df[col][line - 2]!r}")
    return df if len(df) else None


def load_run(path: str | Path) -> RunRecords:
    path = Path(path)
    if not path.is_dir():
        raise RecordsError(f"{path}: not a directory")
    return RunRecords(path, _json(path / "config.json"), _json(path / "summary.json"),
                      _csv(path / "records.csv", required=True), _csv(path / "geffect.csv", False),
                      _csv(path / "instances.csv", False), _csv(path / "conflicts.csv", False),
                      _csv(path / "pairs.csv", False), _csv(path / "tokens.csv", False))
