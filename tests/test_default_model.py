"""Slow tests on the real embedded default model (SmolLM2-135M-Instruct from the GGUF file)."""
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from geffect.models import load_model
    return load_model("smollm2-135m")


def test_default_model_loads_with_tied_embeddings_and_chat_template(smol):
    m = smol.model
    assert m.config.num_hidden_layers == 30
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert smol.tokenizer.chat_template
    from geffect.engine.groups import assign_groups
    groups = assign_groups(m)
    assert groups["model.layers.0.mlp.down_proj"] == "shallow"
    assert groups["model.layers.10.mlp.down_proj"] == "middle"
    assert groups["model.layers.29.mlp.down_proj"] == "deep"
    assert groups["model.embed_tokens"] == "embed" and groups["lm_head"] == "lm" and groups["model.norm"] == "lm"


def test_ga_on_default_model_removes(smol, tmp_path):
    import json

    from geffect import measure
    from geffect.data import default_splits
    sp = default_splits(0)
    f, r = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps({"question": x.question, "answer": x.answer}) for x in sp["forget"][:3]))
    r.write_text("\n".join(json.dumps({"question": x.question, "answer": x.answer}) for x in sp["retain"][:3]))
    res = measure("ga", "smollm2-135m", str(f), str(r), memorize="no", loaded=smol)
    assert res["unlearn"]["total"] < 0  # e_u = −‖∇R_u‖² for GA
    parts = sum(v for k, v in res["unlearn"].items() if k != "total")
    assert abs(parts - res["unlearn"]["total"]) <= 1e-6 * abs(res["unlearn"]["total"])
