"""The G-effect engine against slow twins: full autograd gradients, one sample at a time."""
import pytest
import torch
from helpers import engine_step, method_of, micro_batch, per_split, setup, tiny_data
from twins import assert_matches_twin

from geffect.config import ProfileConfig
from geffect.data.batching import collate
from geffect.engine import Engine, gramrows
from geffect.engine.groups import assign_groups
from geffect.engine.rules import jvp_rule, rule_for
from geffect.forward import forward
from geffect.objectives import functional as fn

METHODS = ["ga", "gd", "npo+gd", "npo+kl", "simnpo", "wga+kl", "tnpo", "wtnpo+gd", "po+gd", "idkdpo+gd",
           "rmu", "llmu"]


@pytest.mark.parametrize("gram_rows", [None, True])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("spec", METHODS)
def test_per_instance_and_group_effects_match_autograd(tiny, spec, reuse, gram_rows, monkeypatch):
    """Per-instance, per-group values against one-sample autograd; Linear layers in the matmul form
    (where cheaper, the tiny models' default) and in Gram form wherever eligible (gramrows)."""
    monkeypatch.setattr(gramrows, "FORCE", gram_rows)
    method, data, model = method_of(spec), tiny_data(), tiny.model
    ctx, ref = setup(model, method)
    mb = micro_batch(tiny.tokenizer, method, data)
    eng, res = engine_step(model, method, mb, ref, ProfileConfig(reuse_backward=reuse), ctx)
    # the reuse path applies exactly to per-instance reweightings of the NLL; objectives that never
    # read the retain rows (GA, SimNPO alone) get the retain rows as their own forward chunk
    expect = {"gd": "reuse", "npo+gd": "reuse", "idkdpo+gd": "reuse", "ga": "reuse+retain",
              "simnpo": "reuse+retain"}.get(spec, "extra") if reuse else "extra"
    assert res.path == expect, res.path
    effects = per_split(res)
    assert_matches_twin(model, tiny.tokenizer, method, mb, ref, ctx, effects, eng.groups, data)
    # invariants: groups sum to the total; e_u = mean of the forget PG-effects
    s = res.effects[0].summary()
    assert abs(sum(v for k, v in s["unlearn"].items() if k != "total") - s["unlearn"]["total"]) < 1e-9
    tot = s["unlearn"]["total"]
    assert abs(effects["forget"].sum(1).double().mean().item() - tot) <= 1e-5 * max(1.0, abs(tot))


@pytest.mark.parametrize("spec", METHODS)
def test_streamed_inner_products_equal_those_taken_after_the_backward(tiny, spec):
    """Streaming (each module's values taken as the backward completes its gradient, its captured
    tensors freed then) changes nothing: the same per-instance values as after the backward."""
    method, data, model = method_of(spec), tiny_data(), tiny.model
    ctx, ref = setup(model, method)
    mb = micro_batch(tiny.tokenizer, method, data)
    res = {stream: engine_step(model, method, mb, ref, ProfileConfig(stream=stream), ctx)[1] for stream in (True, False)}
    for split in ("forget", "retain"):
        a, b = per_split(res[True])[split], per_split(res[False])[split]
        # float32 sums in another order (the streamed Linear layers' instance or Gram form): up to
        # ~1e-5 of a value (the Gram form reaches 7e-6 on tiny-gpt2's IdkDPO)
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-9), (spec, split)


@pytest.mark.parametrize("spec", ["npo+gd", "ga"])
def test_streamed_modules_free_their_captured_tensors_during_the_backward(tiny, spec, monkeypatch):
    """A streamed module's captured cotangent is freed once its values are taken, not when the
    backward ends (each output's cotangent hook refers to its record until the graph is freed): by
    the time the last module completes, no earlier module's cotangent is alive (before: every one).
    A tensor a record still held also has is not counted."""
    import weakref

    from geffect.engine.capture import Capture
    refs: list = []
    still_alive: list[int] = []
    release = Capture.release_modules

    def spy(self, names):
        if self.training_pass:
            held = {id(t) for recs in self.seen.values() for rec in recs for t in (rec.grad, rec.train, *rec.inputs)
                    if torch.is_tensor(t)}
            still_alive.append(sum(r() is not None and id(r()) not in held for r in refs))
            refs.extend(weakref.ref(rec.grad) for n in names for rec in self.seen.get(n, []) if rec.grad is not None)
        release(self, names)
    monkeypatch.setattr(Capture, "release_modules", spy)
    method = method_of(spec)
    ctx, ref = setup(tiny.model, method)
    engine_step(tiny.model, method, micro_batch(tiny.tokenizer, method, tiny_data()), ref, ctx=ctx)
    assert len(refs) > 10 and len(still_alive) > 5
    # autograd itself holds the residual stream's cotangent (o_proj's and down_proj's outputs) until
    # the earlier block consumes it: at most two per block at a time, none by the last release
    assert max(still_alive) <= 2 * tiny.model.config.num_hidden_layers and still_alive[-1] == 0, still_alive


@pytest.mark.parametrize("spec", ["ga", "npo", "simnpo", "tnpo"])
def test_retain_rows_as_own_chunk_match_autograd(tiny, spec):
    """Objectives that never read the retain rows, with the retain rows forwarded as their own chunk
    (as the profiled step does): the forget rows reuse the training backward and one backward of the
    retain chunk alone gives R_r's cotangents (per-instance reweightings: GA, NPO, SimNPO); a
    token-weighted objective (TNPO) takes the extra backward. Values against one-sample autograd."""
    method, data, model = method_of(spec), tiny_data(), tiny.model
    assert not method.has_retain_part
    ctx, ref = setup(model, method)
    if ref is not None:   # θ_o ≠ θ, so that NPO-family weights differ between instances and tokens
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for q in ref.model.parameters():
                q.add_(0.05 * torch.randn(q.shape, generator=gen))
    mb = micro_batch(tiny.tokenizer, method, data)
    eng, res = engine_step(model, method, mb, ref, ctx=ctx)
    assert res.path == ("extra" if spec == "tnpo" else "reuse+retain")
    assert_matches_twin(model, tiny.tokenizer, method, mb, ref, ctx, per_split(res), eng.groups, data)


def test_ga_unlearning_effect_is_minus_squared_norm(tiny):
    """For GA, e_u = ∇R_uᵀ∇(−R_u) = −‖∇R_u‖² (forget rows only in the batch's forget risk)."""
    method, model = method_of("ga"), tiny.model
    _, res = engine_step(model, method, micro_batch(tiny.tokenizer, method, tiny_data()))
    e_u = res.effects[0].summary()["unlearn"]["total"]
    sq = sum((p.grad.double() ** 2).sum().item() for p in model.parameters() if p.grad is not None)
    assert e_u < 0
    assert abs(e_u + sq) <= 1e-5 * sq


def test_reuse_only_when_the_loss_reads_the_model_through_the_nll(tiny):
    """A loss whose NLL cotangents are proportional to the risk's but that also reads the logits
    directly must not reuse the training backward: the graph check sends it to the extra backward,
    and its values equal the extra backward's (validated against autograd above)."""
    method, model = method_of("gd"), tiny.model
    batch = micro_batch(tiny.tokenizer, method, tiny_data()).batch
    res, paths = [], []
    for reuse in (True, False):
        eng = Engine(model, ProfileConfig(reuse_backward=reuse))
        with eng.capture() as cap:
            fo = forward(model, None, batch, method)
            plain = method.parts(fo).total
            assert fo.reads_model_only_through_nll(plain)
            loss = plain + 1e-2 * fo.logits[batch.segments["retain"]].pow(2).mean()   # direct logit read
            assert not fo.reads_model_only_through_nll(loss)
            model.zero_grad()
            paths.append(eng.backward(cap, fo, loss))
        res.append(eng.per_instance(cap, batch.segments, eng.direction_from_grads()))
    assert paths == ["extra", "extra"]
    for split in res[0]:
        assert torch.allclose(res[0][split], res[1][split], rtol=1e-5, atol=1e-7)


def test_padding_changes_no_effect(tiny):
    from dataclasses import replace
    method, model = method_of("npo+gd"), tiny.model
    ctx, ref = setup(model, method)
    mb = micro_batch(tiny.tokenizer, method, tiny_data())
    a = per_split(engine_step(model, method, mb, ref, ctx=ctx)[1])
    batch, k, pad = mb.batch, 5, tiny.tokenizer.pad_token_id
    n = len(batch.input_ids)
    wide = type(batch)(torch.cat([batch.input_ids, torch.full((n, k), pad)], 1),
                       torch.cat([batch.attention_mask, torch.zeros(n, k, dtype=torch.long)], 1),
                       torch.cat([batch.labels, torch.full((n, k), -100)], 1), batch.segments)
    b = per_split(engine_step(model, method, replace(mb, batch=wide), ref, ctx=ctx)[1])
    for split in a:
        assert torch.allclose(a[split], b[split], rtol=1e-4, atol=1e-6)


def test_fast_rules_agree_with_jvp_fallback():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 4)
    emb = torch.nn.Embedding(7, 3, padding_idx=0)
    ln = torch.nn.LayerNorm(5)
    rms = LlamaRMSNorm(5, eps=1e-5)
    conv = Conv1D(4, 5)
    for m in (ln, rms):
        torch.nn.init.normal_(m.weight)
    for mod, x, out_shape in ((lin, torch.randn(2, 3, 5), (2, 3, 4)), (emb, torch.randint(1, 7, (2, 6)), (2, 6, 3)),  # no padding id: autograd zeroes that row
                              (ln, torch.randn(2, 3, 5), (2, 3, 5)), (rms, torch.randn(2, 3, 5), (2, 3, 5)),
                              (conv, torch.randn(2, 3, 5), (2, 3, 4))):
        g = torch.randn(out_shape)
        V = {n: torch.randn_like(p) for n, p in mod.named_parameters()}
        fast = rule_for(mod)(mod, (x,), g, V)
        slow = jvp_rule(mod, (x,), g, V)
        assert rule_for(mod) is not jvp_rule
        assert torch.allclose(fast, slow, atol=1e-5)


def test_linear_rule_sparse_and_dense_paths_agree_with_jvp_in_any_order():
    """The Linear rule takes live positions only when few carry a cotangent, and once a module was
    found mostly live it skips that test: both paths, in either order, equal the jvp fallback."""
    from geffect.engine.rules import _DENSE
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5)
    sparse = torch.zeros(3, 8, 4)
    sparse[:, 6:] = torch.randn(3, 2, 4)                         # 25 % of the positions live
    dense = torch.randn(3, 8, 4)
    for order in ((sparse, dense, sparse), (dense, sparse, dense)):
        lin = torch.nn.Linear(5, 4)
        V = {n: torch.randn_like(p) for n, p in lin.named_parameters()}
        for g in order:
            assert torch.allclose(rule_for(lin)(lin, (x,), g, V), jvp_rule(lin, (x,), g, V), atol=1e-5)
        assert lin in _DENSE                                     # a dense cotangent was seen


def test_duplicate_rule_registration_refused():
    from geffect.engine.rules import register_rule
    with pytest.raises(ValueError):
        register_rule(torch.nn.Linear)(lambda *a: None)


def test_groups_cover_every_parameter_once(tiny):
    groups = assign_groups(tiny.model)
    owned = {id(p) for n in groups for p in tiny.model.get_submodule(n).parameters(recurse=False)}
    assert owned == {id(p) for p in tiny.model.parameters()}
    assert set(groups.values()) <= {"embed", "shallow", "middle", "deep", "lm"}
    head = next(n for n, m in tiny.model.named_modules() if m is tiny.model.get_output_embeddings())
    assert groups[head] == "lm"
    blocks = assign_groups(tiny.model, resolution="block")
    assert {"block.0", "block.1"} <= set(blocks.values())


def test_unknown_architecture_is_refused():
    from geffect.layers import ArchitectureError

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.b = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ArchitectureError):
        assign_groups(Odd())


def test_profile_cli_writes_records(tmp_path, capsys):
    import pandas as pd

    from geffect.cli import main
    out = tmp_path / "run"
    rc = main(["profile", "--model", "tiny-llama", "--method", "npo+gd", "--steps", "3", "--memorize", "no",
               "--probe-every", "2", "--out", str(out), "--no-progress", "--no-save-model"])
    assert rc == 0
    assert "cumulative G-effect" in capsys.readouterr().out
    ge = pd.read_csv(out / "geffect.csv")
    assert set(ge.columns) >= {"step", "source", "direction", "risk", "group", "value"}
    assert set(ge["source"]) == {"batch", "probe"} and sorted(set(ge[ge.source == "probe"].step)) == [0, 2]
    assert set(ge["group"]) == {"embed", "shallow", "middle", "deep", "lm", "total"}
    inst = pd.read_csv(out / "instances.csv")
    assert set(inst.columns) >= {"step", "split", "index", "value", "weight"}
    # per step: e_u (batch) is the mean of the forget PG-effects
    for step in range(3):
        e_u = ge[(ge.step == step) & (ge.source == "batch") & (ge.risk == "unlearn") & (ge.group == "total")].value.item()
        pg = inst[(inst.step == step) & (inst.source == "batch") & (inst.split == "forget")].value.mean()
        assert abs(e_u - pg) <= 1e-5 * max(1, abs(e_u))
    assert inst[(inst.split == "forget") & (inst.source == "batch")].weight.notna().all()


def test_update_direction_matches_first_order_change(tmp_path):
    """With SGD the update is −η∇L, so the update-direction G-effect equals the gradient one."""
    from geffect.config import UnlearnConfig
    from geffect.loop import unlearn
    base = {"method": "gd", "model": "tiny-gpt2", "steps": 2, "optimizer": "sgd", "lr": 1e-2, "warmup_steps": 0,
            "progress": False, "save_model": False, "memorize": "no"}
    a = unlearn(UnlearnConfig(**base), profile=ProfileConfig(direction="grad"))["geffect"]
    b = unlearn(UnlearnConfig(**base), profile=ProfileConfig(direction="update"))["geffect"]
    for ra, rb in zip(a, b):
        assert ra["group"] == rb["group"] and rb["direction"] == "update"
        assert abs(ra["value"] - rb["value"]) <= 1e-3 * max(1.0, abs(ra["value"]))


def test_measure_api_json_schema():
    from geffect import measure
    res = measure("npo+gd", "tiny-llama", memorize="no")
    assert set(res["unlearn"]) == {"embed", "shallow", "middle", "deep", "lm", "total"}
    assert {"split", "index", "value", "weight"} <= set(res["per_instance"][0])
    fv = [r["value"] for r in res["per_instance"] if r["split"] == "forget"]
    assert abs(sum(fv) / len(fv) - res["unlearn"]["total"]) <= 1e-5 * max(1, abs(res["unlearn"]["total"]))


@pytest.mark.parametrize("gram_form", [False, True, "rows"])
@pytest.mark.parametrize("spec", ["ga", "gd", "npo+gd", "simnpo", "wga", "tnpo+kl"])
def test_instance_pairs_match_one_instance_at_a_time(tiny, spec, gram_form, monkeypatch):
    """Fig. 5b pairs: (∇R_uᵀ∇L(s_i), ∇R_rᵀ∇L(s_i)) against a forward of s_i alone, per group; the
    Linear layers' risk gradients formed, or in Gram form (engine/pairs.py), or taken with the
    G-effect products ("rows": engine/gramrows.py, on the reuse path's single forward)."""
    from geffect.engine import gram
    monkeypatch.setattr(gram, "FORCE", gram_form if gram_form != "rows" else None)
    monkeypatch.setattr(gramrows, "FORCE", gram_form == "rows")
    from geffect.data.batching import qa
    from geffect.data.sampling import MicroBatch
    from geffect.engine import Due
    from geffect.surgery import param_groups
    data, method = tiny_data(), method_of(spec)
    model, tok = tiny.model, tiny.tokenizer
    _, ref = setup(model, method)
    batch = collate(tok, {"forget": qa(data.forget), "retain": qa(data.retain)}, 128)
    mb = MicroBatch(batch, list(range(len(data.forget))), list(range(len(data.retain))))
    eng, res = engine_step(model, method, mb, ref, due=Due(effects=True, pairs=True))
    pairs = {"unlearn": res.pairs[0].unlearn, "retain": res.pairs[0].retain}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, eng.assignment)
    fo = forward(model, ref, batch, method)
    risk_grads = {}
    for risk, seg in (("unlearn", "forget"), ("retain", "retain")):
        risk_grads[risk] = torch.autograd.grad(fn.nll_loss(*fo.seg(seg)), params, retain_graph=True)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    for i, rec in enumerate(data.forget):
        one = collate(tok, {"forget": qa([rec]), "retain": qa(data.retain)}, 128)
        g_i = torch.autograd.grad(method.gamma * method.parts(forward(model, ref, one, method)).forget, params)
        for risk in ("unlearn", "retain"):
            dots = [(groups[id(p)], torch.dot(a.flatten().double(), b.flatten().double()).item())
                    for p, a, b in zip(params, risk_grads[risk], g_i)]
            total = sum(d for _, d in dots)
            assert pairs[risk][i].sum().item() == pytest.approx(total, rel=2e-3, abs=1e-6)
            if not tied:  # tied: the engine splits the shared tensor by use, the brute force cannot
                for gi, g in enumerate(eng.groups):
                    want = sum(d for grp, d in dots if grp == g)
                    assert pairs[risk][i, gi].item() == pytest.approx(want, rel=2e-3, abs=1e-6)


@pytest.mark.parametrize("full_logits", [False, True])
def test_token_effects_match_per_token_autograd(tiny, full_logits, monkeypatch):
    """e_{i,t} = ∇nll_{i,t}ᵀV by forward-mode AD against one backward per token (the output
    projection at the answer-predicting positions only, or everywhere)."""
    from geffect.data.batching import qa
    from geffect.engine import tokens
    from geffect.engine.tokens import token_effects
    monkeypatch.setattr(tokens, "FULL_LOGITS_ONLY", full_logits)
    model, tok = tiny.model, tiny.tokenizer
    assert tokens.answer_logits_only(model) is not full_logits
    b = collate(tok, {"forget": qa(tiny_data().forget)}, 128)
    gen = torch.Generator().manual_seed(0)
    V = {id(p): torch.randn(p.shape, generator=gen) for p in model.parameters()}
    e = token_effects(model, b.input_ids, b.attention_mask, b.labels, V)
    pos = torch.arange(b.input_ids.shape[1]).expand_as(b.input_ids)
    nll, mask = fn.token_nll(model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                                   use_cache=False).logits, b.labels)
    params = list(model.parameters())
    assert (e[mask == 0] == 0).all()
    for i in range(len(b.input_ids)):
        answer = mask[i].nonzero().flatten().tolist()
        for t in (answer[0], answer[len(answer) // 2], answer[-1]):
            g = torch.autograd.grad(nll[i, t], params, retain_graph=True)
            want = sum(torch.dot(gi.flatten().double(), V[id(p)].flatten().double()) for gi, p in zip(g, params))
            assert e[i, t].item() == pytest.approx(want.item(), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("full_logits", [False, True])
def test_token_effects_cut_the_columns_padded_in_every_row(tiny, full_logits, monkeypatch):
    """The forget rows padded further (a batch whose retain rows are longer): the same e_{i,t}, zeros
    on the added columns, and the forward-mode pass runs on the rows' own length."""
    from geffect.data.batching import IGNORE, qa
    from geffect.engine import tokens
    from geffect.engine.tokens import token_effects
    monkeypatch.setattr(tokens, "FULL_LOGITS_ONLY", full_logits)
    model, tok = tiny.model, tiny.tokenizer
    b = collate(tok, {"forget": qa(tiny_data().forget)}, 128)
    gen = torch.Generator().manual_seed(0)
    V = {id(p): torch.randn(p.shape, generator=gen) for p in model.parameters()}
    e = token_effects(model, b.input_ids, b.attention_mask, b.labels, V)
    N, T, extra = *b.input_ids.shape, 7
    ids = torch.cat([b.input_ids, torch.full((N, extra), tok.pad_token_id)], 1)
    att = torch.cat([b.attention_mask, torch.zeros(N, extra, dtype=b.attention_mask.dtype)], 1)
    lab = torch.cat([b.labels, torch.full((N, extra), IGNORE)], 1)
    widths = []
    real = tokens.functional_call
    monkeypatch.setattr(tokens, "functional_call", lambda m, ps, a, kw: widths.append(kw["input_ids"].shape[1])
                        or real(m, ps, a, kw))
    e_pad = token_effects(model, ids, att, lab, V)
    assert e_pad.shape == (N, T + extra - 1)
    assert torch.allclose(e_pad[:, :T - 1], e, rtol=1e-5, atol=1e-7) and (e_pad[:, T - 1:] == 0).all()
    assert widths and set(widths) == {T}


def test_token_effects_average_to_the_instance_pg_effect(tmp_path):
    """In a profile run, the mean of e_{i,t} over an answer's tokens is the instance's PG-effect."""
    import pandas as pd

    from geffect.config import UnlearnConfig
    from geffect.loop import unlearn
    for direction in ("grad", "update"):
        s = unlearn(UnlearnConfig(method="wga+kl", model="tiny-llama", steps=2, memorize="no", progress=False,
                                  save_model=False, lr=1e-3),
                    profile=ProfileConfig(tokens_every=1, direction=direction))
        toks, inst = pd.DataFrame(s["tokens"]), pd.DataFrame(s["instances"])
        assert toks["geffect"].notna().all() and toks["weight"].notna().all()
        mean_tok = toks.groupby(["step", "index"])["geffect"].mean()
        pg = inst[(inst.split == "forget") & (inst.source == "batch")].set_index(["step", "index"])["value"]
        for key, v in mean_tok.items():
            assert v == pytest.approx(pg[key], rel=2e-3, abs=1e-6), (direction, key)


def _other_arch(kind):
    """Tiny Qwen2-, Phi- and GPT-NeoX-style models with the byte tokenizer."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        PhiConfig,
        PhiForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from geffect.models import LoadedModel, byte_tokenizer
    tok = byte_tokenizer(None)
    common = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "max_position_embeddings": 512, "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    torch.manual_seed(0)
    model = {"qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2,
                                                           tie_word_embeddings=True)),
             "phi": lambda: PhiForCausalLM(PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     attention_dropout=0.0)),
             "gpt-neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**common, attention_dropout=0.0,
                                                                  hidden_dropout=0.0)),
             }[kind]()
    model.eval()
    return LoadedModel(model, tok, kind)


@pytest.mark.parametrize("spec", ["gd", "npo+kl"])
@pytest.mark.parametrize("kind", ["qwen2", "phi", "gpt-neox"])
def test_other_architectures_group_and_match_autograd(kind, spec):
    lm = _other_arch(kind)
    model, method, data = lm.model, method_of(spec), tiny_data()
    assignment = assign_groups(model)
    owned = [id(p) for name in assignment for p in model.get_submodule(name).parameters(recurse=False)]
    assert sorted(set(owned)) == sorted({id(p) for p in model.parameters()})   # every tensor in a group
    assert {"embed", "shallow", "middle", "deep", "lm"} == set(assignment.values())
    ctx, ref = setup(model, method)
    mb = micro_batch(lm.tokenizer, method, data)
    eng, res = engine_step(model, method, mb, ref, ctx=ctx)
    assert_matches_twin(model, lm.tokenizer, method, mb, ref, ctx, per_split(res), eng.groups, data)
