"""geffect diagnose: exact weight restore, ranking on synthetic numbers, JSON schema, CLI."""
import json
import random

import matplotlib.image as mpimg
import pytest
import torch

from geffect.apps.diagnose import (
    default_candidates,
    diagnose,
    dominates,
    pareto_ranks,
    recommend,
    restore,
)
from geffect.config import DiagnoseConfig, UnlearnConfig
from geffect.models import tiny_model

BASE = UnlearnConfig(model="tiny-llama", memorize="no", seed=0)


def test_default_candidates_cover_every_objective_and_variant():
    c = default_candidates()
    assert len(c) == len(set(c)) == 8 * 5 + 2 * 2
    for m in ("ga", "ga+gd", "ga+kl", "ga+gd+pcgrad", "npo+kl+pcgrad", "rmu", "rmu+pcgrad", "llmu+pcgrad"):
        assert m in c


def test_pareto_front_and_tie_break_by_hand():
    pts = {"a": (3.0, -1.0), "b": (1.0, 1.0), "c": (0.5, 0.5), "d": (2.0, -2.0), "e": (-1.0, 5.0),
           "f": (1.0, 1.0)}
    fronts, ranks = pareto_ranks(pts)
    assert {k for k, f in fronts.items() if f == 1} == {"a", "b", "e", "f"}
    assert fronts["c"] == 2 and fronts["d"] == 2
    # front 1: removing candidates first (b, f tie -> name order), then a; e (no removal) last in its front
    assert [k for k, _ in sorted(ranks.items(), key=lambda kv: kv[1])] == ["b", "f", "a", "e", "c", "d"]


@pytest.mark.parametrize("seed", range(10))
def test_a_dominated_candidate_never_ranks_above_its_dominator(seed):
    rng = random.Random(seed)
    pts = {f"m{i}": (rng.choice([rng.gauss(0, 1), 0.5]), rng.choice([rng.gauss(0, 1), -0.5])) for i in range(25)}
    pts["nan"] = (float("nan"), 1.0)
    fronts, ranks = pareto_ranks(pts)
    assert sorted(ranks.values()) == list(range(1, len(pts) + 1))
    assert ranks["nan"] == len(pts)
    for a, pa in pts.items():
        for b, pb in pts.items():
            if a != "nan" and b != "nan" and dominates(pa, pb):
                assert ranks[a] < ranks[b] and fronts[a] < fronts[b]
    front = [k for k in pts if fronts[k] == 1]
    for k in front:   # nothing dominates a front member
        assert not any(dominates(pts[j], pts[k]) for j in pts if j != "nan")


def test_recommendation_is_derived_from_the_numbers():
    recs = [{"method": "x", "rank": 1, "pareto": True, "removal": 0.2, "retention": -0.01, "steps": 2,
             "nll_forget_change": 0.3, "nll_retain_change": 0.01, "share_unlearn": {"lm": 0.1},
             "e_r_groups": {"shallow": -1.0, "lm": 0.5}, "conflict_fraction": 0.0},
            {"method": "y", "rank": 2, "pareto": False, "removal": 0.1, "retention": -0.05, "steps": 2,
             "nll_forget_change": 0.1, "nll_retain_change": 0.05, "share_unlearn": {"lm": 0.8},
             "e_r_groups": {"shallow": -3.0, "lm": 0.1}, "conflict_fraction": 0.9}]
    text = recommend(recs)
    assert text.startswith("Recommended: x")
    assert "dominated by x" in text and "lm head (80% of e_u)" in text and "shallow layers" in text
    assert "conflict in 90% of steps" in text
    recs[0]["removal"] = -0.1
    recs[0]["rank"], recs[1]["rank"] = 1, 2
    assert recommend(recs).startswith("No candidate raises the forget risk")


def test_restore_is_exact_and_reenables_gradients():
    loaded = tiny_model("tiny-llama", seed=0)
    snap = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p))
    loaded.model.requires_grad_(False)
    restore(loaded.model, snap)
    assert all(torch.equal(v, snap[k]) for k, v in loaded.model.state_dict().items())
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_candidates_start_from_the_same_weights(tmp_path):
    """Order does not matter (each candidate starts from the restored weights), and the model is
    left as it was."""
    methods = ["ga", "rmu", "npo+gd+pcgrad"]
    loaded = tiny_model("tiny-llama", seed=0)
    initial = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    dcfg = DiagnoseConfig(methods=methods, steps=2, lr=1e-3)
    a = diagnose(BASE, dcfg, progress=False, loaded=loaded)
    assert all(torch.equal(v, initial[k]) for k, v in loaded.model.state_dict().items())
    b = diagnose(BASE, DiagnoseConfig(methods=methods[::-1], steps=2, lr=1e-3), progress=False, loaded=loaded)
    ra, rb = ({r["method"]: r for r in res["candidates"]} for res in (a, b))
    for m in methods:
        assert ra[m]["restored_exactly"] and rb[m]["restored_exactly"]
        for key in ("e_u", "e_r", "nll_forget_change", "nll_retain_change"):
            assert ra[m][key] == pytest.approx(rb[m][key], rel=1e-4, abs=1e-9)
    # the first-order prediction (in-batch, to first order) tracks the measured change: same sign,
    # within a factor of two
    for r in a["candidates"]:
        pred, meas = r["predicted_forget_risk_change"], r["nll_forget_change"]
        assert pred * meas > 0 and 0.5 < pred / meas < 2, r["method"]


def test_shared_base_probe_gives_the_same_records_and_ranking(monkeypatch):
    """The probe's captures at the restored weights, taken once for all candidates (RMU, which
    freezes most parameters, keyed apart), give every candidate the records and rank it gets with
    its own captures."""
    from geffect.engine.engine import Engine
    methods = ["rmu", "gd", "npo+gd", "simnpo"]
    loaded = tiny_model("tiny-llama", seed=0)
    dcfg = DiagnoseConfig(methods=methods, steps=2, lr=1e-3)
    calls = []
    original = Engine.capture_probe
    monkeypatch.setattr(Engine, "capture_probe", lambda self, p: calls.append(1) or original(self, p))
    shared = diagnose(BASE, dcfg, progress=False, loaded=loaded)
    n_shared = len(calls)
    own = diagnose(BASE, dcfg, progress=False, loaded=loaded, share_probe=False)
    # one probe chunk per step: 2 steps x 4 candidates alone; shared, the first steps of gd, npo+gd and
    # simnpo (all parameters train) take one capture between them, rmu's its own
    assert len(calls) - n_shared == 8 and n_shared == 8 - 2
    assert [r["method"] for r in shared["candidates"]] == [r["method"] for r in own["candidates"]]
    assert shared["recommendation"] == own["recommendation"]
    for a, b in zip(shared["candidates"], own["candidates"]):
        for key, v in b.items():
            if not key.startswith("seconds") and isinstance(v, float):
                assert a[key] == pytest.approx(v, rel=1e-6, abs=1e-12, nan_ok=True), (a["method"], key)


def test_diagnose_cli_writes_json_csv_and_figure(tmp_path, capsys):
    from geffect.cli import main
    out = tmp_path / "diag"
    rc = main(["diagnose", "--model", "tiny-gpt2", "--memorize", "no", "--methods", "ga", "gd", "npo+kl",
               "gd+pcgrad", "--steps", "2", "--lr", "1e-3", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "basis:" in printed and ("Recommended:" in printed or "No candidate" in printed)
    res = json.loads((out / "diagnosis.json").read_text())
    assert "update" in res["basis"] and res["recommendation"]
    recs = res["candidates"]
    assert [r["rank"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert {"method", "e_u", "e_r", "e_u_groups", "e_r_groups", "rank", "pareto", "front",
                "conflict_fraction", "nll_forget_change", "seconds_per_step"} <= set(r)
        assert set(r["e_u_groups"]) == {"embed", "shallow", "middle", "deep", "lm"}
        assert sum(r["e_u_groups"].values()) == pytest.approx(r["e_u"], rel=1e-6, abs=1e-12)
    assert any(r["pareto"] for r in recs)
    csv = (out / "diagnosis.csv").read_text().splitlines()
    assert csv[0].startswith("method,") and len(csv) == 5
    img = mpimg.imread(out / "diagnosis.png")
    assert img[..., :3].std() > 0.02
    assert main(["diagnose", "--model", "tiny-gpt2", "--methods", "nope", "--memorize", "no"]) == 2
    assert main(["diagnose", "--model", "tiny-gpt2", "--methods", "ga", "--memorize", "no", "--out", str(out),
                 "--no-progress"]) == 2     # refuses to overwrite


def test_agreement_statistics():
    from geffect.apps.diagnose import agreement
    recs = [{"predicted_forget_risk_change": p, "nll_forget_change": m, "predicted_retain_risk_change": -p,
             "nll_retain_change": m2} for p, m, m2 in [(0.1, 0.05, 0.3), (0.2, 0.07, -0.1), (0.4, 0.3, 0.2),
                                                       (-0.1, -0.02, 0.0)]]
    a = agreement(recs)
    assert a["nll_forget_change"] == {"spearman": pytest.approx(1.0), "sign_agreement": 1.0}
    assert -1 <= a["nll_retain_change"]["spearman"] <= 1


def test_retain_prediction_is_on_the_same_rows_as_the_measured_change():
    """e_r comes from the probe's fixed retain sample, the rows of the NLL check: over one small step
    the predicted first-order retain-risk change equals the measured one up to second order. (Here
    the in-batch e_r would predict the wrong sign for GD: its retain part trains on the batch rows.)"""
    loaded = tiny_model("tiny-llama", seed=0)
    res = diagnose(BASE, DiagnoseConfig(methods=["gd", "npo+gd", "ga"], steps=1, lr=1e-5), progress=False,
                   loaded=loaded)
    for r in res["candidates"]:
        assert r["e_r_source"] == "probe"
        pred, meas = r["predicted_retain_risk_change"], r["nll_retain_change"]
        assert abs(pred - meas) <= 0.1 * abs(meas) + 1e-7, (r["method"], pred, meas)
    gd = next(r for r in res["candidates"] if r["method"] == "gd")
    assert gd["predicted_retain_risk_change_batch"] * gd["nll_retain_change"] < 0


def test_diagnose_eval_adds_each_candidates_outcome(tmp_path, capsys):
    """--eval: TOFU's metrics of each candidate's weights after its steps, the same as evaluating
    those weights directly; the before values are the restored weights'."""
    from geffect.cli import main
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", "tiny-llama", "--memorize", "no", "--methods", "ga", "gd", "--steps", "1",
                 "--lr", "1e-2", "--eval", "--eval-size", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "p_forget" in printed and "utility" in printed
    res = json.loads((out / "diagnosis.json").read_text())
    assert {"probability_forget", "model_utility"} <= set(res["before"]["tofu"])
    by = {r["method"]: r for r in res["candidates"]}
    for r in by.values():
        assert r["eval_change"]["probability_forget"] == pytest.approx(
            r["eval"]["probability_forget"] - res["before"]["tofu"]["probability_forget"])
    # GA at lr 1e-2 lowers the forget probability more than GD, which trains on the retain rows
    assert by["ga"]["eval"]["probability_forget"] < by["gd"]["eval"]["probability_forget"]
    assert "eval_model_utility" in (out / "diagnosis.csv").read_text().splitlines()[0]
