"""geffect: a G-effect profiler for LLM unlearning (Wang et al., ICLR 2025).

The package face is lazy (PEP 562): ``import geffect`` and ``geffect --help`` load no torch; each
name below imports its module on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "UnlearnConfig": "geffect.config", "ProfileConfig": "geffect.config", "Hyper": "geffect.config",
    "DiagnoseConfig": "geffect.config", "SpungeConfig": "geffect.config",
    "spunge": "geffect.apps.spunge", "evaluate": "geffect.eval.suite", "GEffectCallback": "geffect.integrations",
    "unlearn": "geffect.loop", "measure": "geffect.apps.measure", "diagnose": "geffect.apps.diagnose",
    "Step": "geffect.step", "Engine": "geffect.engine", "Schedule": "geffect.engine.schedule",
    "load_model": "geffect.models", "parse_method": "geffect.objectives",
    "conflict_stats": "geffect.surgery", "pcgrad": "geffect.surgery",
}
__all__ = ["DiagnoseConfig", "Engine", "GEffectCallback", "Hyper", "ProfileConfig", "Schedule", "SpungeConfig", "Step",
           "UnlearnConfig", "conflict_stats", "diagnose", "evaluate", "load_model", "measure", "parse_method",
           "pcgrad", "spunge", "unlearn"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'geffect' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
