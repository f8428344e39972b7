"""The G-effect engine against slow twins: full autograd gradients, one sample at a time."""
import copy
import random

import pytest
import torch

from geffect.data.batching import collate
from geffect.data.synthetic import default_splits, idk_answers
from geffect.engine.groups import assign_groups
from geffect.engine.profiler import Engine, ProfileConfig
from geffect.engine.rules import jvp_rule, rule_for
from geffect.models import frozen_reference
from geffect.objectives import Hyper, parse_method
from geffect.objectives import functional as fn
from geffect.unlearn import Data, forward, make_batch, part_rows

METHODS = ["ga", "gd", "npo+gd", "npo+kl", "simnpo", "wga+kl", "tnpo", "wtnpo+gd", "po+gd", "idkdpo+gd",
           "rmu", "llmu"]


def _data():
    sp = default_splits(0)
    return Data(sp["forget"][:3], sp["retain"][:2], [], idk_answers(), True)


def engine_step(model, method, batch, ref, cfg=None):
    eng = Engine(model, cfg)
    layer = 1 if method.needs_hidden else None
    control = fn.rmu_control(model.config.hidden_size, 6.5) if method.needs_hidden else None
    with eng.capture() as cap:
        fo = forward(model, ref, batch, method, layer)
        parts = method.parts(fo, control)
        model.zero_grad()
        eng.last_path = eng.backward(cap, fo, parts.total, method.needs_hidden)
    return eng, eng.measure(cap, batch.segments, eng.direction_from_grads())


def untied_twin(model):
    """A copy whose output projection is a separate parameter (same values)."""
    twin = copy.deepcopy(model)
    out = twin.get_output_embeddings()
    if out.weight is twin.get_input_embeddings().weight:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
    return twin


def brute_force(model, method, batch, records, ref, split):
    """Per-instance per-group ⟨∇ℓ_i, ∇L⟩ with ℓ_i from a one-sample forward, by plain autograd."""
    twin = untied_twin(model)
    tied = twin.get_output_embeddings().weight is not model.get_output_embeddings().weight and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    layer = 1 if method.needs_hidden else None
    control = fn.rmu_control(model.config.hidden_size, 6.5) if method.needs_hidden else None
    twin.zero_grad()
    method.parts(forward(twin, ref, batch, method, layer), control).total.backward()
    params = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    gL = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    if tied and twin.get_input_embeddings().weight.requires_grad:  # ∇L of a shared tensor: sum of both uses
        ni = next(n for n, p in params.items() if p is twin.get_input_embeddings().weight)
        no = next(n for n, p in params.items() if p is twin.get_output_embeddings().weight)
        gL[ni] = gL[no] = gL[ni] + gL[no]
    groups = assign_groups(twin)
    rows = []
    for r in records:
        b = collate(model_tok[0], {"x": [(r.question, r.answer, "")]}, 96)
        logits = twin(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        ell = fn.mean_nll(*fn.token_nll(logits, b.labels))[0]
        grads = torch.autograd.grad(ell, list(params.values()), allow_unused=True)
        vals = {}
        for (n, p), g in zip(params.items(), grads):
            if g is None or not p.requires_grad:
                continue
            grp = groups[n.rsplit(".", 1)[0]]
            vals[grp] = vals.get(grp, 0.0) + (g.double() * gL[n].double()).sum().item()
        rows.append(vals)
    return rows


model_tok = [None]


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("spec", METHODS)
def test_per_instance_and_group_effects_match_autograd(tiny, spec, reuse):
    model_tok[0] = tiny.tokenizer
    method = parse_method(spec, Hyper(rmu_layer=1))
    data = _data()
    model = tiny.model
    if method.needs_hidden:
        from geffect.layers import find_blocks
        model.requires_grad_(False)
        find_blocks(model)[1][0].requires_grad_(True)
        find_blocks(model)[1][1].requires_grad_(True)
    ref = frozen_reference(model)
    batch = make_batch(tiny.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
    eng, res = engine_step(model, method, batch, ref, ProfileConfig(reuse_backward=reuse))
    # the reuse path applies exactly to per-instance reweightings of the NLL
    # (GA or SimNPO alone leave the retain rows without a training cotangent: extra backward)
    expect_reuse = reuse and spec in ("gd", "npo+gd", "idkdpo+gd")
    assert eng.last_path == ("reuse" if expect_reuse else "extra"), eng.last_path
    for split, recs in (("forget", data.forget), ("retain", data.retain)):
        brute = brute_force(model, method, batch, recs, ref, split)
        for i, vals in enumerate(brute):
            for gi, g in enumerate(eng.groups):
                want = vals.get(g, 0.0)
                got = res[split][i, gi].item()
                assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (split, i, g, got, want)
    # invariants: groups sum to the total; e_u = mean of the forget PG-effects
    s = eng.summarise(res)
    assert abs(sum(v for k, v in s["unlearn"].items() if k != "total") - s["unlearn"]["total"]) < 1e-9
    tot = s["unlearn"]["total"]
    assert abs(res["forget"].sum(1).double().mean().item() - tot) <= 1e-5 * max(1.0, abs(tot))


@pytest.mark.parametrize("spec", ["ga", "npo", "simnpo", "tnpo"])
def test_retain_rows_as_own_chunk_match_autograd(tiny, spec):
    """Objectives that never read the retain rows, with the retain rows forwarded as their own chunk
    (as the profiled loop does): the forget rows reuse the training backward and one backward of the
    retain chunk alone gives R_r's cotangents (per-instance reweightings: GA, NPO, SimNPO); a
    token-weighted objective (TNPO) takes the extra backward. Values against one-sample autograd."""
    model_tok[0] = tiny.tokenizer
    method = parse_method(spec)
    assert not method.has_retain_part
    data = _data()
    model = tiny.model
    ref = frozen_reference(model) if method.needs_ref else None
    if ref is not None:   # θ_o ≠ θ, so that NPO-family weights differ between instances and tokens
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for q in ref.parameters():
                q.add_(0.05 * torch.randn(q.shape, generator=gen))
    batch = make_batch(tiny.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
    eng = Engine(model)
    with eng.capture() as cap:
        fo = forward(model, ref, batch, method, None, part_rows(batch.segments), cap)
        loss = method.parts(fo.views[0]).total
        model.zero_grad()
        path = eng.backward(cap, fo, loss)
    assert path == ("extra" if spec == "tnpo" else "reuse+retain")
    res = eng.measure(cap, batch.segments, eng.direction_from_grads())
    for split, recs in (("forget", data.forget), ("retain", data.retain)):
        for i, vals in enumerate(brute_force(model, method, batch, recs, ref, split)):
            for gi, g in enumerate(eng.groups):
                want, got = vals.get(g, 0.0), res[split][i, gi].item()
                assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (split, i, g, got, want)


def test_ga_unlearning_effect_is_minus_squared_norm(tiny):
    """For GA, e_u = ∇R_uᵀ∇(−R_u) = −‖∇R_u‖² (forget rows only in the batch's forget risk)."""
    method = parse_method("ga")
    data = _data()
    model = tiny.model
    batch = make_batch(tiny.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
    eng, res = engine_step(model, method, batch, None)
    e_u = eng.summarise(res)["unlearn"]["total"]
    sq = sum((p.grad.double() ** 2).sum().item() for p in model.parameters() if p.grad is not None)
    assert e_u < 0
    assert abs(e_u + sq) <= 1e-5 * sq


def test_reuse_only_when_the_loss_reads_the_model_through_the_nll(tiny):
    """A loss whose NLL cotangents are proportional to the risk's but that also reads the logits
    directly must not reuse the training backward: the graph check sends it to the extra backward,
    and its values equal the extra backward's (validated against autograd above)."""
    method = parse_method("gd")
    data = _data()
    model = tiny.model
    batch = make_batch(tiny.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
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
        res.append(eng.measure(cap, batch.segments, eng.direction_from_grads()))
    assert paths == ["extra", "extra"]
    for split in res[0]:
        assert torch.allclose(res[0][split], res[1][split], rtol=1e-5, atol=1e-7)


def test_padding_changes_no_effect(tiny):
    method = parse_method("npo+gd")
    data = _data()
    model = tiny.model
    ref = frozen_reference(model)
    batch = make_batch(tiny.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
    _, a = engine_step(model, method, batch, ref)
    k, pad = 5, tiny.tokenizer.pad_token_id
    n = len(batch.input_ids)
    wide = type(batch)(torch.cat([batch.input_ids, torch.full((n, k), pad)], 1),
                       torch.cat([batch.attention_mask, torch.zeros(n, k, dtype=torch.long)], 1),
                       torch.cat([batch.labels, torch.full((n, k), -100)], 1), batch.segments)
    _, b = engine_step(model, method, wide, ref)
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
    from geffect.engine import ProfileConfig
    from geffect.unlearn import UnlearnConfig, unlearn
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


@pytest.mark.parametrize("spec", ["ga", "npo+gd", "simnpo", "wga", "tnpo+kl"])
def test_instance_pairs_match_one_instance_at_a_time(tiny, spec):
    """Fig. 5b pairs: (∇R_uᵀ∇L(s_i), ∇R_rᵀ∇L(s_i)) against a forward of s_i alone, per group."""
    from geffect.data.batching import qa
    from geffect.surgery import param_groups
    data = _data()
    method = parse_method(spec)
    model, tok = tiny.model, tiny.tokenizer
    ref = frozen_reference(model)
    batch = collate(tok, {"forget": qa(data.forget), "retain": qa(data.retain)}, 128)
    eng = Engine(model)
    with eng.capture() as cap:
        fo = forward(model, ref, batch, method)
        pairs = eng.instance_pairs(cap, fo, method.gamma * method.parts(fo).forget)
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


def test_token_effects_match_per_token_autograd(tiny):
    """e_{i,t} = ∇nll_{i,t}ᵀV by forward-mode AD against one backward per token."""
    from geffect.data.batching import qa
    from geffect.engine.tokens import token_effects
    model, tok = tiny.model, tiny.tokenizer
    b = collate(tok, {"forget": qa(_data().forget)}, 128)
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


def test_token_effects_average_to_the_instance_pg_effect(tmp_path):
    """In a profile run, the mean of e_{i,t} over an answer's tokens is the instance's PG-effect."""
    import pandas as pd

    from geffect.unlearn import UnlearnConfig, unlearn
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
    model_tok[0] = lm.tokenizer
    model, method, data = lm.model, parse_method(spec), _data()
    assignment = assign_groups(model)
    owned = [id(p) for name in assignment for p in model.get_submodule(name).parameters(recurse=False)]
    assert sorted(set(owned)) == sorted({id(p) for p in model.parameters()})   # every tensor in a group
    assert {"embed", "shallow", "middle", "deep", "lm"} == set(assignment.values())
    ref = frozen_reference(model)
    batch = make_batch(lm.tokenizer, method, data.forget, data.retain, data, random.Random(0), 96)
    eng, res = engine_step(model, method, batch, ref)
    for split, recs in (("forget", data.forget), ("retain", data.retain)):
        for i, vals in enumerate(brute_force(model, method, batch, recs, ref, split)):
            for gi, g in enumerate(eng.groups):
                want, got = vals.get(g, 0.0), res[split][i, gi].item()
                assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (kind, split, i, g, got, want)
