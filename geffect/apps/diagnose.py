"""Diagnose: compare unlearning objectives on the user's data from a few profiled steps each.

Every candidate starts from the same weights (restored exactly and verified before each one),
sees the same batches, and runs K profiled steps at its own learning rate.

Scale-free basis: the G-effect along each candidate's actual optimizer update (direction
``update``, V = −Δθ/η). Then −η·e is the first-order change of the risk per step, in nats, whatever
the objective's loss scale (an RMU loss and an NPO loss are not in the same units, but the risk
changes they cause are). Summed over the K steps:

    predicted ΔR_u = −Σ_t η_t·e_u(t)   (removal: want > 0)
    predicted ΔR_r = −Σ_t η_t·e_r(t)   (retention damage: want ≤ 0)

Each is checked against the measured NLL change on the forget set and a retain sample. e_u comes
from the step's forget rows; e_r from the probe (``probe_forget=False``): the same fixed retain
sample as the NLL check, at each step's weights. In-batch retain rows would be biased for
candidates with a retain part, which trains on exactly those rows (it predicted retention with a
Spearman of 0.30 against the measured change on the default, against 0.85 for removal).

Ranking, no hand-tuned score: non-dominated sorting over (removal = ΔR_u, retention = −ΔR_r),
both to be maximised; front 1 is the Pareto front. Tie-break within a front: candidates that
remove at all (ΔR_u > 0) before those that do not, then larger retention (least retention
damage), then larger removal, then the name. Fronts come first, so a dominated candidate is
never ranked above one that dominates it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch

from geffect.config import DiagnoseConfig
from geffect.objectives.registry import FORGET, retain_names


def default_candidates() -> list[str]:
    """Every forget objective alone and with each retain regulariser, plus +pcgrad where a retain part
    exists (an objective with its own retain part: alone and +pcgrad). RMU's variants and TVN are
    left out (name them with ``--methods``)."""
    out = []
    for name, entry in FORGET.items():
        if not entry.candidate:         # RMU's reference variants and TVN (needs --lora): name them with --methods
            continue
        if entry.own_retain:
            out += [name, f"{name}+pcgrad"]
            continue
        out.append(name)
        for r in retain_names():
            out += [f"{name}+{r}", f"{name}+{r}+pcgrad"]
    return out


# ---- ranking (pure functions on numbers) ------------------------------------------------------

def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a dominates b: at least as good on both objectives (maximised) and better on one."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_ranks(points: dict[str, tuple[float, float]]) -> tuple[dict[str, int], dict[str, int]]:
    """Non-dominated sorting of (removal, retention). Returns (front per name, rank per name):
    front 1 is the Pareto front; ranks order fronts, then the tie-break (retention, removal, name)."""
    left = {k: v for k, v in points.items() if all(math.isfinite(x) for x in v)}   # NaN points go last
    front_of, front = {}, 1
    while left:
        nd = [k for k, v in left.items() if not any(dominates(w, v) for j, w in left.items() if j != k)]
        for k in nd:
            front_of[k] = front
            del left[k]
        front += 1
    for k in points:
        front_of.setdefault(k, front)
    order = sorted(points, key=lambda k: (front_of[k], not points[k][0] > 0, -_nan_low(points[k][1]),
                                          -_nan_low(points[k][0]), k))
    return front_of, {k: i + 1 for i, k in enumerate(order)}


def _nan_low(x: float) -> float:
    return x if math.isfinite(x) else float("-inf")


def recommend(records: list[dict]) -> str:
    """A recommendation in words, derived only from the numbers in ``records``."""
    if not records:
        return "No candidates."
    ranked = sorted(records, key=lambda r: r["rank"])
    best = ranked[0]
    if not best["removal"] > 0:
        return (f"No candidate raises the forget risk in {best['steps']} steps at this learning rate "
                f"(best on the front: {best['method']}); raise --steps or --lr.")
    lines = [(f"Recommended: {best['method']} — on the Pareto front, the removing candidate with the least "
              "retention damage "
              f"(predicted forget-risk rise {best['removal']:+.3g} nats, retain-risk change "
              f"{-best['retention']:+.3g} nats over {best['steps']} steps; measured forget NLL "
              f"{best['nll_forget_change']:+.3g}, retain NLL {best['nll_retain_change']:+.3g}).")]
    front = [r["method"] for r in ranked if r["pareto"]]
    if len(front) > 1:
        lines.append(f"Pareto front ({len(front)}): {', '.join(front)}; moving along it trades retention for "
                     "removal.")
    for r in ranked[1:]:
        why = reasons(r, records)
        if why:
            lines.append(f"- {r['method']} (rank {r['rank']}): {'; '.join(why)}.")
    return "\n".join(lines)


def reasons(r: dict, records: list[dict]) -> list[str]:
    why = []
    if not r["pareto"]:
        dom = [o["method"] for o in records if o is not r and dominates((o["removal"], o["retention"]),
                                                                        (r["removal"], r["retention"]))]
        if dom:
            why.append(f"dominated by {', '.join(dom[:3])}{' …' if len(dom) > 3 else ''}")
    if not r["removal"] > 0:
        why.append("does not raise the forget risk (e_u ≥ 0)")
    share = r.get("share_unlearn", {})
    if 0.5 < share.get("lm", 0) <= 1:
        why.append(f"removal dominated by the lm head ({100 * share['lm']:.0f}% of e_u)")
    neg = {g: v for g, v in r.get("e_r_groups", {}).items() if v < 0}
    if r["retention"] < 0 and neg:
        worst = min(neg, key=neg.get)
        why.append(f"retaining G-effect most negative in the {worst} layers")
    if r.get("conflict_fraction") is not None and r["conflict_fraction"] > 0.5:
        why.append(f"forget and retain parts conflict in {100 * r['conflict_fraction']:.0f}% of steps")
    return why


# ---- running the candidates -------------------------------------------------------------------

def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Copy the snapshot back, re-enable every gradient, and verify bit-for-bit equality."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(snapshot[k])
    model.requires_grad_(True)
    bad = [k for k, v in model.state_dict().items() if v.shape != snapshot[k].shape or (v != snapshot[k]).any()]
    if bad:
        raise RuntimeError(f"weights not restored exactly: {bad[:3]}")


def _candidate_record(method: str, summary: dict, steps: int, lr_of) -> dict:
    """One candidate's numbers: e_u from the batch's forget rows, e_r from the fixed retain sample of
    the probe (the batch's retain rows when no probe rows exist)."""
    groups = summary.get("groups", [])
    has_probe = any(r["source"] == "probe" and r["risk"] == "retain" for r in summary["geffect"])
    basis = {"unlearn": "batch", "retain": "probe" if has_probe else "batch"}
    cum, final, pred = {}, {}, {"unlearn": 0.0, "retain": 0.0}
    pred_batch_retain = 0.0
    rows = [r for r in summary["geffect"] if r["source"] == basis[r["risk"]]]
    last = max((r["step"] for r in rows), default=0)
    for r in summary["geffect"]:
        if r["source"] == "batch" and r["risk"] == "retain" and r["group"] == "total":
            pred_batch_retain += -lr_of(r["step"]) * r["value"]
    for r in rows:
        key = (r["risk"], r["group"])
        cum[key] = cum.get(key, 0.0) + r["value"]
        if r["group"] == "total":
            pred[r["risk"]] += -lr_of(r["step"]) * r["value"]     # ΔR ≈ −η·e along the update
        if r["step"] == last:
            final[key] = r["value"]
    e_u, e_r = cum.get(("unlearn", "total"), float("nan")), cum.get(("retain", "total"), float("nan"))
    rec = {"method": method, "steps": steps,
           "e_u": e_u, "e_r": e_r, "e_r_source": basis["retain"],
           "e_u_final": final.get(("unlearn", "total"), float("nan")),
           "e_r_final": final.get(("retain", "total"), float("nan")),
           "e_u_groups": {g: cum.get(("unlearn", g), 0.0) for g in groups},
           "e_r_groups": {g: cum.get(("retain", g), 0.0) for g in groups},
           "removal": pred["unlearn"], "retention": -pred["retain"],
           "predicted_forget_risk_change": pred["unlearn"], "predicted_retain_risk_change": pred["retain"],
           "predicted_retain_risk_change_batch": pred_batch_retain}
    # share of each group in the removal (only meaningful when the total removes: e_u < 0)
    rec["share_unlearn"] = {g: (v / e_u if e_u < 0 else float("nan")) for g, v in rec["e_u_groups"].items()}
    b, a = summary["before"], summary["after"]
    rec["nll_forget_change"] = a["nll_forget"] - b["nll_forget"]
    rec["nll_retain_change"] = a["nll_retain"] - b["nll_retain"]
    if "tofu" in a:                              # --eval: the outcome metrics after the steps, and their change
        rec["eval"] = a["tofu"]
        rec["eval_change"] = {k: v - b["tofu"][k] for k, v in a["tofu"].items() if k in b.get("tofu", {})}
    conf = [r for r in summary.get("conflicts", []) if r["group"] == "global"]
    rec["conflict_fraction"] = sum(r["conflict"] for r in conf) / len(conf) if conf else None
    rec["conflict_cosine"] = sum(r["cosine"] for r in conf) / len(conf) if conf else None
    ws = [(r.get("weight_mean"), r.get("weight_std")) for r in summary["records"]]
    cv = [s / m for m, s in ws if m is not None and s is not None and math.isfinite(m) and math.isfinite(s) and m]
    rec["weight_cv"] = sum(cv) / len(cv) if cv else None   # weight concentration: std/mean
    rec["seconds_per_step"] = summary["seconds_per_step"]
    return rec


def diagnose(base, dcfg: DiagnoseConfig, out: str | None = None, overwrite: bool = False,
             progress: bool = True, loaded=None, share_probe: bool = True) -> dict:
    """Run every candidate for ``dcfg.steps`` profiled steps from the same weights; rank them.

    ``base`` is an :class:`UnlearnConfig` giving the model, data, memorisation, max length and seed.
    Returns {"basis", "candidates": [record…], "recommendation"}; writes diagnosis.json,
    diagnosis.csv, geffect.csv, conflicts.csv and diagnosis.png into ``out``. ``share_probe``: the
    probe's captures at the restored weights are taken once for all candidates (off: once each;
    the records are the same).
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    from geffect.config import ProfileConfig, validate
    from geffect.engine.probe import BaseProbe, probe_retain_indices
    from geffect.eval.nll import evaluate_nll
    from geffect.loop import unlearn
    from geffect.objectives import parse_method
    from geffect.reference import Reference
    from geffect.rundir import RunDir
    from geffect.session import prepare

    validate(dcfg)
    methods = dcfg.methods or default_candidates()
    for m in methods:
        parse_method(m)     # fail before any work on a bad name
    run = RunDir(out, overwrite)
    t0 = time.perf_counter()
    st = prepare(replace(base, method="ga"), None, loaded, profile=ProfileConfig())
    with run:
        model, tok, data, loaded = st.model, st.tokenizer, st.data, st.loaded
        # the NLL check's retain sample is the probe's: predicted and measured e_r concern the same rows
        retain_sample = [data.retain[i] for i in probe_retain_indices(len(data.retain), dcfg.eval_retain, base.seed)]

        outcome = None
        if dcfg.eval:
            from geffect.eval.suite import RunEvaluator
            outcome = RunEvaluator(tok, data.forget, data.retain, base.prompt_format, base.max_length, dcfg.eval_size,
                                   24, base.seed)

        def evaluate(m):
            out = {"nll_forget": evaluate_nll(m, tok, data.forget, base.max_length, fmt=base.prompt_format),
                   "nll_retain": evaluate_nll(m, tok, retain_sample, base.max_length, fmt=base.prompt_format)}
            if outcome is not None:
                out["tofu"] = {r["metric"]: r["value"] for r in outcome(m, 0)}
            return out

        model.eval()
        before = evaluate(model)
        snap = snapshot(model)
        reference = Reference.frozen_copy(model)   # θ_o is the same for every candidate: one copy
        records, effect_rows, conflict_rows = [], [], []
        cfg = replace(base, steps=dcfg.steps, lr=dcfg.lr, warmup_steps=0, forget_batch=dcfg.forget_batch,
                      retain_batch=dcfg.retain_batch, grad_accum=1, epochs=None, memorize="no",
                      save_model=False, progress=False, pcgrad=False)
        prof = ProfileConfig(direction="update", pairs_every=0, tokens_every=0, conflicts=True, probe_every=1,
                             probe_retain=dcfg.eval_retain, probe_forget=False)
        base_probe = BaseProbe() if share_probe else None   # every candidate's first probe: the same weights
        bar = tqdm(methods, desc="diagnose", disable=not progress)
        for method in bar:
            bar.set_description(f"diagnose {method}")
            restore(model, snap)
            if base_probe is not None:
                base_probe.at_base()
            tc = time.perf_counter()
            calls = []

            def evaluate_once(m, calls=calls):
                calls.append(1)  # first call: the restored (verified) weights, whose NLL is ``before``
                return before if len(calls) == 1 else evaluate(m)

            summary = unlearn(replace(cfg, method=method), loaded=loaded, profile=prof, evaluate=evaluate_once,
                              reference=reference, base_probe=base_probe)
            rec = _candidate_record(method, summary, dcfg.steps, lambda step: dcfg.lr)
            rec["restored_exactly"] = True
            rec["seconds"] = time.perf_counter() - tc
            records.append(rec)
            effect_rows += [{"method": method, **r} for r in summary["geffect"]]
            conflict_rows += [{"method": method, **r} for r in summary["conflicts"]]
            if progress:
                tqdm.write(f"  {method:<22} predicted ΔR_u {rec['removal']:+.3g}  ΔR_r "
                           f"{rec['predicted_retain_risk_change']:+.3g}   measured ΔNLL forget "
                           f"{rec['nll_forget_change']:+.3g} retain {rec['nll_retain_change']:+.3g}  "
                           f"({rec['seconds']:.0f} s)")
        restore(model, snap)
        fronts, ranks = pareto_ranks({r["method"]: (r["removal"], r["retention"]) for r in records})
        for r in records:
            r["front"], r["rank"], r["pareto"] = fronts[r["method"]], ranks[r["method"]], fronts[r["method"]] == 1
        records.sort(key=lambda r: r["rank"])
        result = {"basis": BASIS.format(lr=dcfg.lr, steps=dcfg.steps), "model": base.model, "before": before,
                  "config": {"run": asdict(cfg), "diagnose": asdict(dcfg) | {"methods": methods}},
                  "candidates": records, "recommendation": recommend(records), "agreement": agreement(records),
                  "seconds": time.perf_counter() - t0}
        if run.path is not None:
            write_diagnosis(run, result, effect_rows, conflict_rows, groups=summary.get("groups", []))
            result["out"] = str(run.commit())
    return result


def write_diagnosis(run, result: dict, effect_rows: list[dict], conflict_rows: list[dict], groups: list[str]) -> None:
    """diagnosis.json, diagnosis.csv (one flat row per candidate), geffect.csv and conflicts.csv (the
    candidates' records with a leading ``method`` column) and diagnosis.png."""
    import pandas as pd

    from geffect.plots.figures import diagnosis_plane
    from geffect.records import RecordWriter
    run.write_json("diagnosis.json", result)
    pd.DataFrame([flat_record(r) for r in result["candidates"]]).to_csv(run.path / "diagnosis.csv", index=False)
    with RecordWriter(run.path, groups, keep=False, lead=("method",)) as rec:
        rec.add("geffect", effect_rows)
        rec.add("conflicts", conflict_rows)
    fig = diagnosis_plane(result["candidates"], result["basis"])
    fig.savefig(run.path / "diagnosis.png", dpi=90)


BASIS = ("G-effect along each candidate's actual optimizer update (AdamW, lr {lr:g}, no warm-up), "
         "summed over {steps} steps and multiplied by −lr: the first-order change of the forget risk "
         "(removal, want > 0; the steps' forget rows) and of the retain risk (want ≤ 0; the fixed retain "
         "sample of the NLL check), in nats per answer token.")


def agreement(records: list[dict]) -> dict:
    """How well the predicted first-order risk changes match the measured NLL changes."""
    import numpy as np
    import pandas as pd
    out = {}
    for pred, meas in (("predicted_forget_risk_change", "nll_forget_change"),
                       ("predicted_retain_risk_change", "nll_retain_change")):
        x = np.array([r[pred] for r in records], dtype=float)
        y = np.array([r[meas] for r in records], dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 3 and x[ok].std() > 0 and y[ok].std() > 0:
            rx, ry = pd.Series(x[ok]).rank(), pd.Series(y[ok]).rank()   # Spearman = Pearson of ranks
            out[meas] = {"spearman": float(rx.corr(ry)),
                         "sign_agreement": float((np.sign(x[ok]) == np.sign(y[ok])).mean())}
    return out


def flat_record(r: dict) -> dict:
    out = {k: v for k, v in r.items() if not isinstance(v, dict)}
    for key in ("e_u_groups", "e_r_groups", "share_unlearn"):
        out.update({f"{key.replace('_groups', '')}_{g}": v for g, v in r.get(key, {}).items()})
    for key in ("eval", "eval_change"):
        out.update({f"{key}_{m}": v for m, v in r.get(key, {}).items()})
    return out
