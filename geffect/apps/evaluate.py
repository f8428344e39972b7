"""``geffect eval``: the outcome metrics of a model or of a finished run's model, into ``eval.json``;
and the aggregates of TOFU evaluation logs written elsewhere.

What is evaluated (``target``):

- a run directory: its saved model (``RUN/model``; a LoRA run's adapters on the model the run
  started from), with the run's data, prompt format and maximum length unless overridden;
- a model (built-in name, folder, ``.gguf``, hub id): as a run would start from it, i.e. memorised
  on the bundled data when the run would memorise (``--memorize auto``), so that ``geffect eval
  smollm2-135m`` is the "before" of the default run.

Forget quality needs the forget truth ratios of a model never trained on the forget set
(``--reference``): an ``eval.json`` or TOFU / open-unlearning log to read them from, or a model to
evaluate; with the bundled data a reference model is memorised on the retain split only, as TOFU's
retain model is fine-tuned on its retain set alone.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from geffect.config import UnlearnConfig
from geffect.data.records import QARecord
from geffect.errors import DataError, RunDirError
from geffect.eval.suite import EvalOptions, EvalSets, evaluate

RUN_FIELDS = ("model", "forget", "retain", "tofu", "tofu_split", "memorize", "max_length", "seed", "device", "dtype",
              "prompt_format", "lora")


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "records.csv").is_file()


def run_config(run: Path) -> UnlearnConfig:
    """The UnlearnConfig a run was made with (its config.json)."""
    try:
        saved = json.loads((run / "config.json").read_text(encoding="utf-8"))["run"]
    except (json.JSONDecodeError, KeyError) as err:
        raise DataError(f"{run / 'config.json'}: not a geffect run config ({err})") from None
    known = {k: v for k, v in saved.items() if k in UnlearnConfig.__dataclass_fields__}
    return UnlearnConfig(**known)


def load_target(target: str, overrides: dict) -> tuple:
    """(LoadedModel, UnlearnConfig, Data, kind) for a run directory or a model."""
    from geffect.data.sampling import load_data
    from geffect.hardware import resolve_device
    from geffect.session import set_seed, starting_model
    if is_run_dir(target):
        run = Path(target)
        cfg = replace(run_config(run), **{k: v for k, v in overrides.items() if v is not None}, progress=False)
        if not (run / "model").is_dir():
            raise RunDirError(f"{run}: no saved model (RUN/model): the run was made with --no-save-model or stopped "
                              "before its end; evaluate it by model instead")
        kind = "run"
    else:
        cfg = UnlearnConfig(model=target, progress=False, **{k: v for k, v in overrides.items() if v is not None})
        run, kind = None, "model"
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    data = load_data(cfg.forget, cfg.retain, cfg.seed, cfg.tofu, cfg.tofu_split)
    if run is None:
        return starting_model(cfg, data, device), cfg, data, kind
    from geffect.models import load_model
    if (run / "model" / "adapter_config.json").is_file():          # a LoRA run saved its adapters only
        from peft import PeftModel
        base = starting_model(cfg, data, device)
        model = PeftModel.from_pretrained(base.model, run / "model").to(device).eval()
        return replace(base, model=model), cfg, data, kind
    loaded = load_model(str(run / "model"), seed=cfg.seed, device=device, dtype=cfg.dtype)
    return loaded, cfg, data, kind


def load_prompts(path: str) -> list[str]:
    """Prompts to continue (toxicity): a text file with one per line, or a JSON/JSONL file whose objects
    carry ``prompt``, ``text`` or ``question``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: prompts file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix not in (".json", ".jsonl"):
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        body = text.strip()
        rows = json.loads(body) if body.startswith("[") else None
        prompts = []
        for n, line in enumerate(body.splitlines() if rows is None else [], start=1):
            if line.strip():
                try:
                    prompts.append(_prompt_of(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: invalid JSON ({err.msg})") from None
        for n, obj in enumerate(rows or [], start=1):
            prompts.append(_prompt_of(obj, f"{path}: item {n}"))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _prompt_of(obj, where: str) -> str:
    if isinstance(obj, dict):
        for key in ("prompt", "text", "question"):
            v = obj.get(key)
            if isinstance(v, dict):        # RealToxicityPrompts: {"prompt": {"text": ...}}
                v = v.get("text")
            if isinstance(v, str) and v.strip():
                return v
    raise DataError(f"{where}: expected an object with a non-empty field 'prompt', 'text' or 'question'")


def reference_truth_ratios(source: str, overrides: dict, opts: EvalOptions, forget_ids: list[str]) -> dict:
    """A reference model's forget truth ratios by item id, read from results or measured."""
    from geffect.eval import tofu
    p = Path(source)
    if p.is_file() and p.suffix == ".json":
        data = tofu._load(p)
        if isinstance(data.get("logs"), dict) and "forget" in data["logs"]:         # a geffect eval.json
            tr = tofu.items(data["logs"]["forget"], "forget", f"{p}: logs/forget")["truth_ratio"]
        else:
            tr = tofu.read_logs(p)["forget"]["truth_ratio"]
    elif p.is_dir() and any((p / f).exists() for f in ("eval_log_forget.json", "eval_log_aggregated.json",
                                                        "TOFU_EVAL.json")):
        tr = tofu.read_logs(p)["forget"]["truth_ratio"]
    else:
        tr = _measure_reference(source, overrides, opts)
    if set(tr) != set(forget_ids):
        raise DataError(f"--reference {source}: its forget items ({len(tr)}) have other ids than the evaluated "
                        f"forget set's ({len(forget_ids)}) (field 'avg_paraphrased_loss')")
    return tr


def _measure_reference(source: str, overrides: dict, opts: EvalOptions) -> dict:
    """Evaluate a reference model on the forget set; on the bundled data it is memorised on the retain
    split only (never on the forget set)."""
    from geffect.eval import tofu
    from geffect.eval.tofu_log import tofu_log
    loaded, cfg, data, _ = load_target(source, overrides)
    if data.bundled and not is_run_dir(source) and cfg.memorize != "no":
        from geffect.memorize import cached, memorize
        hit = cached(cfg.model, data.retain, seed=cfg.seed, device=next(loaded.model.parameters()).device,
                     dtype=cfg.dtype, fmt=cfg.prompt_format)
        if hit is None:
            from geffect.models import load_model
            base = load_model(cfg.model, seed=cfg.seed, device=next(loaded.model.parameters()).device,
                              dtype=cfg.dtype)
            hit = memorize(base, data.retain, max_length=cfg.max_length, seed=cfg.seed, progress=False,
                           dtype=cfg.dtype, fmt=cfg.prompt_format)
        loaded = hit
    log, _ = tofu_log(loaded.model, loaded.tokenizer, data.forget, cfg.prompt_format, cfg.max_length,
                      opts.batch_size, opts.max_new_tokens)
    return tofu.items(log, "forget", f"reference {source}")["truth_ratio"]


def eval_target(target: str, overrides: dict, opts: EvalOptions, holdout: str | None = None,
                toxic_prompts: str | None = None, text: str = "pydoc", reference: str | None = None,
                progress: bool = True) -> dict:
    """Evaluate a run directory's model or a model (module docstring); returns eval.json's content."""
    from geffect.data.records import load_records
    from geffect.eval.perplexity import load_text
    t0 = time.perf_counter()
    say = (lambda m: print(f"geffect eval: {m}", file=sys.stderr)) if progress else None
    prompts = load_prompts(toxic_prompts) if toxic_prompts else []
    corpus = load_text(text) if "perplexity" in opts.metrics else None
    held: list[QARecord] | None = load_records(holdout) if holdout else None
    loaded, cfg, data, kind = load_target(target, overrides)
    opts = replace(opts, fmt=cfg.prompt_format, max_length=cfg.max_length)
    sets = EvalSets(data.forget, data.retain, held if held is not None else data.holdout, prompts, corpus)
    if reference is not None:
        opts = replace(opts, reference=reference_truth_ratios(reference, {k: v for k, v in overrides.items()
                                                                          if k != "memorize"}, opts,
                                                              [str(i) for i in range(len(data.forget))]))
    res = evaluate(loaded.model, loaded.tokenizer, sets, opts, say)
    res["seconds"]["total"] = time.perf_counter() - t0
    return {"target": str(target), "kind": kind, "model": cfg.model,
            "sets": {"forget": len(sets.forget), "retain": len(sets.retain), "holdout": len(sets.holdout),
                     "toxic_prompts": len(prompts)},
            "options": {"metrics": list(opts.metrics), "prompt_format": str(cfg.prompt_format),
                        "max_length": cfg.max_length, "max_new_tokens": opts.max_new_tokens, "min_k": opts.min_k,
                        "toxicity_model": opts.toxicity_model or "profanity-check", "perplexity_text": text,
                        "reference": reference}} | res


def eval_logs(logs: str, reference_logs: str | None = None) -> dict:
    """Every aggregate of TOFU (or open-unlearning) evaluation logs, with forget quality against a
    reference's logs; per-set components included."""
    from geffect.eval import tofu
    sets = tofu.read_logs(logs)
    ref = tofu.read_logs(reference_logs) if reference_logs else None
    return tofu.aggregate(sets, ref, where=f"{logs} vs {reference_logs}" if ref else str(logs))


def write_eval(result: dict, out: Path, overwrite: bool = False) -> Path:
    """Write eval.json atomically; an existing file is replaced only with ``overwrite``."""
    if out.exists() and not overwrite:
        raise RunDirError(f"{out} exists: pass --overwrite to replace it, or --out another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default), encoding="utf-8")
    tmp.replace(out)
    return out


def _json_default(x):
    return float(x) if hasattr(x, "__float__") else str(x)
