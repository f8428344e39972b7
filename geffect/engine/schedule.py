"""When the engine measures what: one small schedule object, so the loop never reads the settings."""
from __future__ import annotations

from dataclasses import dataclass

from geffect.config import ProfileConfig


@dataclass(frozen=True)
class Due:
    """What the engine measures at one step."""
    effects: bool = False     # per-group, per-instance G-effects of the batch
    conflicts: bool = False   # conflict statistics of the two parts' gradients
    pairs: bool = False       # Fig. 5b: each forget instance's own term against both risks
    tokens: bool = False      # per-token G-effects of the forget answers
    probe: bool = False       # G-effects against the fixed probe set

    @property
    def any(self) -> bool:
        return self.effects or self.conflicts or self.pairs or self.tokens or self.probe


NOTHING = Due()


@dataclass(frozen=True)
class Schedule:
    """G-effects every step; conflict statistics every step (when on); pairs, tokens and the probe
    every k steps (0: never), counted from step 0."""
    conflicts: bool = True
    pairs_every: int = 5
    tokens_every: int = 5
    probe_every: int = 0

    @classmethod
    def of(cls, cfg: ProfileConfig | None) -> Schedule | None:
        if cfg is None:
            return None
        if not cfg.instances:          # group G-effects only: no per-instance pairs, no per-token values
            return cls(cfg.conflicts, 0, 0, cfg.probe_every)
        return cls(cfg.conflicts, cfg.pairs_every, cfg.tokens_every, cfg.probe_every)

    @staticmethod
    def _every(k: int, step: int) -> bool:
        return k > 0 and step % k == 0

    def at(self, step: int) -> Due:
        return Due(effects=True, conflicts=self.conflicts, pairs=self._every(self.pairs_every, step),
                   tokens=self._every(self.tokens_every, step), probe=self._every(self.probe_every, step))
