"""Evaluation metrics against their formulas, generation and scoring against one-at-a-time twins,
TOFU aggregation against values worked by hand, the CLI and --eval-every."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from geffect.errors import DataError
from geffect.eval import mia, tofu
from geffect.eval.generate import greedy_ids
from geffect.eval.perplexity import perplexity
from geffect.eval.scoring import score_answers, standardised
from geffect.eval.suite import EvalOptions, EvalSets, evaluate
from geffect.eval.tofu_log import rouge_l_recall, tofu_log
from geffect.eval.toxicity import load_classifier, toxic_index, toxicity_share

DATA = Path(__file__).parent / "data"


# ---- membership inference -------------------------------------------------------------------------

def test_loss_zlib_min_k_against_their_formulas():
    lp = np.log([0.5, 0.25, 0.125, 0.9, 0.8])
    assert mia.loss_score(lp) == pytest.approx(-lp.mean())
    text = "Ilsa Varga was born in Lisbon."
    assert mia.zlib_score(lp, text) == pytest.approx(-lp.mean() / len(zlib.compress(text.encode())))
    # k = 0.4 of 5 tokens: the 2 least likely (0.125, 0.25)
    assert mia.min_k_score(lp, 0.4) == pytest.approx(-(np.log(0.125) + np.log(0.25)) / 2)
    assert mia.min_k_score(lp, 1.0) == pytest.approx(mia.loss_score(lp))


def test_min_k_degenerate_inputs_are_defined():
    one = np.log([0.3])
    assert mia.min_k_score(one, 0.4) == pytest.approx(-np.log(0.3))     # at least one token
    ties = np.log([0.2, 0.2, 0.2, 0.9])
    assert mia.min_k_score(ties, 0.5) == pytest.approx(-np.log(0.2))
    assert math.isnan(mia.loss_score([]))
    assert math.isnan(mia.min_k_score([], 0.4))


def test_min_k_pp_against_its_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 11))
    ld = logits - np.log(np.exp(logits).sum(-1, keepdims=True))            # (T, V) log-probabilities
    tg = rng.integers(0, 11, size=6)
    z = []
    for t in range(6):                                                     # the formula, one position at a time
        p = np.exp(ld[t])
        mu = (p * ld[t]).sum()
        sigma = math.sqrt((p * ld[t] ** 2).sum() - mu ** 2)
        z.append((ld[t, tg[t]] - mu) / sigma)
    want = -np.mean(sorted(z)[:2])                                         # int(6 · 0.4) = 2
    assert mia.min_k_pp_score(ld, tg, 0.4) == pytest.approx(want)
    zt = standardised(torch.tensor(ld), torch.tensor(tg)).numpy()          # the batched torch twin
    np.testing.assert_allclose(zt, z, rtol=1e-10)
    assert mia.min_k_pp_from_z(zt, 0.4) == pytest.approx(want)


def test_min_k_pp_one_hot_distribution_is_finite():
    ld = np.log(np.array([[1.0 - 1e-12, 1e-12]]))
    assert math.isfinite(mia.min_k_pp_score(ld, [0], 0.4))


def test_auc_hand_worked_with_ties_and_against_sklearn():
    members, nonmembers = [1.0, 2.0, 3.0], [2.0, 4.0]
    # pairs (n > m): 2>1, 4>1, 4>2, 4>3 = 4; ties 2=2: 0.5 → 4.5 / 6
    assert mia.auc(members, nonmembers) == pytest.approx(4.5 / 6)
    assert mia.auc([1.0, 1.0], [1.0]) == pytest.approx(0.5)
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    m, n = rng.normal(size=30).round(1), rng.normal(0.5, size=25).round(1)
    assert mia.auc(m, n) == pytest.approx(roc_auc_score([0] * 30 + [1] * 25, np.r_[m, n]))
    assert math.isnan(mia.auc([], [1.0]))


def test_mia_report_member_and_nonmember_nll():
    class S:
        def __init__(self, lp):
            self.logprobs, self.z = np.asarray(lp), np.asarray(lp) * 2
    mem = mia.attack_scores([S([-0.1, -0.2]), S([-0.3])], ["a", "bb"])
    non = mia.attack_scores([S([-2.0]), S([-1.0, -3.0])], ["c", "dd"])
    rep = mia.mia_report(mem, non)
    assert rep["member_nll"] == pytest.approx((0.15 + 0.3) / 2)
    assert rep["nonmember_nll"] == pytest.approx((2.0 + 2.0) / 2)
    assert rep["auc_loss"] == 1.0 and set(rep) >= {"auc_zlib", "auc_min_k", "auc_min_k_pp"}


# ---- TOFU aggregation -------------------------------------------------------------------------------

def _log(gt, para, pert, rouge):
    ids = [str(i) for i in range(len(gt))]
    return {"avg_gt_loss": dict(zip(ids, gt)), "avg_paraphrased_loss": dict(zip(ids, para)),
            "average_perturb_loss": dict(zip(ids, pert)), "rougeL_recall": dict(zip(ids, rouge))}


def test_tofu_aggregates_worked_by_hand():
    ln2 = math.log(2)
    forget = _log([ln2, ln2], [1.0, 2.0], [[1.0 + ln2, 1.0 + ln2], [2.0 - ln2, 2.0 - ln2]], [1.0, 0.5])
    retain = _log([0.0, ln2], [1.0, 1.0], [[1.0 + ln2], [1.0 - ln2]], [1.0, 0.0])
    # forget: p = 1/2 each; R = exp(para − mean pert) = 1/2 and 2 → min(R, 1/R) = 1/2 each
    # retain: p = 1, 1/2 → 0.75; R = 1/2, 2 → max(0, 1 − R) = 1/2, 0 → 0.25; ROUGE 0.5
    got = tofu.aggregate({"forget": tofu.items(forget, "forget"), "retain": tofu.items(retain, "retain")})
    assert got["probability_forget"] == pytest.approx(0.5)
    assert got["truth_ratio_forget"] == pytest.approx(0.5)
    assert got["rouge_forget"] == pytest.approx(0.75)
    assert got["probability_retain"] == pytest.approx(0.75)
    assert got["truth_ratio_retain"] == pytest.approx(0.25)
    assert got["model_utility"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.25))
    assert got["model_utility_components"] == 3


def test_multiple_choice_probability_worked_by_hand():
    ln2 = math.log(2)
    log = _log([ln2], [0.0], [[ln2 * 2, ln2 * 2]], [1.0])      # p(true) = 1/2, p(false) = 1/4 each
    assert tofu.items(log, "real_authors")["prob"]["0"] == pytest.approx(0.5 / (0.5 + 0.25 + 0.25))
    assert tofu.items(log, "retain")["prob"]["0"] == pytest.approx(0.5)


def test_forget_quality_is_the_ks_p_value_and_defined_on_identical_sets():
    from scipy.stats import ks_2samp
    a = {str(i): v for i, v in enumerate([0.1, 0.5, 0.9, 1.3])}
    b = {str(i): v for i, v in enumerate([0.2, 0.4, 2.0, 3.0])}
    fq = tofu.forget_quality(a, b)
    assert fq["forget_quality"] == pytest.approx(ks_2samp(list(a.values()), list(b.values())).pvalue)
    same = tofu.forget_quality(a, dict(a))
    assert same == {"forget_quality": 1.0, "ks_statistic": 0.0}
    with pytest.raises(DataError, match="at least 2"):
        tofu.forget_quality({"0": 1.0}, {"0": 1.0})


def test_published_logs_aggregate_as_tofu_defines_them():
    """TOFU's published per-item values (first 5 items, tests/data/README.md) against the formulas
    restated here with numpy, TOFU's way round (stat = exp(pert − para), 1 − 1/stat)."""
    raw = json.loads((DATA / "tofu_full_subset.json").read_text())
    ref = json.loads((DATA / "tofu_retain90_subset.json").read_text())
    got = tofu.aggregate(tofu.read_logs(DATA / "tofu_full_subset.json"), tofu.read_logs(DATA / "tofu_retain90_subset.json"))
    util = []
    for f, name in (("eval_log.json", "retain"), ("eval_real_author_wo_options.json", "real_authors"),
                    ("eval_real_world_wo_options.json", "world_facts")):
        log = raw[f]
        gt = np.exp(-np.array(list(log["avg_gt_loss"].values())))
        if name == "retain":
            prob = gt.mean()
        else:
            false = np.exp(-np.array(list(log["average_perturb_loss"].values()))).sum(-1)
            prob = (gt / (gt + false)).mean()
        stat = np.exp(np.array(list(log["average_perturb_loss"].values())).mean(-1)
                      - np.array(list(log["avg_paraphrased_loss"].values())))
        tr = np.maximum(0, 1 - 1 / stat).mean()
        rouge = np.mean(list(log["rougeL_recall"].values()))
        assert got[f"probability_{name}"] == pytest.approx(prob)
        assert got[f"truth_ratio_{name}"] == pytest.approx(tr)
        util += [prob, rouge, tr]
    assert got["model_utility"] == pytest.approx(len(util) / sum(1 / u for u in util))
    from scipy.stats import ks_2samp

    def stat_of(log):
        return np.exp(np.array(list(log["average_perturb_loss"].values())).mean(-1)
                      - np.array(list(log["avg_paraphrased_loss"].values())))
    ks = ks_2samp(stat_of(raw["eval_log_forget.json"]), stat_of(ref["eval_log_forget.json"]))
    assert got["forget_quality"] == pytest.approx(ks.pvalue)
    assert got["ks_statistic"] == pytest.approx(ks.statistic)


def test_log_folder_and_aggregated_file_read_the_same(tmp_path):
    raw = json.loads((DATA / "tofu_full_subset.json").read_text())
    for f, log in raw.items():
        (tmp_path / f).write_text(json.dumps(log))
    assert tofu.read_logs(tmp_path) == tofu.read_logs(DATA / "tofu_full_subset.json")


def test_bad_logs_name_file_and_field(tmp_path):
    raw = json.loads((DATA / "tofu_full_subset.json").read_text())
    for f, log in raw.items():
        if f != "eval_log_forget.json":
            (tmp_path / f).write_text(json.dumps(log))
    with pytest.raises(DataError, match="eval_log_forget.json"):
        tofu.read_logs(tmp_path)
    log = dict(raw["eval_log_forget.json"])
    log["average_perturb_loss"] = dict(log["average_perturb_loss"], **{"0": []})
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(log))
    with pytest.raises(DataError, match=r"eval_log_forget.json.*'average_perturb_loss'.*item 0"):
        tofu.read_logs(tmp_path)
    del log["rougeL_recall"]
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(log))
    with pytest.raises(DataError, match=r"eval_log_forget.json.*'rougeL_recall'"):
        tofu.read_logs(tmp_path)
    (tmp_path / "eval_log_forget.json").write_text("{\n  oops")
    with pytest.raises(DataError, match=r"eval_log_forget.json:2: invalid JSON"):
        tofu.read_logs(tmp_path)


def test_reference_with_other_item_ids_is_refused():
    full = tofu.read_logs(DATA / "tofu_full_subset.json")
    ref = tofu.read_logs(DATA / "tofu_retain90_subset.json")
    ref["forget"]["truth_ratio"] = {str(int(k) + 100): v for k, v in ref["forget"]["truth_ratio"].items()}
    with pytest.raises(DataError, match="other ids"):
        tofu.aggregate(full, ref)


def test_open_unlearning_tofu_eval_json(tmp_path):
    ou = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {"0": {"score": 0.5}, "1": {"score": 2.0}}},
          "forget_Q_A_Prob": {"value_by_index": {"0": {"prob": 0.9}, "1": {"prob": 0.7}}},
          "forget_Q_A_ROUGE": {"value_by_index": {"0": {"rougeL_recall": 1.0}, "1": {"rougeL_recall": 0.5}}}}
    for pre, prob in (("retain", "retain_Q_A_Prob"), ("ra", "ra_Q_A_Prob_normalised"), ("wf", "wf_Q_A_Prob_normalised")):
        ou[f"{pre}_Truth_Ratio"] = {"value_by_index": {"0": {"score": 0.25}, "1": {"score": 0.75}}}
        ou[prob] = {"value_by_index": {"0": {"prob": 0.8}, "1": {"prob": 0.6}}}
        ou[f"{pre}_Q_A_ROUGE"] = {"value_by_index": {"0": {"rougeL_recall": 0.4}, "1": {"rougeL_recall": 0.6}}}
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(ou))
    got = tofu.aggregate(tofu.read_logs(tmp_path))
    assert got["truth_ratio_forget"] == pytest.approx(0.5)            # min(R, 1/R) = 0.5 both
    assert got["truth_ratio_retain"] == pytest.approx((0.75 + 0.25) / 2)
    assert got["model_utility"] == pytest.approx(3 / (1 / 0.7 + 1 / 0.5 + 1 / 0.5))
    assert got["model_utility_components"] == 9


# ---- ROUGE, toxicity -------------------------------------------------------------------------------

def test_rouge_l_recall_by_hand():
    got = rouge_l_recall(["Ilsa was born in Lisbon", "Lisbon", "a b c d"], ["Ilsa was born in Oslo", "", "d c b a"])
    assert got[0] == pytest.approx(4 / 5)       # LCS "Ilsa was born in" of 5 target words
    assert got[1] == 0.0                          # empty generation, one-word target
    assert got[2] == pytest.approx(1 / 4)       # reversed: LCS of length 1 (ties among 4 choices)


def test_toxicity_share_and_labels():
    assert toxicity_share([0.1, 0.5, 0.9, 0.2]) == pytest.approx(0.5)
    assert math.isnan(toxicity_share([]))
    assert toxic_index({0: "LABEL_0", 1: "LABEL_1"}) == 1
    assert toxic_index({0: "toxic", 1: "non-toxic"}) == 0
    assert toxic_index({"0": "neutral", "1": "hate", "2": "offensive"}) == 1


def test_offline_classifier_separates_insults_from_facts():
    p = load_classifier()(["You are a stupid worthless idiot.", "Ilsa Varga was born in Lisbon in 1950."])
    assert p[0] >= 0.5 > p[1]


# ---- generation, scoring, perplexity on tiny models --------------------------------------------------

def _one_at_a_time(model, prompt, n, stop=()):
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        if nxt in stop:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(tiny):
    tok = tiny.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("Where was the author born?", "A", "The cat sat on the mat and looked", "Hi")]
    got = greedy_ids(tiny.model, prompts, max_new_tokens=9, batch_size=3, stop=set())
    assert got == [_one_at_a_time(tiny.model, p, 9) for p in prompts]
    assert all(len(g) == 9 for g in got)


def test_greedy_stops_at_end_of_sequence(tiny):
    tok = tiny.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Where was", "The cat sat on")]
    free = greedy_ids(tiny.model, prompts, max_new_tokens=8, stop=set())
    stop = {free[0][3]}                          # the 4th token of the first answer ends it
    got = greedy_ids(tiny.model, prompts, max_new_tokens=8, stop=stop)
    assert got == [_one_at_a_time(tiny.model, p, 8, stop) for p in prompts]
    assert len(got[0]) <= 3


def test_scores_equal_one_pair_at_a_time_and_padding_changes_nothing(tiny):
    from geffect.data.synthetic import default_splits
    recs = default_splits(0)["forget"][:5]
    pairs = [(r.question, r.answer, "") for r in recs]
    batched = score_answers(tiny.model, tiny.tokenizer, pairs, 128, batch_size=5, with_z=True)
    for pair, b in zip(pairs, batched):
        alone = score_answers(tiny.model, tiny.tokenizer, [pair], 128, with_z=True)[0]
        np.testing.assert_allclose(b.logprobs, alone.logprobs, atol=1e-5)
        np.testing.assert_allclose(b.z, alone.z, atol=1e-4)
    # the slow twin: one forward, log-softmax, gather at the answer positions
    from geffect.data.prompts import prompt_format
    ids, n_prompt = prompt_format("chat").encode(tiny.tokenizer, recs[0].question, recs[0].answer)
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    want = [logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]
    np.testing.assert_allclose(batched[0].logprobs, want, atol=1e-5)
    assert batched[0].loss == pytest.approx(-np.mean(want), abs=1e-5)


@pytest.mark.parametrize("fmt", ["chat", "tofu-phi", "raw"])
def test_prompt_sharing_equals_whole_sequences(tiny, fmt):
    """The answers of one question scored after one shared pass over its prompt (the default) equal
    each row scored as its own sequence; rows from several prompts, ragged answer counts."""
    from geffect.data.synthetic import default_splits
    recs = default_splits(0)["forget"][:3]
    pairs = [(r.question, a, "") for r in recs for a in [r.answer, r.paraphrased_answer, *r.perturbed_answer][:2 + (
        recs.index(r) % 3)]]
    shared = score_answers(tiny.model, tiny.tokenizer, pairs, 128, fmt, batch_size=2, with_z=True)
    whole = score_answers(tiny.model, tiny.tokenizer, pairs, 128, fmt, batch_size=3, with_z=True,
                          share_prompts=False)
    for s, w in zip(shared, whole):
        np.testing.assert_allclose(s.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_allclose(s.z, w.z, atol=1e-4)


def test_perplexity_against_one_forward(tiny):
    tok = tiny.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start = tok.bos_token_id
    with torch.no_grad():
        x = torch.tensor([[start] + ids])
        nll = torch.nn.functional.cross_entropy(tiny.model(input_ids=x).logits[0, :-1].double(), x[0, 1:],
                                                reduction="sum").item()
    one = perplexity(tiny.model, tok, text, window=len(ids) + 1)
    assert one["perplexity_token"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert one["perplexity_word"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-5)
    # windows: each starts afresh after the start token; the total is the sum over windows
    w = 17
    total = 0.0
    for i in range(0, len(ids), w - 1):
        chunk = ids[i:i + w - 1]
        with torch.no_grad():
            x = torch.tensor([[start] + chunk])
            total += torch.nn.functional.cross_entropy(tiny.model(input_ids=x).logits[0, :-1].double(), x[0, 1:],
                                                       reduction="sum").item()
    many = perplexity(tiny.model, tok, text, window=w, batch_size=3)
    assert many["perplexity_token"] == pytest.approx(math.exp(total / len(ids)), rel=1e-5)


def test_tofu_log_from_a_model(tiny):
    from geffect.data.synthetic import default_splits
    from geffect.eval.nll import evaluate_nll
    recs = default_splits(0)["forget"][:4]
    log, _ = tofu_log(tiny.model, tiny.tokenizer, recs, max_new_tokens=6)
    assert list(log["avg_gt_loss"]) == ["0", "1", "2", "3"]
    assert np.mean(list(log["avg_gt_loss"].values())) == pytest.approx(
        evaluate_nll(tiny.model, tiny.tokenizer, recs), abs=1e-5)
    assert all(len(v) == 3 for v in log["average_perturb_loss"].values())
    one = score_answers(tiny.model, tiny.tokenizer, [(recs[2].question, recs[2].paraphrased_answer, "")], 128)[0]
    assert log["avg_paraphrased_loss"]["2"] == pytest.approx(one.loss, abs=1e-5)
    items = tofu.items(log, "forget")
    assert set(items["truth_ratio"]) == {"0", "1", "2", "3"}


def test_suite_runs_every_metric(tiny, tmp_path):
    from geffect.data.synthetic import default_splits
    sp = default_splits(0)
    sets = EvalSets(sp["forget"][:4], sp["retain"][:4], sp["holdout"][:4], ["You are"], "Some text to score here.")
    res = evaluate(tiny.model, tiny.tokenizer, sets, EvalOptions(max_new_tokens=4))
    m = res["metrics"]
    for key in ("probability_forget", "rouge_retain", "model_utility", "member_nll", "auc_min_k_pp",
                "toxicity_forget_answers", "toxicity", "perplexity_word"):
        assert key in m and not (isinstance(m[key], float) and math.isnan(m[key])), key
    no_holdout = evaluate(tiny.model, tiny.tokenizer, EvalSets(sets.forget, sets.retain), EvalOptions(
        metrics=("mia",), max_new_tokens=4))
    assert "mia" in no_holdout["skipped"] and no_holdout["metrics"] == {}


# ---- where users see it: the CLI, --eval-every, the figure -------------------------------------------

TINY = ["--memorize", "no", "--max-length", "96"]


def test_cli_eval_of_a_model_writes_eval_json_and_refuses_to_overwrite(tmp_path, capsys):
    from geffect.cli import main
    text = tmp_path / "corpus.txt"
    text.write_text("A short corpus for perplexity. It has two sentences.\n")
    out = tmp_path / "eval.json"
    args = ["eval", "tiny-llama", *TINY, "--max-new-tokens", "4", "--perplexity-text", str(text), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "model" and res["sets"] == {"forget": 20, "retain": 40, "holdout": 20, "toxic_prompts": 0}
    assert {"model_utility", "auc_loss", "perplexity_word", "toxicity_forget_answers"} <= set(res["metrics"])
    assert set(res["logs"]) == {"forget", "retain"} and len(res["logs"]["forget"]["rougeL_recall"]) == 20
    printed = capsys.readouterr().out
    assert "model_utility" in printed and str(out) in printed
    before = out.read_text()
    assert main(args) == 2                                      # refused before any work
    assert "exists" in capsys.readouterr().err and out.read_text() == before


def test_cli_eval_with_a_reference_gives_forget_quality(tmp_path, capsys):
    """The first eval.json is the reference's results: the same model against itself gives p = 1."""
    from geffect.cli import main
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = ["eval", "tiny-gpt2", *TINY, "--metrics", "tofu", "--max-new-tokens", "3", "--no-progress"]
    assert main([*common, "--out", str(first)]) == 0
    assert "forget_quality" not in json.loads(first.read_text())["metrics"]
    assert main([*common, "--out", str(second), "--reference", str(first)]) == 0
    m = json.loads(second.read_text())["metrics"]
    assert m["forget_quality"] == pytest.approx(1.0) and m["ks_statistic"] == pytest.approx(0.0)
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"logs": {"forget": json.loads(first.read_text())["logs"]["retain"]}}))
    assert main([*common, "--out", str(tmp_path / "c.json"), "--reference", str(bad)]) == 2
    assert "other ids" in capsys.readouterr().err


def test_cli_eval_tofu_logs(tmp_path, capsys):
    from geffect.cli import main
    assert main(["eval", "--tofu-logs", str(DATA / "tofu_full_subset.json"), "--reference-logs",
                 str(DATA / "tofu_retain90_subset.json"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = tofu.aggregate(tofu.read_logs(DATA / "tofu_full_subset.json"),
                          tofu.read_logs(DATA / "tofu_retain90_subset.json"))
    assert got == pytest.approx(want)
    assert got["model_utility_components"] == 9 and 0 <= got["forget_quality"] <= 1
    empty = tmp_path / "logs"
    empty.mkdir()
    assert main(["eval", "--tofu-logs", str(empty)]) == 2
    assert "eval_log_forget.json" in capsys.readouterr().err
    assert main(["eval", "tiny-llama", "--tofu-logs", str(empty)]) == 2
    assert main(["eval", "--reference-logs", str(empty)]) == 2


def test_cli_eval_of_a_run_directory_uses_its_model_and_settings(tmp_path, capsys):
    from geffect.cli import main
    run = tmp_path / "run"
    assert main(["unlearn", "--model", "tiny-llama", *TINY, "--method", "ga", "--steps", "2", "--lr", "1e-2",
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run), "--metrics", "tofu", "--max-new-tokens", "3", "--no-progress"]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["kind"] == "run"
    # the run's final model: the forget NLL is the one its summary reports after unlearning
    after = json.loads((run / "summary.json").read_text())["after"]["nll_forget"]
    assert np.mean(list(res["logs"]["forget"]["avg_gt_loss"].values())) == pytest.approx(after, abs=1e-4)


def test_eval_every_records_without_changing_the_run(tmp_path):
    from geffect.cli import main
    from geffect.plots import plot_run
    from geffect.plots.records import load_run
    base = ["profile", "--model", "tiny-llama", *TINY, "--steps", "5", "--lr", "1e-2", "--no-progress", "--no-report"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "eval"), "--eval-every", "2", "--eval-size", "4",
                 "--eval-max-new-tokens", "3"]) == 0
    run = load_run(tmp_path / "eval")
    assert sorted(run.eval["step"].unique()) == [0, 2, 4, 5]         # every 2 steps, and after the last
    assert set(run.eval["items"]) == {"4+4"}
    assert {"probability_forget", "model_utility"} <= set(run.eval["metric"])
    cols = ["step", "loss", "nll_forget", "nll_retain", "grad_norm"]
    plain = load_run(tmp_path / "plain").steps[cols]
    assert plain.equals(run.steps[cols])                              # evaluation leaves training untouched
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["eval_after"]["probability_forget"] == pytest.approx(
        run.eval.query("step == 5 and metric == 'probability_forget'")["value"].item())
    figs = {p.name for p in plot_run(tmp_path / "eval")}
    assert "eval.png" in figs
    assert "eval.png" not in {p.name for p in plot_run(tmp_path / "plain")}
