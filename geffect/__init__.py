"""geffect: a G-effect profiler for LLM unlearning (Wang et al., ICLR 2025)."""
from geffect.engine import Engine, ProfileConfig
from geffect.engine.measure import measure
from geffect.models import load_model
from geffect.objectives import Hyper, parse_method
from geffect.surgery import conflict_stats, pcgrad
from geffect.unlearn import UnlearnConfig, unlearn

__all__ = ["Engine", "Hyper", "ProfileConfig", "UnlearnConfig", "conflict_stats", "load_model", "measure",
           "parse_method", "pcgrad", "unlearn"]
__version__ = "0.1.0"
