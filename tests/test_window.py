"""The answer window: logits only at the positions whose next token is an answer token in some row
(``logits_to_keep``), against every position's logits (``forward.FULL_LOGITS``, the slow twin)."""
from __future__ import annotations

import pytest
import torch

from geffect import forward as fwd
from geffect.config import ProfileConfig
from geffect.data.batching import IGNORE, Batch, answer_window
from geffect.engine import Due
from geffect.eval.nll import row_nll
from geffect.objectives import functional as fn
from tests.helpers import engine_step, method_of, micro_batch, models, setup, tiny_data


def labels_of(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_answer_window_starts_where_the_first_answer_token_is_predicted():
    x = IGNORE
    # row 0: answer tokens at 4, 5; row 1: at 3 (predicted by position 2) -> positions 2..5 kept
    labels = labels_of([[x, x, x, x, 7, 8], [x, x, x, 9, x, x]])
    assert answer_window(labels) == 4
    assert answer_window(labels_of([[x, x, x, x, x, 5]])) == 2          # the last two positions
    assert answer_window(labels_of([[x, 3, 4, 5, x, x]])) == 6          # from position 0: all
    assert answer_window(labels_of([[x, x, x]])) == 3                   # no answer: every position
    assert answer_window(torch.empty(2, 5, dtype=torch.long, device="meta")) is None
    b = Batch(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long), labels, {})
    assert b.window == 4 and b.to("cpu").window == 4                    # taken on the host, carried along


def test_token_nll_and_kl_of_the_window_equal_the_full_logits():
    torch.manual_seed(0)
    x = IGNORE
    labels = labels_of([[x, x, x, x, 7, 8, x], [x, x, x, 9, 2, x, x], [x, x, x, x, x, 1, 3]])
    N, T, V = labels.shape[0], labels.shape[1], 11
    logits, ref = torch.randn(N, T, V), torch.randn(N, T, V)
    k = answer_window(labels)
    assert k == 5 < T
    nll, mask = fn.token_nll(logits, labels)
    nll_w, mask_w = fn.token_nll(logits[:, -k:], labels)
    assert nll_w.shape == (N, T - 1) and torch.equal(mask_w, mask)
    torch.testing.assert_close(nll_w, nll, rtol=0, atol=0)
    # by hand at one token: row 1 predicts 9 at position 2
    assert nll[1, 2].item() == pytest.approx(-torch.log_softmax(logits[1, 2], -1)[9].item(), rel=1e-6)
    kl, kl_w = fn.forward_kl(logits, ref, labels), fn.forward_kl(logits[:, -k:], ref[:, -k:], labels)
    assert kl.item() > 0 and kl_w.item() == pytest.approx(kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="before the logits' window"):
        fn.token_nll(logits[:, -(k - 1):], labels)                       # one answer token cut off
    assert fn.forward_kl(logits[:, -k:], ref, labels).item() == pytest.approx(kl.item(), rel=1e-6)   # θ_o: all
    assert fn.forward_kl(logits, ref[:, -k:], labels).item() == pytest.approx(kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="before the logits' window"):
        fn.forward_kl(logits[:, -(k - 1):], ref, labels)


def away_from_reference(model) -> None:
    """Move θ off θ_o, where KL and its gradient are zero (its parts' statistics then only rounding)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.abs().mean().clamp_min(1e-3))


@pytest.mark.parametrize("kind,model,tok", list(models()), ids=lambda v: v if isinstance(v, str) else "")
def test_forward_through_the_window_equals_every_position(kind, model, tok, monkeypatch):
    """The training forward's NLL, loss and gradient through ``logits_to_keep`` against full logits."""
    method = method_of("npo+kl")
    data = tiny_data(3, 3)
    mb = micro_batch(tok, method, data)
    b = mb.batch
    assert b.window < b.labels.shape[1], "the test batch must have a window shorter than its rows"
    ctx, ref = setup(model, method)
    away_from_reference(model)
    out = {}
    for full in (True, False):
        monkeypatch.setattr(fwd, "FULL_LOGITS", full)
        model.zero_grad(set_to_none=True)
        fo = fwd.forward(model, ref, b, method, ctx)
        loss = method.parts(fo, ctx).total
        loss.backward()
        out[full] = (fo.logits.shape, fo.nll.detach(), loss.item(),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (shape_f, nll_f, loss_f, g_f), (shape_w, nll_w, loss_w, g_w) = out[True], out[False]
    assert shape_f[1] == b.labels.shape[1] and shape_w[1] == b.window          # fewer positions' logits
    torch.testing.assert_close(nll_w, nll_f, rtol=1e-5, atol=1e-6)
    assert loss_w == pytest.approx(loss_f, rel=1e-5)
    assert g_w.keys() == g_f.keys()
    for n in g_f:
        torch.testing.assert_close(g_w[n], g_f[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("spec", ["npo+gd", "ga+kl", "simnpo+gd+pcgrad"])
@pytest.mark.parametrize("kind,model,tok", list(models()), ids=lambda v: v if isinstance(v, str) else "")
def test_profiled_step_through_the_window_gives_the_full_logits_values(kind, model, tok, spec, monkeypatch):
    """Every per-instance G-effect and conflict statistic of a profiled step, with the output projection
    capturing the window's positions only, against the same step with every position's logits."""
    method = method_of(spec)
    mb = micro_batch(tok, method, tiny_data(3, 3))
    ctx, ref = setup(model, method)
    away_from_reference(model)
    got = {}
    for full in (True, False):
        monkeypatch.setattr(fwd, "FULL_LOGITS", full)
        _, res = engine_step(model, method, mb, ref, ProfileConfig(), ctx, Due(effects=True, conflicts=True))
        e = next(x for x in res.effects if x.source == "batch")
        got[full] = (e.forget, e.retain, res.conflicts)
    for a, b in zip(got[True][:2], got[False][:2]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7 * a.abs().max().item())
    assert got[True][2], "conflict statistics were due"
    for a, b in zip(got[True][2], got[False][2]):
        assert a.keys() == b.keys()
        for key, v in a.items():
            if isinstance(v, float):
                assert b[key] == pytest.approx(v, rel=1e-3, abs=1e-6), key


def test_row_nll_through_the_window_equals_every_position(tiny, monkeypatch):
    data = tiny_data(3, 3)
    vals = {}
    for full in (True, False):
        monkeypatch.setattr(fwd, "FULL_LOGITS", full)
        vals[full] = row_nll(tiny.model, tiny.tokenizer, data.forget + data.retain, 96, batch_size=4)
    assert (vals[True] > 0).all()
    torch.testing.assert_close(vals[False], vals[True], rtol=1e-5, atol=1e-6)


def test_keeps_logits_sees_through_peft_and_falls_back_without_the_keyword(tiny):
    peft = pytest.importorskip("peft")
    assert fwd.keeps_logits(tiny.model)
    lora = peft.get_peft_model(tiny.model, peft.LoraConfig(r=2, target_modules=["q_proj", "c_attn"]))
    assert fwd.keeps_logits(lora)

    class NoKeyword(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    b = Batch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long),
              labels_of([[IGNORE, IGNORE, IGNORE, 3]]), {})
    assert fwd.logits_window(NoKeyword(), b) == {}
    assert fwd.logits_window(tiny.model, b) == {"logits_to_keep": 2}


def test_cache_keyword_follows_the_models_signature_and_decoding_warns_of_none(tiny):
    """transformers 5.2x takes the key/value cache as ``cache`` (``past_key_values`` warns, to be removed);
    earlier versions as ``past_key_values``: the keyword is read from the signature."""
    import warnings

    from geffect.eval.generate import greedy_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    marker = object()
    assert fwd.cache_kwargs(Old(), marker) == {"past_key_values": marker}
    want = "cache" if "cache" in __import__("inspect").signature(tiny.model.forward).parameters else "past_key_values"
    assert fwd.cache_kwargs(tiny.model, marker) == {want: marker}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = greedy_ids(tiny.model, [[5, 6, 7], [8, 9]], max_new_tokens=4)
    assert len(out) == 2 and all(len(x) <= 4 for x in out)
    assert not [w for w in seen if "past_key_values" in str(w.message)]
