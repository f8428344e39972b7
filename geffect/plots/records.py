"""Read a run directory's records (CSV/JSON only: plotting never touches a model or a tensor).

The tables and the columns a reader needs are those :mod:`geffect.records` defines.
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from geffect.errors import RecordsError
from geffect.records import TABLES


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
    eval: pd.DataFrame | None = None    # long format: step, metric, value

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
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):            # a row cut off mid-line (an interrupted run)
        line = text.count("\n") + 1
        print(f"geffect: warning: {path}:{line}: the last line is cut off (an interrupted write?); it is ignored",
              file=sys.stderr)
        text = text[:text.rfind("\n") + 1]
    try:
        df = pd.read_csv(io.StringIO(text), keep_default_na=True)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise RecordsError(f"{path}: cannot parse: {err}") from err
    table = TABLES[path.stem]
    missing = [c for c in table.required if c not in df.columns]
    if missing:
        raise RecordsError(f"{path}: missing column(s) {', '.join(missing)} (header line 1)")
    for col in table.numeric:
        if col in df.columns and not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            line = int(bad.to_numpy().nonzero()[0][0]) + 2
            raise RecordsError(f"{path}:{line}: field {col!r} is not a number: {df[col][line - 2]!r}")
    return df if len(df) else None


def load_run(path: str | Path) -> RunRecords:
    path = Path(path)
    if not path.is_dir():
        raise RecordsError(f"{path}: not a directory")
    config, summary = _json(path / "config.json"), _json(path / "summary.json")
    tables = {name: _csv(path / t.file, required=name == "records") for name, t in TABLES.items()}
    return RunRecords(path, config, summary, tables["records"],
                      tables["geffect"], tables["instances"], tables["conflicts"], tables["pairs"], tables["tokens"],
                      tables["eval"])
