"""LoRA adapters (peft): ``--lora r=16,alpha=32,targets=q_proj,v_proj[,dropout=0.0]``.

Only the adapters train. The engine then measures G-effects with respect to the trainable
parameters, the LoRA factors A and B of each targeted module (both ``nn.Linear``: the Linear rule
covers them), and groups each adapter with the block it sits in. θ_o is the model with its
adapters disabled (no copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from geffect.errors import ConfigError


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0


def parse_lora(spec: str) -> LoraSpec:
    """``r=16,alpha=32,targets=q_proj,v_proj,dropout=0.05``: a name without ``=`` continues ``targets``."""
    keys: dict[str, list[str]] = {}
    last = None
    for tok in (t.strip() for t in spec.split(",") if t.strip()):
        if "=" in tok:
            last, _, val = tok.partition("=")
            last = last.strip()
            keys.setdefault(last, []).append(val.strip())
        elif last == "targets":
            keys[last].append(tok)
        else:
            raise ConfigError(f"--lora {spec!r}: expected key=value pairs (r, alpha, targets, dropout), got {tok!r}")
    unknown = set(keys) - {"r", "alpha", "targets", "dropout"}
    if unknown:
        raise ConfigError(f"--lora {spec!r}: unknown key(s) {', '.join(sorted(unknown))}; use r, alpha, targets, dropout")
    try:
        r = int(keys.get("r", ["16"])[0])
        alpha = float(keys.get("alpha", [str(2 * r)])[0])
        dropout = float(keys.get("dropout", ["0"])[0])
    except ValueError:
        raise ConfigError(f"--lora {spec!r}: r must be an integer, alpha and dropout numbers") from None
    targets = tuple(t for t in keys.get("targets", ["q_proj", "v_proj"]) if t)
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1 or not targets:
        raise ConfigError(f"--lora {spec!r}: need r ≥ 1, alpha > 0, 0 ≤ dropout < 1 and at least one target")
    return LoraSpec(r, alpha, targets, dropout)


def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters on the modules whose name ends with a target."""
    names = [n for n, _ in model.named_modules()]
    hit = {t for t in spec.targets for n in names if n == t or n.endswith("." + t)}
    missing = [t for t in spec.targets if t not in hit]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora targets {', '.join(missing)}: no module of {type(model).__name__} has that "
                          f"name; its Linear modules are named {', '.join(linear)}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora needs the peft package: pip install peft") from None
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                     lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def negate_adapters(model: torch.nn.Module, lam: float = 1.0) -> torch.nn.Module:
    """TVN's last step: θ = θ_base − λ·ΔW with ΔW = (α/r)·B·A materialised per adapted weight
    (REFERENCE.md §4), the adapters removed. Returns the base model (changed in place)."""
    from geffect.merge import lora_delta
    delta = lora_delta(model)
    with torch.no_grad():
        for name, mod in model.named_modules():
            key = name.removeprefix("base_model.model.") + ".weight"
            if key in delta and hasattr(mod, "get_base_layer"):
                w = mod.get_base_layer().weight
                w -= lam * delta[key].to(w.dtype)
    return model.unload()
