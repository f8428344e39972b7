"""Unlearning objectives: pure functions (:mod:`functional`) and their composition (:mod:`methods`)."""
from geffect.objectives.methods import (
                                        FORGET_OBJECTIVES,
                                        RETAIN_REGULARISERS,
                                        ForwardOut,
                                        Hyper,
                                        Method,
                                        MethodError,
                                        Parts,
                                        parse_method,
)

__all__ = ["FORGET_OBJECTIVES", "RETAIN_REGULARISERS", "ForwardOut", "Hyper", "Method", "MethodError",
           "Parts", "parse_method"]
