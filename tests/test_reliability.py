"""Nothing lost, nothing hidden (issue 17): bad options and files, divergence, interruption and
resume, concurrent runs, safe output folders, report and record integrity."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from geffect.cli import main

TINY = ["--model", "tiny-llama", "--memorize", "no", "--no-progress"]


@pytest.fixture
def files(tmp_path):
    """Good forget/retain files, and bad ones: not UTF-8, a folder, broken JSON, a missing field."""
    from geffect.data import default_splits
    sp = default_splits(0)
    out = {}
    for name in ("forget", "retain"):
        p = tmp_path / f"{name}.json"       # JSON Lines under a .json name, as TOFU ships them
        p.write_text("\n".join(json.dumps({"question": r.question, "answer": r.answer}) for r in sp[name][:4]))
        out[name] = str(p)
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "Qui?", "answer": "Genève"}\n'.encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.jsonl").write_text('{"question": "Q", "answer": "A"}\n{"question": \n')
    return out


def _model_dirs(tmp_path):
    """A folder that is not a model, damaged safetensors, a damaged GGUF, BERT and T5 folders."""
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    from geffect.models import tiny_model
    d = {"notmodel": tmp_path / "notmodel", "corrupt": tmp_path / "corrupt", "bert": tmp_path / "bert",
         "t5": tmp_path / "t5"}
    d["notmodel"].mkdir()
    (d["notmodel"] / "readme.txt").write_text("hello")
    tm = tiny_model("tiny-llama")
    tm.model.save_pretrained(d["corrupt"])
    tm.tokenizer.save_pretrained(d["corrupt"])
    w = d["corrupt"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=300)).save_pretrained(d["bert"])
    tm.tokenizer.save_pretrained(d["bert"])
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=300,
                                        d_kv=16)).save_pretrained(d["t5"])
    tm.tokenizer.save_pretrained(d["t5"])
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    d["gguf"] = gguf
    return d


# (verb, arguments, text the one-line message must contain). {f}/{r}: good data files; {t}: tmp_path
BAD = [
    ("unlearn", ["--steps", "-3"], "--steps"),
    ("unlearn", ["--epochs", "0"], "--epochs"),
    ("unlearn", ["--retain-batch", "0"], "--retain-batch"),
    ("unlearn", ["--forget-batch", "-1"], "--forget-batch"),
    ("unlearn", ["--grad-accum", "0"], "--grad-accum"),
    ("unlearn", ["--memorize", "maybe"], "--memorize"),
    ("profile", ["--direction", "sideways"], "--direction"),
    ("profile", ["--resolution", "atoms"], "--resolution"),
    ("profile", ["--steps", "0"], "--steps"),
    ("unlearn", ["--clip", "-1"], "--clip"),
    ("unlearn", ["--optimizer", "adam"], "--optimizer"),
    ("unlearn", ["--lr", "nan"], "--lr"),
    ("unlearn", ["--lr=-1e-5"], "--lr"),
    ("unlearn", ["--warmup-steps", "-1"], "--warmup-steps"),
    ("unlearn", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("unlearn", ["--max-length", "2"], "--max-length"),
    ("profile", ["--boundaries", "5,1"], "--boundaries"),
    ("profile", ["--boundaries", "1,9"], "--boundaries"),
    ("profile", ["--boundaries", "x"], "--boundaries"),
    ("profile", ["--group-map", "lm_head=nowhere"], "--group-map"),
    ("profile", ["--blocks-path", "model.nothing"], "--blocks-path"),
    ("profile", ["--probe-retain", "0"], "--probe-retain"),
    ("profile", ["--pairs-every", "-1"], "--pairs-every"),
    ("unlearn", ["--method", "npo", "--npo-beta", "0"], "--npo-beta"),
    ("unlearn", ["--method", "nope"], "--method"),
    ("unlearn", ["--method", "npo+pcgrad"], "--method"),
    ("unlearn", ["--method", "npo", "--pcgrad"], "--pcgrad"),
    ("unlearn", ["--pcgrad-scope", "layer"], "--pcgrad-scope"),
    ("unlearn", ["--checkpoint-every", "-1"], "--checkpoint-every"),
    ("unlearn", ["--on-nonfinite", "maybe"], "--on-nonfinite"),
    ("unlearn", ["--dtype", "int8"], "--dtype"),
    ("unlearn", ["--device", "tpu"], "--device"),
    ("unlearn", ["--method", "npo+kl", "--reference", "cache"], "--reference"),
    ("unlearn", ["--lora", "r=0"], "--lora"),
    ("unlearn", ["--steps", "abc"], "--steps"),
    ("unlearn", ["--forget", "{t}/missing.jsonl"], "missing.jsonl"),
    ("unlearn", ["--forget", "{t}/latin1.jsonl"], "latin1.jsonl:1: not UTF-8"),
    ("unlearn", ["--forget", "{t}/folder"], "is a folder"),
    ("unlearn", ["--forget", "{t}/broken.jsonl"], "broken.jsonl:2: invalid JSON"),
    ("unlearn", ["--out", "{t}/a-file.txt"], "is a file"),
    ("unlearn", ["--out", "/proc/geffect-cannot-write"], "cannot write"),
]
MODELS = [("notmodel", "not a Hugging Face model folder"), ("corrupt", "cannot be loaded"),
          ("bert", "not a causal"), ("t5", "not a causal"), ("gguf", "not a readable GGUF")]


def _fails(capsys, verb, args, needle, out):
    try:
        rc = main([verb, *args, "--out", str(out)] if "--out" not in args else [verb, *args])
    except SystemExit as e:           # argparse's own errors (a value that is not a number)
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, (args, rc, err)
    assert err.startswith("geffect: error:") and len(err.splitlines()) == 1, err
    assert needle in err, (needle, err)


@pytest.mark.parametrize("verb,args,needle", BAD)
def test_bad_options_and_files_fail_in_one_line_before_any_folder(tmp_path, capsys, files, verb, args, needle):
    (tmp_path / "a-file.txt").write_text("mine")
    args = [a.format(t=tmp_path) for a in args]
    base = [] if any(a.startswith("--forget") for a in args) else ["--forget", files["forget"]]
    base += ["--retain", files["retain"]]
    out = tmp_path / "run"
    _fails(capsys, verb, TINY + base + ["--steps", "2"] + args if "--steps" not in args else TINY + base + args,
           needle, out)
    assert not out.exists() and not out.with_name("run.partial").exists()
    assert (tmp_path / "a-file.txt").read_text() == "mine"


@pytest.mark.parametrize("kind,needle", MODELS)
def test_bad_models_fail_in_one_line_before_any_folder(tmp_path, capsys, files, kind, needle):
    model = _model_dirs(tmp_path)[kind]
    capsys.readouterr()                  # the fixture's own output (saving the models)
    out = tmp_path / "run"
    _fails(capsys, "unlearn", ["--model", str(model), "--memorize", "no", "--forget", files["forget"], "--retain",
                               files["retain"], "--steps", "1"], needle, out)
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_diagnose_and_measure_options_are_checked(tmp_path, capsys):
    assert main(["diagnose", "--model", "tiny-llama", "--memorize", "no", "--steps", "0", "--no-progress"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["measure", "--model", "tiny-llama", "--memorize", "no", "--direction", "update"]) == 2
    assert "--direction update" in capsys.readouterr().err


def test_answers_cut_by_max_length_are_reported_once_with_a_count(tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join(json.dumps({"question": "Q?", "answer": "word " * 40}) for _ in range(3)))
    assert main(["unlearn", *TINY, "--forget", str(long), "--retain", str(long), "--steps", "1",
                 "--max-length", "64"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "longer than --max-length" in ln]
    assert len(warnings) == 1 and "6 of 6 records" in warnings[0]


# ---- divergence ---------------------------------------------------------------------------------

DIVERGE = TINY + ["--method", "ga", "--optimizer", "sgd", "--lr", "10", "--warmup-steps", "0", "--steps", "10"]


def test_a_diverging_run_stops_with_its_records_kept_and_marked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["profile", *DIVERGE, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "--on-nonfinite" in err
    rec = pd.read_csv(out / "records.csv")
    last = rec.iloc[-1]
    assert len(rec) < 10 and isinstance(last["nonfinite"], str) and last["update"] == "skipped"
    assert rec.iloc[:-1]["nonfinite"].isna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("non-finite") and not (out / "model").exists()
    html = (out / "report.html").read_text()          # figures and report of the records kept
    assert "NaN" in html and "status non-finite" in html


def test_skip_step_drops_the_bad_updates_and_goes_on(tmp_path):
    from geffect.config import UnlearnConfig
    from geffect.loop import unlearn
    s = unlearn(UnlearnConfig(method="ga", model="tiny-llama", optimizer="sgd", lr=10.0, warmup_steps=0,
                              steps=8, memorize="no", progress=False, save_model=False, on_nonfinite="skip-step"))
    rows = s["records"]
    assert len(rows) == 8 and any(r["update"] == "skipped" for r in rows)
    assert all(r["update"] == "applied" for r in rows if not r["nonfinite"])


def test_nan_is_never_drawn_or_summed_as_zero(tmp_path):
    from geffect.plots import figures as F
    from geffect.plots import load_run
    out = tmp_path / "run"
    main(["profile", *DIVERGE, "--out", str(out), "--no-report"])
    run = load_run(out)
    fig = F.geffect_cumulative(run)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("no finite value" in t for t in texts)
    ys = [line.get_ydata() for ax in fig.axes for line in ax.get_lines() if line.get_label() == "total"]
    assert all(pd.isna(y[-1]) for y in ys)          # past the NaN step the cumulative value is a gap


# ---- interruption and resume ----------------------------------------------------------------------

RUN = ["profile", "--model", "tiny-llama", "--memorize", "no", "--no-progress", "--no-report", "--steps", "14",
       "--forget-batch", "16", "--retain-batch", "16", "--method", "npo+gd", "--checkpoint-every", "2",
       "--tokens-every", "3", "--pairs-every", "3"]


def _spawn(args):
    return subprocess.Popen([sys.executable, "-m", "geffect", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_rows(path: Path, n: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n + 1:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {n} steps: {proc.stderr.read()}")
        time.sleep(0.01)
    pytest.fail("timed out")


def _compare_runs(a: Path, b: Path):
    for table in ("records", "geffect", "instances", "conflicts", "pairs", "tokens"):
        x, y = pd.read_csv(a / f"{table}.csv"), pd.read_csv(b / f"{table}.csv")
        clock = [c for c in x.columns if c == "time_s" or c.startswith("t_")]     # seconds differ run to run
        x, y = x.drop(columns=clock, errors="ignore"), y.drop(columns=clock, errors="ignore")
        pd.testing.assert_frame_equal(x, y, check_exact=True, obj=table)
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _spawn([*RUN, "--out", str(out)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return out


@pytest.mark.parametrize("how", ["sigterm", "sigint", "kill"])
def test_interrupted_run_resumes_to_the_same_records_and_weights(tmp_path, uninterrupted, how):
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    proc = _spawn([*RUN, "--out", str(out)])
    _wait_rows(partial / "records.csv", 5, proc)
    proc.send_signal({"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "kill": signal.SIGKILL}[how])
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    if how == "kill":
        assert rc == -signal.SIGKILL
    else:        # finishes the step, writes a checkpoint, one line saying how to go on
        assert rc == 130 and f"geffect resume {partial}" in err and len(err.strip().splitlines()) == 1, err
    assert partial.is_dir() and not out.exists() and (partial / "checkpoint" / "manifest.json").is_file()
    rows_before = pd.read_csv(partial / "records.csv")
    assert 5 <= len(rows_before) < 14
    res = subprocess.run([sys.executable, "-m", "geffect", "resume", str(partial), "--no-report"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert out.is_dir() and not partial.exists()
    _compare_runs(uninterrupted, out)


def test_an_interrupted_run_is_never_overwritten_or_deleted_without_asking(tmp_path, capsys):
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / ".geffect-run").write_text("{}")
    (partial / "records.csv").write_text("step\n0\n")
    assert main(["unlearn", *TINY, "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "geffect resume" in capsys.readouterr().err and (partial / "records.csv").exists()


# ---- output folders --------------------------------------------------------------------------------

def test_two_runs_to_one_out_the_second_refused_the_first_unharmed(tmp_path):
    out = tmp_path / "run"
    long = [*RUN[:RUN.index("--steps")], "--steps", "400", *RUN[RUN.index("--steps") + 2:]]
    first = _spawn([*long, "--out", str(out)])
    _wait_rows(out.with_name("run.partial") / "records.csv", 2, first)
    second = subprocess.run([sys.executable, "-m", "geffect", *long, "--out", str(out)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert first.poll() is None, "the first run ended too early for this test"
    assert second.returncode == 2 and "another geffect run is writing" in second.stderr
    first.send_signal(signal.SIGTERM)                 # the first run stops cleanly, its folder resumable
    assert first.wait(timeout=120) == 130
    assert (out.with_name("run.partial") / "checkpoint" / "manifest.json").is_file()


def test_overwrite_replaces_only_geffect_runs(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert main(["unlearn", *TINY, "--steps", "1", "--out", str(mine), "--overwrite"]) == 2
    assert "not written by geffect" in capsys.readouterr().err and (mine / "thesis.tex").exists()
    assert main(["unlearn", *TINY, "--steps", "1", "--out", str(tmp_path / ".."), "--overwrite"]) == 2
    user_partial = tmp_path / "run.partial"            # the user's own folder of that name: never touched
    user_partial.mkdir()
    (user_partial / "notes.txt").write_text("mine")
    assert main(["unlearn", *TINY, "--steps", "1", "--out", str(tmp_path / "run"), "--overwrite"]) == 2
    assert (user_partial / "notes.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_run_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["unlearn", *TINY, "--steps", "1", "--out", str(out), "--no-save-model"]) == 0
    old = (out / "records.csv").read_text()
    import geffect.rundir as R
    real = Path.rename

    def failing(self, target):
        if self.name == "run.partial":
            raise OSError("disk full")
        return real(self, target)
    monkeypatch.setattr(R.Path, "rename", failing)
    with pytest.raises(OSError):
        main(["unlearn", *TINY, "--steps", "2", "--out", str(out), "--overwrite", "--no-save-model"])
    monkeypatch.undo()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run")]
    assert any((p / "records.csv").exists() and (p / "records.csv").read_text() == old for p in kept)


def test_profile_without_out_writes_a_timestamped_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", *TINY, "--steps", "1", "--no-report", "--no-save-model"]) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("profile-") and runs[0].name in capsys.readouterr().err


# ---- integrity of what is written and read -------------------------------------------------------------

def test_the_report_escapes_a_tampered_summary(tmp_path):
    from geffect.plots import write_report
    out = tmp_path / "run"
    assert main(["profile", *TINY, "--steps", "1", "--out", str(out), "--no-report", "--no-save-model"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    summary["steps"] = "<script>alert(1)</script>"
    summary["method"] = "<img src=x onerror=alert(2)>"
    (out / "summary.json").write_text(json.dumps(summary))
    html = write_report(out, []).read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "&lt;script&gt;" in html


def test_a_records_file_cut_mid_line_is_flagged_and_its_last_line_ignored(tmp_path, capsys):
    from geffect.plots import load_run
    out = tmp_path / "run"
    assert main(["profile", *TINY, "--steps", "3", "--out", str(out), "--no-report", "--no-save-model"]) == 0
    text = (out / "records.csv").read_text()
    (out / "records.csv").write_text(text[:-15])
    capsys.readouterr()
    run = load_run(out)
    assert len(run.steps) == 2 and "cut off" in capsys.readouterr().err


def test_the_memorise_cache_is_keyed_by_the_model_files(tmp_path):
    from geffect.data import default_splits
    from geffect.memorize import memorize_key
    from geffect.models import tiny_model
    recs = default_splits(0)["forget"][:2]
    path = tmp_path / "model"
    tiny_model("tiny-llama", seed=0).model.save_pretrained(path)
    a = memorize_key(str(path), recs, 1, 1e-3, 0)
    time.sleep(0.01)
    tiny_model("tiny-llama", seed=1).model.save_pretrained(path)      # another model at the same path
    os.utime(path / "model.safetensors", ns=(time.time_ns(), time.time_ns()))
    assert memorize_key(str(path), recs, 1, 1e-3, 0) != a
    assert memorize_key(str(path), recs[:1], 1, 1e-3, 0) != memorize_key(str(path), recs, 1, 1e-3, 0)
