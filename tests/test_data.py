"""Data loading: bundled generator, TOFU-format files and every bad-input case."""
import json

import pytest

from geffect.data import DataError, default_splits, idk_answers, load_records
from geffect.data.batching import check_lengths
from geffect.models import tiny_model


def test_bundled_splits_are_deterministic_and_complete():
    a, b = default_splits(0), default_splits(0)
    assert [r.answer for r in a["forget"]] == [r.answer for r in b["forget"]]
    assert [r.answer for r in default_splits(1)["forget"]] != [r.answer for r in a["forget"]]
    for name in ("forget", "retain", "holdout"):
        assert a[name]
        for r in a[name]:
            assert r.paraphrased_answer and len(r.perturbed_answer) == 3
            assert r.answer not in r.perturbed_answer
            assert "genre" in r.attributes and "author" in r.attributes
    authors = lambda s: {r.attributes["author"] for r in a[s]}
    assert not authors("forget") & authors("retain")
    assert len(idk_answers()) >= 10


def test_load_jsonl_and_json_keep_attributes(tmp_path):
    rows = [{"question": "Q1?", "answer": "A1", "group": "g1", "perturbed_answer": ["x", "y"]},
            {"question": "Q2?", "answer": "A2", "paraphrased_answer": "A2'"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_records(p)
    assert recs[0].attributes == {"group": "g1"} and recs[0].perturbed_answer == ["x", "y"]
    assert recs[1].paraphrased_answer == "A2'"
    q = tmp_path / "d.json"
    q.write_text(json.dumps(rows))
    assert [r.answer for r in load_records(q)] == ["A1", "A2"]


@pytest.mark.parametrize("content,needle", [
    ('{"question": "Q", "answer": "A"}\n{"question": "Q"\n', ":2: invalid JSON"),
    ('{"question": "Q", "answer": "A"}\n{"question": "Q"}\n', ":2: missing field 'answer'"),
    ('{"answer": "A"}\n', ":1: missing field 'question'"),
    ('{"question": "Q", "answer": ""}\n', "field 'answer' must be a non-empty string"),
    ('{"question": "Q", "answer": "A", "perturbed_answer": 3}\n', "field 'perturbed_answer'"),
    ("\n\n", "empty split"),
])
def test_bad_input_names_file_line_field(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as err:
        load_records(p)
    assert str(p) in str(err.value) and needle in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_prompt_longer_than_max_length(tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text('{"question": "short", "answer": "A"}\n' + json.dumps({"question": "word " * 200, "answer": "A"}))
    recs = load_records(p)
    tok = tiny_model("tiny-llama").tokenizer
    with pytest.raises(DataError) as err:
        check_lengths(tok, recs, 64)
    assert f"{p}:2" in str(err.value) and "field 'question'" in str(err.value)


def test_plain_text_records_count_every_token(tmp_path):
    """A ``text`` record (a corpus line, as WMDP's forget sets) is read, written back, and encoded with
    every text token labelled (only the tokenizer's BOS is prompt) in every prompt format."""
    from geffect.data.batching import IGNORE, encode_pair
    from geffect.data.records import load_records, write_records
    from geffect.models import tiny_model
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "Hazardous fact one.", "domain": "bio"}\n{"text": "Another line.", "domain": "cyber"}\n')
    recs = load_records(f)
    assert [(r.question, r.answer, r.attributes) for r in recs] == [
        ("", "Hazardous fact one.", {"domain": "bio"}), ("", "Another line.", {"domain": "cyber"})]
    assert [(r.answer, r.attributes) for r in load_records(write_records(recs, tmp_path / "back.json"))] == \
        [(r.answer, r.attributes) for r in recs]
    tok = tiny_model("tiny-llama").tokenizer
    text_ids = tok("Hazardous fact one.", add_special_tokens=False)["input_ids"]
    for fmt in ("chat", "raw", "tofu-llama2"):
        ids, labels = encode_pair(tok, "", "Hazardous fact one.", 128, fmt=fmt)
        lead = len(ids) - len(text_ids) - 1                       # BOS, if the tokenizer adds one; then EOS
        assert ids[lead:-1] == text_ids and labels[:lead] == [IGNORE] * lead and labels[lead:] == ids[lead:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "  "}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' must be a non-empty string"):
        load_records(bad)


def test_unlearning_a_plain_text_forget_set(tmp_path):
    """GA and WMDP's RMU run on a corpus forget set (text records) beside a QA retain set."""
    import json

    from geffect.config import UnlearnConfig
    from geffect.loop import unlearn
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps({"text": f"Secret line number {i} about topic {i % 2}."}) + "\n" for i in range(6)))
    for method in ("ga+gd", "rmu-wmdp"):
        s = unlearn(UnlearnConfig(method=method, model="tiny-llama", forget=str(f), memorize="no", steps=2,
                                  lr=1e-3, forget_batch=2, retain_batch=2, progress=False, save_model=False))
        assert s["status"] == "complete" and s["after"]["nll_forget"] != s["before"]["nll_forget"], method
    with pytest.raises(DataError, match=r"corpus.jsonl:1: a plain-text record .* idkdpo\+gd answers the forget"):
        unlearn(UnlearnConfig(method="idkdpo+gd", model="tiny-llama", forget=str(f), memorize="no", progress=False))
