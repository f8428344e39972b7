"""TOFU's metrics (Maini et al. 2024), computed as TOFU computes them (its aggregate_eval_stat.py).

Per item, the log TOFU writes: ``avg_gt_loss`` (mean token NLL of the answer), ``avg_paraphrased_loss``,
``average_perturb_loss`` (one per perturbed answer) and ``rougeL_recall`` of the greedy answer.
Aggregation is a function of those per-item values alone, so it reads results produced elsewhere
(TOFU's published logs, open-unlearning's ``TOFU_EVAL.json``) as well as geffect's own:

- probability: mean of exp(−avg_gt_loss); on the multiple-choice sets (real authors, world facts)
  mean of p(true) / (p(true) + Σ p(perturbed));
- ROUGE: mean ROUGE-L recall;
- truth ratio R = p̄(perturbed) / p̄(paraphrased) = exp(loss_para − mean_j loss_pert_j) (the
  geometric mean over the perturbed answers); reported as mean(min(R, 1/R)) on the forget set and
  mean(max(0, 1 − R)) elsewhere;
- forget quality: the p-value of the two-sample KS test between the forget set's truth ratios of the
  model and of a reference model never trained on the forget set;
- model utility: the harmonic mean of probability, ROUGE and truth ratio on the retain,
  real-author and world-fact sets (nine values).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from geffect.errors import DataError

FILES = {"retain": "eval_log.json", "forget": "eval_log_forget.json", "real_authors": "eval_real_author_wo_options.json",
         "world_facts": "eval_real_world_wo_options.json"}
MULTIPLE_CHOICE = ("real_authors", "world_facts")
FIELDS = ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall")


# ---- per-item values -----------------------------------------------------------------------------------

def _values(log: dict, field: str, where: str) -> dict:
    if field not in log:
        raise DataError(f"{where}: field {field!r} is missing")
    return log[field]


def truth_ratios(log: dict, where: str = "log") -> dict:
    """Per item R = exp(loss_para − mean_j loss_pert_j) (p̄(perturbed) / p̄(paraphrased))."""
    para, pert = _values(log, "avg_paraphrased_loss", where), _values(log, "average_perturb_loss", where)
    out = {}
    for k, p in para.items():
        losses = pert.get(k)
        if losses is None:
            raise DataError(f"{where}: item {k} has a paraphrased loss but no perturbed losses")
        losses = losses if isinstance(losses, list) else [losses]
        if not losses:
            raise DataError(f"{where}: field 'average_perturb_loss': item {k} has no perturbed answer")
        out[k] = math.exp(p - float(np.mean(losses)))
    return out


def probabilities(log: dict, multiple_choice: bool, where: str = "log") -> dict:
    """Per item exp(−avg_gt_loss), or on a multiple-choice set p(true) / (p(true) + Σ p(perturbed))."""
    gt = _values(log, "avg_gt_loss", where)
    if not multiple_choice:
        return {k: math.exp(-v) for k, v in gt.items()}
    pert = _values(log, "average_perturb_loss", where)
    out = {}
    for k, v in gt.items():
        p_false = sum(math.exp(-x) for x in (pert[k] if isinstance(pert[k], list) else [pert[k]]))
        out[k] = math.exp(-v) / (math.exp(-v) + p_false)
    return out


def items(log: dict, name: str, where: str = "log") -> dict[str, dict]:
    """A TOFU log's per-item values: ``prob``, ``rouge`` and ``truth_ratio`` (R), each {item id: value}.
    A log without paraphrased answers (data that has none) has no truth ratios."""
    has_tr = "avg_paraphrased_loss" in log or "average_perturb_loss" in log
    return {"prob": probabilities(log, name in MULTIPLE_CHOICE, where),
            "rouge": dict(_values(log, "rougeL_recall", where)),
            "truth_ratio": truth_ratios(log, where) if has_tr else {}}


# ---- aggregates of per-item values ----------------------------------------------------------------------

def truth_ratio_score(r, forget: bool) -> float:
    """mean(min(R, 1/R)) on the forget set (1: no preference left), mean(max(0, 1 − R)) elsewhere."""
    r = np.asarray(list(r), dtype=np.float64)
    if not r.size:
        return float("nan")
    return float(np.mean(np.minimum(r, 1 / r)) if forget else np.mean(np.maximum(0.0, 1 - r)))


def forget_quality(model_tr: dict, reference_tr: dict, where: str = "log") -> dict:
    """KS test of the forget truth ratios against the reference model's: p-value and statistic."""
    from scipy.stats import ks_2samp
    a, b = list(model_tr.values()), list(reference_tr.values())
    if len(a) < 2 or len(b) < 2:
        raise DataError(f"{where}: a KS test needs at least 2 forget items on each side ({len(a)} and {len(b)})")
    test = ks_2samp(a, b)
    return {"forget_quality": float(test.pvalue), "ks_statistic": float(test.statistic)}


def aggregate(sets: dict[str, dict], reference: dict[str, dict] | None = None, where: str = "logs") -> dict:
    """Every aggregate of per-item values keyed by set (retain, forget, real_authors, world_facts)."""
    out: dict[str, float] = {}
    for name, v in sets.items():
        out[f"probability_{name}"] = float(np.mean(list(v["prob"].values()))) if v["prob"] else float("nan")
        out[f"rouge_{name}"] = float(np.mean(list(v["rouge"].values()))) if v["rouge"] else float("nan")
        out[f"truth_ratio_{name}"] = truth_ratio_score(v["truth_ratio"].values(), name == "forget")
    util = [out[f"{m}_{s}"] for s in ("retain", "real_authors", "world_facts") if s in sets
            for m in ("probability", "rouge", "truth_ratio")]
    if util and all(math.isfinite(u) for u in util):
        from scipy.stats import hmean
        out["model_utility"] = float(hmean(util)) if min(util) > 0 else 0.0
        out["model_utility_components"] = len(util)
    if reference is not None and "forget" in sets:
        if "forget" not in reference:
            raise DataError(f"{where}: the reference has no forget set ({FILES['forget']})")
        a, b = sets["forget"]["truth_ratio"], reference["forget"]["truth_ratio"]
        if set(a) != set(b):
            raise DataError(f"{where}: the reference's forget items have other ids than the model's "
                            f"({FILES['forget']}: field 'avg_paraphrased_loss')")
        out |= forget_quality(a, b, where)
    return out


# ---- reading logs written elsewhere ---------------------------------------------------------------------

def read_logs(path: str | Path) -> dict[str, dict]:
    """TOFU's eval logs (a folder with its four files, or an eval_log_aggregated.json holding them),
    or open-unlearning's TOFU_EVAL.json (its per-item ``value_by_index`` turned into TOFU's fields)."""
    path = Path(path)
    if path.is_dir():
        agg = path / "eval_log_aggregated.json"
        if agg.exists():
            return _from_aggregated(_load(agg), agg)
        oue = path / "TOFU_EVAL.json"
        if oue.exists():
            return from_open_unlearning(_load(oue), oue)
        missing = [f for f in FILES.values() if not (path / f).exists()]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)} (a TOFU eval folder holds eval_log.json, "
                            "eval_log_forget.json, eval_real_author_wo_options.json and "
                            "eval_real_world_wo_options.json, or one eval_log_aggregated.json)")
        return {name: items(_check(_load(path / f), path / f), name, str(path / f)) for name, f in FILES.items()}
    if not path.exists():
        raise DataError(f"{path}: not found")
    data = _load(path)
    if path.name == "eval_log_aggregated.json" or set(FILES.values()) & set(data):
        return _from_aggregated(data, path)
    return from_open_unlearning(data, path)


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def _check(log: dict, where) -> dict:
    for f in FIELDS:
        if f not in log:
            raise DataError(f"{where}: field {f!r} is missing")
    return log


def _from_aggregated(data: dict, where) -> dict[str, dict]:
    missing = [f for f in FILES.values() if f not in data]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    return {name: items(_check(data[f], f"{where}/{f}"), name, f"{where}/{f}") for name, f in FILES.items()}


OU_SETS = {"retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def from_open_unlearning(data: dict, where) -> dict[str, dict]:
    """open-unlearning's TOFU_EVAL.json: per-item ``value_by_index`` of its metrics (truth ratios as
    ``score`` = p(wrong)/p(right), the TOFU definition; probabilities as ``prob``, normalised on the
    multiple-choice sets; ROUGE as ``rougeL_recall``)."""
    def per_item(metric: str, key: str) -> dict | None:
        entry = data.get(metric)
        if not isinstance(entry, dict) or "value_by_index" not in entry:
            return None
        return {k: v[key] for k, v in entry["value_by_index"].items() if isinstance(v, dict) and v.get(key) is not None}

    out = {}
    tr = per_item("forget_truth_ratio", "score")
    if tr is not None:
        out["forget"] = {"truth_ratio": tr, "prob": per_item("forget_Q_A_Prob", "prob") or {},
                         "rouge": per_item("forget_Q_A_ROUGE", "rougeL_recall") or {}}
    for name, prefix in OU_SETS.items():
        sets = {"truth_ratio": per_item(f"{prefix}_Truth_Ratio", "score"),
                "prob": per_item(f"{prefix}_Q_A_Prob" if name == "retain" else f"{prefix}_Q_A_Prob_normalised", "prob"),
                "rouge": per_item(f"{prefix}_Q_A_ROUGE", "rougeL_recall")}
        if all(v is not None for v in sets.values()):
            out[name] = sets
    if not out:
        raise DataError(f"{where}: neither TOFU eval logs nor an open-unlearning TOFU_EVAL.json (no "
                        "forget_truth_ratio with value_by_index)")
    return out
