"""Figures and the report from records: synthetic records (edge cases), a tiny-model run, Chromium."""
import json
import os
import shutil
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from geffect.plots import RecordsError, load_run, plot_comparison, plot_run, write_report
from geffect.plots import figures as F

GROUPS = ["embed", "shallow", "middle", "deep", "lm"]


def fake_run(path, method="npo+gd", steps=5, nan=False, optional=True, seed=0):
    """A run directory with synthetic records in the formats geffect profile writes."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"run": {"method": method, "steps": steps},
                                                  "profile": {"direction": "grad"}}))
    (path / "summary.json").write_text(json.dumps({
        "method": method, "steps": steps, "seconds_per_step": 1.5, "conflict_fraction": 0.4,
        "before": {"nll_forget": 0.1, "nll_retain": 0.1}, "after": {"nll_forget": 2.0, "nll_retain": 0.5}}))
    recs = pd.DataFrame({"step": range(steps), "nll_forget": np.linspace(0.1, 2, steps),
                         "nll_retain": np.linspace(0.1, 0.5, steps), "loss": rng.normal(size=steps),
                         "weight_mean": np.linspace(1, 0.2, steps), "weight_std": 0.1,
                         "weight_min": 0.05, "weight_max": 1.2})
    if nan:
        recs.loc[0, "nll_retain"] = np.nan
        recs.loc[steps - 1, "weight_std"] = np.nan
    recs.to_csv(path / "records.csv", index=False)
    if not optional:
        return path
    rows = []
    for s in range(steps):
        for risk in ("unlearn", "retain"):
            vals = rng.normal(size=len(GROUPS)) * 10 ** rng.uniform(-2, 4, len(GROUPS))
            if nan and s == 1:
                vals[2] = np.nan
            rows += [{"step": s, "source": "batch", "direction": "grad", "risk": risk, "group": g, "value": v}
                     for g, v in zip(GROUPS, vals)]
            rows.append({"step": s, "source": "batch", "direction": "grad", "risk": risk, "group": "total",
                         "value": np.nansum(vals)})
    pd.DataFrame(rows).to_csv(path / "geffect.csv", index=False)
    pd.DataFrame([{"step": s, "source": "batch", "split": sp, "index": i, "value": rng.normal(), "weight": 1.0}
                  for s in range(steps) for sp in ("forget", "retain") for i in range(4)]).to_csv(
        path / "instances.csv", index=False)
    pd.DataFrame([{"step": s, "group": g, "cosine": rng.uniform(-1, 1), "magnitude_similarity": rng.uniform(),
                   "conflict": bool(rng.integers(2)), "removed_norm": 0.0}
                  for s in range(steps) for g in ["global", *GROUPS]]).to_csv(path / "conflicts.csv", index=False)
    pd.DataFrame([{"step": s, "index": i, "weight": rng.uniform(0, 2), "unlearn": rng.normal() - 3,
                   "retain": rng.normal()} for s in range(0, steps, 2) for i in range(6)]).to_csv(
        path / "pairs.csv", index=False)
    pd.DataFrame([{"step": s, "index": i, "position": p, "token": f" tok{p}", "nll": rng.uniform(0, 5),
                   "weight": np.nan if nan else rng.uniform(),
                   "geffect": rng.normal() if s % 2 == 0 else np.nan} for s in range(steps) for i in range(3)
                  for p in range(12)]).to_csv(path / "tokens.csv", index=False)
    metrics = ("probability_forget", "rouge_forget", "probability_retain", "rouge_retain", "model_utility")
    pd.DataFrame([{"step": s, "metric": m, "value": rng.uniform(), "items": "4+4", "seconds": 1.0}
                  for s in sorted({0, steps // 2, steps}) for m in metrics]).to_csv(path / "eval.csv", index=False)
    return path


def assert_not_blank(png):
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.02, f"{png} looks blank"


@pytest.mark.parametrize("case", ["full", "single_step", "nan", "records_only"])
def test_each_figure_is_drawn_and_not_blank(tmp_path, case):
    run = fake_run(tmp_path / "run", steps=1 if case == "single_step" else 6, nan=case == "nan",
                   optional=case != "records_only")
    paths = plot_run(run)
    names = {p.stem for p in paths}
    if case == "records_only":
        assert names == {"nll", "weights"}   # the optional tables are absent: their figures are skipped
    else:
        assert names == set(F.RUN_FIGURES)
    for p in paths:
        assert_not_blank(p)


def test_each_plot_function_handles_a_missing_table(tmp_path):
    run = load_run(fake_run(tmp_path / "run", optional=False))
    for name in ("geffect_per_step", "geffect_cumulative", "pg_effect_density", "conflicts", "tokens"):
        assert F.RUN_FIGURES[name](run) is None


def test_comparison_figures(tmp_path):
    runs = [fake_run(tmp_path / m.replace("+", "-"), method=m, seed=i)
            for i, m in enumerate(["ga", "npo+gd", "wga"])]
    paths = plot_comparison(runs, tmp_path / "cmp")
    assert {p.stem for p in paths} == set(F.COMPARE_FIGURES)
    for p in paths:
        assert_not_blank(p)


def test_symlog_axis_keeps_sign_and_orders_of_magnitude():
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    vals = np.array([-3e4, -2.0, 0.0, 0.5, 10.0, np.nan])
    ax.plot(range(len(vals)), vals)
    F.symlog_axis(ax, vals)
    assert ax.get_yscale() == "symlog"
    lo, hi = ax.get_ylim()
    assert lo < -1e4 and hi > 5
    plt.close(fig)


def test_bad_records_name_file_and_field(tmp_path):
    run = fake_run(tmp_path / "run")
    pd.read_csv(run / "geffect.csv").drop(columns=["risk"]).to_csv(run / "geffect.csv", index=False)
    with pytest.raises(RecordsError, match=r"geffect\.csv.*risk"):
        load_run(run)
    run2 = fake_run(tmp_path / "run2")
    (run2 / "records.csv").write_text("step,nll_forget,nll_retain\n0,0.1,0.1\n1,oops,0.2\n")
    with pytest.raises(RecordsError, match=r"records\.csv:3: field 'nll_forget'"):
        load_run(run2)
    with pytest.raises(RecordsError, match="summary.json"):
        (run2 / "summary.json").unlink()
        load_run(run2)


def test_plot_cli_on_a_tiny_model_run(tmp_path, capsys):
    from geffect.cli import main
    runs = []
    for m in ("gd", "wga+kl"):
        out = tmp_path / m.replace("+", "-")
        assert main(["profile", "--model", "tiny-llama", "--method", m, "--steps", "3", "--memorize", "no",
                     "--pairs-every", "1", "--tokens-every", "2", "--eval-every", "2", "--eval-size", "3",
                     "--eval-max-new-tokens", "3", "--out", str(out), "--no-progress", "--no-save-model",
                     "--no-report"]) == 0
        runs.append(out)
    assert not (runs[0] / "report.html").exists()
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    assert "comparison: 5 figures" in capsys.readouterr().out
    for r in runs:
        assert (r / "report.html").exists()
        for p in (r / "figures").glob("*.png"):
            assert_not_blank(p)
    assert {p.stem for p in (runs[1] / "figures").glob("*.png")} == set(F.RUN_FIGURES)
    tokens = pd.read_csv(runs[1] / "tokens.csv")
    assert tokens["weight"].between(0, 1).all()   # WGA weights p_t^α
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("GEFFECT_REQUIRE_CHROMIUM"):
        pytest.fail("Chromium is required (apt-get install chromium)")
    pytest.skip("Chromium not installed (the CI set-up installs Debian's chromium)")


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    run = fake_run(tmp_path / "run")
    report = write_report(run, plot_run(run))
    html = report.read_text()
    assert html.count("data:image/png;base64,") == len(F.RUN_FIGURES) and "src='figures/" not in html
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], check=True, capture_output=True, text=True, timeout=120)
    assert "geffect report: npo+gd" in dom.stdout and "cumulative e_u" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.exists()
    assert_not_blank(shot)
    # the images decoded: the page is taller than its text alone, and a JS check confirms every image loaded
    js = tmp_path / "check.html"
    js.write_text(html.replace("</body>", "<script>window.onload=()=>{const ok=[...document.images].every("
                                          "i=>i.complete&&i.naturalWidth>0);document.title='IMAGES_'+(ok?'OK':'BAD')"
                                          "}</script></body>"))
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", js.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120)
    assert "IMAGES_OK" in dom.stdout
