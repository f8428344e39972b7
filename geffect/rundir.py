"""Run directories: written under ``OUT.partial`` and renamed into place only when complete.

A run directory is never left half-written  and an
existing non-empty directory is never overwritten silently. A failed run removes its
``OUT.partial``; nothing already in ``OUT`` is touched.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


class RunDirError(FileExistsError):
    pass


class RunDir:
    def __init__(self, out: str | Path, overwrite: bool = False):
        self.final = Path(out)
        if self.final.exists() and any(self.final.iterdir()) and not overwrite:
            raise RunDirError(f"{self.final} exists and is not empty; choose another --out or pass --overwrite")
        self.path = self.final.with_name(self.final.name + ".partial")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def write_json(self, name: str, obj) -> Path:
        p = self.path / name
        p.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
        return p

    def commit(self) -> Path:
        """Move the finished run into place."""
        if self.final.exists():
            shutil.rmtree(self.final)
        self.path.rename(self.final)
        return self.final
