"""The G-effect engine (Wang et al., ICLR 2025): per-group, per-instance G-effects from the
training step's own forward and backward pass."""
from geffect.engine.groups import GROUPS, assign_groups
from geffect.engine.profiler import Engine, ProfileConfig

__all__ = ["GROUPS", "Engine", "ProfileConfig", "assign_groups"]
