"""Model merging: task vectors, task arithmetic, negation and TIES (REFERENCE.md §4).

A task vector is τ_i = θ_i − θ_base. Task arithmetic: θ = θ_base + λ·Σ_i τ_i. Negation (TVN):
θ = θ_base − λ·τ. TIES (Yadav et al. 2023): (1) trim each τ_i to its ``density`` share of
largest magnitudes, (2) elect each coordinate's sign by total mass, sign(Σ_i trimmed τ_i),
(3) disjoint mean: average only the trimmed entries whose sign agrees, dividing by their count;
θ = θ_base + λ·merged.

Choices, against the references:

- **Trim scope.** ``trim="tensor"`` (default, as PEFT and mergekit do) keeps exactly
  ``int(density·numel)`` entries of each tensor. ``trim="model"`` uses one cut per task vector
  over the whole flattened model, as the original TIES code does, but keeps exactly
  ``int(density·N)`` entries where that code keeps one more. Entries tied in magnitude at the cut
  are kept in index order (tensor order, then flat index): a stable rule, where ``torch.topk``
  picks arbitrarily.
- **Sign election.** A coordinate whose mass is exactly 0 elects + (PEFT, mergekit); entries equal
  to 0 agree with no sign and are not counted in the mean.
- **Precision.** Arithmetic in float32 (float64 for float64 weights), the result cast back to the
  base tensor's dtype. Non-floating tensors (integer buffers) are the base's.

Every merge streams tensor by tensor: a source is an in-memory state dict, a module, or a
safetensors file or Hugging Face model folder read lazily, so merging 8B models holds one tensor
per model at a time (plus the output shard being written).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from geffect.errors import ConfigError, GeffectError


class MergeError(GeffectError, ValueError):
    """Models that cannot be merged (names the model and tensor)."""


# ---------------------------------------------------------------- sources: name → tensor, read lazily

class Source:
    """Tensors by name, in a fixed order, loaded one at a time. ``label`` names it in errors."""

    def __init__(self, label: str):
        self.label = label

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class DictSource(Source):
    """A state dict in memory; tensors that share storage (tied weights) appear once, under the
    first name, as ``save_pretrained`` writes them."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str = "state dict"):
        super().__init__(label)
        seen, self._state = set(), {}
        for k, v in state.items():
            key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) \
                if v.device.type != "meta" else None
            if key is not None and v.numel() and key in seen:
                continue
            seen.add(key)
            self._state[k] = v

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


class SafetensorsSource(Source):
    """A ``.safetensors`` file, or a model folder with ``model.safetensors`` or a sharded index."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        path = Path(path)
        super().__init__(str(path))
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {f: path / f for f in dict.fromkeys(weight_map.values())}
            elif (path / "model.safetensors").is_file():
                files = {"model.safetensors": path / "model.safetensors"}
                weight_map = None
            else:
                raise MergeError(f"{path}: no model.safetensors or model.safetensors.index.json (merge reads "
                                 "safetensors model folders, as save_pretrained writes them)")
        elif path.is_file():
            files, weight_map = {path.name: path}, None
        else:
            raise MergeError(f"{path}: no such model folder or safetensors file")
        self._handles = {f: safe_open(str(p), framework="pt") for f, p in files.items()}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        self._where = weight_map

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def as_source(x, label: str | None = None) -> Source:
    """A :class:`Source` from a state dict, a module, a safetensors file or a model folder."""
    if isinstance(x, Source):
        return x
    if isinstance(x, torch.nn.Module):
        return DictSource(x.state_dict(), label or type(x).__name__)
    if isinstance(x, Mapping):
        return DictSource(x, label or "state dict")
    if isinstance(x, (str, Path)):
        return SafetensorsSource(x)
    raise TypeError(f"cannot merge a {type(x).__name__}: give a state dict, a module or a safetensors path")


def check_compatible(base: Source, models: list[Source]) -> None:
    """Every model has the base's tensor names and shapes (else a MergeError naming model and tensor)."""
    names = base.names()
    for m in models:
        mine = set(m.names())
        missing = [n for n in names if n not in mine]
        extra = sorted(mine - set(names))
        if missing or extra:
            what = (f"lacks {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
                   (f"has tensors the base lacks: {extra[:3]}" if extra else "")
            raise MergeError(f"{m.label}: {what} (compared with the base {base.label}); merge models fine-tuned "
                             "from the same base")
        for n in names:
            if m.shape(n) != base.shape(n):
                raise MergeError(f"{m.label}: tensor {n} has shape {list(m.shape(n))}, the base "
                                 f"{base.label} has {list(base.shape(n))}")


# ---------------------------------------------------------------- the merges, one tensor at a time

def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def trim_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly int(density·numel) entries of largest |τ|; ties in index order (stable sort)."""
    n = tau.numel()
    k = int(density * n)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    mag = tau.abs().flatten()
    cut = torch.kthvalue(mag, n - k + 1).values                # the k-th largest: O(n), no sort
    mask = mag > cut
    short = k - int(mask.sum())                              # entries equal to the cut still to keep
    if short > 0:
        mask[(mag == cut).nonzero().flatten()[:short]] = True
    return mask.view(tau.shape)


def ties_merge(taus: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TIES steps 2–3 on trimmed task vectors: elected sign by mass, disjoint mean.
    ``taus``, ``masks``: (n_models, *shape) → merged τ (*shape)."""
    trimmed = taus * masks
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)   # mass 0 elects + (PEFT, mergekit)
    agree = torch.sign(trimmed) == elected                                  # an entry of 0 agrees with neither
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


class ModelCut:
    """``trim="model"``: per task vector, the magnitude of its k-th largest entry over the whole model
    and how many entries equal to it are kept (in tensor order, then flat index)."""

    def __init__(self, base: Source, model: Source, names: list[str], density: float):
        mags = []
        for n in names:
            b = base.get(n)                                     # read once (a safetensors read per call)
            wd = _work_dtype(b)
            mags.append((model.get(n).to(device=b.device, dtype=wd) - b.to(wd)).abs().flatten().float())
        flat = torch.cat(mags) if mags else torch.zeros(0)     # empty model: k = 0, nothing kept
        k = int(density * flat.numel())
        if k == 0:
            self.cut, self.at_cut = float("inf"), 0
        else:
            self.cut = torch.topk(flat, k).values[-1].item()
            self.at_cut = k - int((flat > self.cut).sum())       # entries equal to the cut still to keep

    def mask(self, tau: torch.Tensor) -> torch.Tensor:
        mag = tau.abs().float()
        keep = mag > self.cut
        equal = (mag == self.cut).flatten()
        if self.at_cut > 0 and equal.any():
            idx = equal.nonzero().flatten()[:self.at_cut]
            self.at_cut -= idx.numel()
            keep = keep.flatten()
            keep[idx] = True
            keep = keep.view(tau.shape)
        return keep


def _check(method: str, density: float, lam: float) -> None:
    if method not in ("ties", "task-arithmetic"):
        raise ConfigError(f"merge method {method!r}: choose ties or task-arithmetic")
    if not 0 < density <= 1:
        raise ConfigError(f"--density {density}: the share of each task vector TIES keeps must be in (0, 1]")
    if lam < 0:
        raise ConfigError(f"--lambda {lam}: the scale of the merged task vector must be ≥ 0 (to subtract a task "
                          "vector, use geffect.merge.negation)")


def merged_tensors(base, models: list, method: str = "ties", density: float = 0.2, lam: float = 1.0,
                   trim: str = "tensor") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) in the base's order, one tensor in memory per model at a time."""
    _check(method, density, lam)
    if trim not in ("tensor", "model"):
        raise ConfigError(f"--trim {trim!r}: choose tensor or model")
    if not models:
        raise ConfigError("merge needs at least one model besides the base")
    base = as_source(base, "base")
    models = [as_source(m, f"model {i + 1}") for i, m in enumerate(models)]
    check_compatible(base, models)
    names = base.names()
    cuts = None
    if method == "ties" and trim == "model":         # one extra pass over the tensors, only for this scope
        floating = [n for n in names if base.get(n).is_floating_point()]
        cuts = [ModelCut(base, m, floating, density) for m in models]
    for n in names:
        b = base.get(n)
        if not b.is_floating_point():
            yield n, b
            continue
        wd = _work_dtype(b)
        bw = b.to(wd)
        taus = torch.stack([m.get(n).to(device=b.device, dtype=wd) - bw for m in models])   # (n_models, *shape)
        if method == "task-arithmetic":
            merged = taus.sum(0)
        else:
            masks = torch.stack([cuts[i].mask(taus[i]) if cuts else trim_mask(taus[i], density)
                                 for i in range(len(models))])
            merged = ties_merge(taus, masks)
        yield n, (bw + lam * merged).to(b.dtype)


def ties(base, models: list, density: float = 0.2, lam: float = 1.0, trim: str = "tensor") -> dict[str, torch.Tensor]:
    """TIES-merge ``models`` onto ``base`` (state dicts, modules or safetensors paths) → state dict."""
    return dict(merged_tensors(base, models, "ties", density, lam, trim))


def task_arithmetic(base, models: list, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """θ_base + λ·Σ_i (θ_i − θ_base) → state dict."""
    return dict(merged_tensors(base, models, "task-arithmetic", 1.0, lam))


def negation(base, model, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """Task-vector negation: θ_base − λ·(θ_model − θ_base) → state dict."""
    if lam < 0:
        raise ConfigError(f"negation λ {lam}: must be ≥ 0")
    base, model = as_source(base, "base"), as_source(model, "model")
    check_compatible(base, [model])
    out = {}
    for n in base.names():
        b = base.get(n)
        if b.is_floating_point():
            wd = _work_dtype(b)
            out[n] = (b.to(wd) - lam * (model.get(n).to(device=b.device, dtype=wd) - b.to(wd))).to(b.dtype)
        else:
            out[n] = b
    return out


# ---------------------------------------------------------------- writing a model folder

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def write_merged(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, like: Path | None = None,
                 shard_bytes: int = 2 << 30) -> Path:
    """Write (name, tensor) pairs into ``out`` as safetensors shards (≤ ``shard_bytes`` each, with an
    index when there are several), copying config and tokenizer files from the model folder ``like``."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file({k: v.contiguous().cpu() for k, v in current.items()}, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for n, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[n], size = t, size + nbytes
    flush()
    if len(shards) == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
    else:
        total = sum((out / s).stat().st_size for s, _ in shards)
        index = {"metadata": {"total_size": total}, "weight_map": {k: s for s, keys in shards for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if like is not None and Path(like).is_dir():
        for f in CONFIG_FILES:
            if (Path(like) / f).is_file():
                shutil.copy2(Path(like) / f, out / f)
    return out


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a merged state dict into ``model`` (tied weights written once, as saved)."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise MergeError(f"merged weights do not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    state = model.state_dict()
    t = state[name]
    return any(k != name and v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               for k, v in state.items())


# ---------------------------------------------------------------- LoRA task vectors (TVN)

def lora_delta(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The task vector of LoRA adapters: ΔW = scaling·B·A (scaling = α/r, or α/√r with rsLoRA) of
    every adapted Linear or Conv1D weight of a PEFT model, keyed by the base model's parameter name.
    Materialised, as TVN needs (negating A and B separately is not negating ΔW)."""
    out = {}
    for name, mod in model.named_modules():
        if adapter in getattr(mod, "lora_embedding_A", {}):
            raise MergeError(f"{name}: LoRA on an embedding is not supported by lora_delta (adapt Linear layers)")
        if adapter not in getattr(mod, "lora_A", {}):
            continue
        a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight          # (r, in), (out, r)
        delta = (b.float() @ a.float()) * mod.scaling[adapter]                  # (out, in)
        if getattr(mod, "fan_in_fan_out", False):                               # GPT-2's Conv1D stores (in, out)
            delta = delta.T
        key = name.removeprefix("base_model.model.") + ".weight"
        out[key] = delta.to(mod.get_base_layer().weight.dtype)
    if not out:
        raise MergeError(f"no LoRA adapter {adapter!r} in the model")
    return out


def tvn(base, delta: Mapping[str, torch.Tensor], lam: float = 1.0) -> dict[str, torch.Tensor]:
    """Task-vector negation with a materialised ΔW (e.g. :func:`lora_delta`): θ = θ_base − λ·ΔW."""
    if lam < 0:
        raise ConfigError(f"TVN λ {lam}: must be ≥ 0")
    base = as_source(base, "base")
    names = set(base.names())
    unknown = [k for k in delta if k not in names]
    if unknown:
        raise MergeError(f"ΔW names {unknown[:3]} are not tensors of the base {base.label}")
    out = {}
    for n in base.names():
        b = base.get(n)
        if n in delta:
            if tuple(delta[n].shape) != tuple(b.shape):
                raise MergeError(f"ΔW {n} has shape {list(delta[n].shape)}, the base has {list(b.shape)}")
            wd = _work_dtype(b)
            out[n] = (b.to(wd) - lam * delta[n].to(device=b.device, dtype=wd)).to(b.dtype)
        else:
            out[n] = b
    return out
