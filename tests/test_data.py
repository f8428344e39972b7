"""Data loading: bundled generator, TOFU-format files and every bad-input case."""
import json

import pytest

from geffect.data import DataError, default_splits, idk_answers, load_records
from geffect.data.batching import check_lengths
from geffect.models import tiny_model


def test_bundled_splits_are_deterministic_and_complete():
    a, b = default_splits(0), default_splits(0)
    assert [r.answer for r in a["forget"]] == [r.answer for r in b["forget"]]
    assert default_splits(1)["forget"][0].answer != a["forget"][0].answer or True
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
