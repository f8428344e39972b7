"""One evaluation of a model: the metrics unlearning is judged by, from shared passes.

- ``tofu``: TOFU's per-item log of the forget and retain sets (:mod:`geffect.eval.tofu_log`) and its
  aggregates (:func:`geffect.eval.tofu.aggregate`): probability, ROUGE-L recall, truth ratio per
  set, model utility (their harmonic mean on the sets given: retain here, so 3 components where
  TOFU has 9 with its real-author and world-fact sets) and, with a reference's forget truth ratios,
  forget quality.
- ``mia``: the membership inference scores of the forget set (members) against the holdout set
  (non-members): member and non-member NLL and the ROC-AUC of LOSS, ZLib, Min-K% and Min-K%++.
- ``toxicity``: the share of toxic greedy answers to the forget questions and, when toxic prompts are
  given, of the greedy continuations of those prompts.
- ``perplexity``: token and word perplexity of a text corpus.

The forget answers are scored once (TOFU's loss and the attacks share them) and generated once
(ROUGE and toxicity share them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from geffect.data.prompts import PromptFormat
from geffect.data.records import QARecord
from geffect.errors import DataError

METRICS = ("tofu", "mia", "toxicity", "perplexity")


@dataclass
class EvalSets:
    forget: list[QARecord]
    retain: list[QARecord]
    holdout: list[QARecord] = field(default_factory=list)   # non-members for membership inference
    toxic_prompts: list[str] = field(default_factory=list)  # prompts whose continuations are classified
    text: str | None = None                                 # the perplexity corpus


@dataclass
class EvalOptions:
    metrics: tuple[str, ...] = METRICS
    fmt: str | PromptFormat = "chat"
    max_length: int = 128
    batch_size: int = 16
    max_new_tokens: int = 64
    min_k: float = 0.4
    toxicity_model: str | None = None
    reference: dict | None = None           # a reference model's forget truth ratios, by item id
    perplexity_window: int = 512


def check_metrics(metrics) -> tuple[str, ...]:
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        from geffect.errors import ConfigError
        raise ConfigError(f"--metrics {' '.join(bad)}: unknown (choose from {', '.join(METRICS)})")
    return tuple(dict.fromkeys(metrics))


def evaluate(model, tok, sets: EvalSets, opts: EvalOptions, log=None) -> dict:
    """``{"metrics": {name: value}, "logs": {set: TOFU log}, "seconds": {metric: s}, "skipped": {metric: why}}``;
    ``log(message)`` reports progress."""
    from geffect.eval import mia, tofu
    from geffect.eval.generate import generate
    from geffect.eval.scoring import score_answers
    from geffect.eval.tofu_log import tofu_log

    metrics, say = check_metrics(opts.metrics), log or (lambda _msg: None)
    out: dict = {"metrics": {}, "logs": {}, "seconds": {}, "skipped": {}}
    common = {"fmt": opts.fmt, "max_length": opts.max_length, "batch_size": opts.batch_size}
    forget_gen, forget_scores = None, None
    if "mia" in metrics and not sets.holdout:
        out["skipped"]["mia"] = "no holdout set (non-members): give --holdout"
        metrics = tuple(m for m in metrics if m != "mia")
    if "tofu" in metrics:
        t0 = time.perf_counter()
        say(f"TOFU metrics: {len(sets.forget)} forget and {len(sets.retain)} retain items")
        logs = {}
        # one generation for both sets: a decode step costs about the same for 8 rows as for 32
        answers = generate(model, tok, [r.question for r in sets.forget + sets.retain], opts.fmt,
                           opts.max_new_tokens, max(opts.batch_size, 32))
        forget_gen = answers[:len(sets.forget)]
        for name, recs, gen in (("forget", sets.forget, forget_gen), ("retain", sets.retain,
                                                                      answers[len(sets.forget):])):
            logs[name], scores = tofu_log(model, tok, recs, max_new_tokens=opts.max_new_tokens,
                                          with_z="mia" in metrics and name == "forget", generations=gen, **common)
            if name == "forget":
                forget_scores = scores
        out["logs"] = logs
        reference = {"forget": {"truth_ratio": opts.reference}} if opts.reference is not None else None
        agg = tofu.aggregate({k: tofu.items(v, k, f"{k} set") for k, v in logs.items()}, reference,
                             "--reference")
        out["metrics"] |= agg
        out["seconds"]["tofu"] = time.perf_counter() - t0
    if "mia" in metrics:
        t0 = time.perf_counter()
        say(f"membership inference: {len(sets.forget)} members (forget), {len(sets.holdout)} non-members (holdout)")
        pairs = {n: [(r.question, r.answer, r.source) for r in recs] for n, recs in
                 (("forget", sets.forget), ("holdout", sets.holdout))}
        if forget_scores is None:
            forget_scores = score_answers(model, tok, pairs["forget"], with_z=True, **common)
        held = score_answers(model, tok, pairs["holdout"], with_z=True, **common)
        out["metrics"] |= mia.mia_report(
            mia.attack_scores(forget_scores, [r.answer for r in sets.forget], opts.min_k),
            mia.attack_scores(held, [r.answer for r in sets.holdout], opts.min_k))
        out["seconds"]["mia"] = time.perf_counter() - t0
    if "toxicity" in metrics:
        from geffect.eval.toxicity import load_classifier, toxicity_share
        t0 = time.perf_counter()
        say("toxicity" + (f": continuations of {len(sets.toxic_prompts)} prompts" if sets.toxic_prompts else ""))
        classify = load_classifier(opts.toxicity_model)
        if forget_gen is None:
            forget_gen = generate(model, tok, [r.question for r in sets.forget], opts.fmt, opts.max_new_tokens,
                                  opts.batch_size)
        out["metrics"]["toxicity_forget_answers"] = toxicity_share(classify(forget_gen))
        if sets.toxic_prompts:
            cont = generate(model, tok, sets.toxic_prompts, opts.fmt, opts.max_new_tokens, opts.batch_size)
            out["metrics"]["toxicity"] = toxicity_share(classify(cont))
            out["continuations"] = cont
        out["seconds"]["toxicity"] = time.perf_counter() - t0
    if "perplexity" in metrics:
        from geffect.eval.perplexity import perplexity
        if sets.text is None:
            raise DataError("perplexity: no text given")
        t0 = time.perf_counter()
        say("perplexity")
        out["metrics"] |= perplexity(model, tok, sets.text, opts.perplexity_window, max(1, opts.batch_size // 4))
        out["seconds"]["perplexity"] = time.perf_counter() - t0
    return out


class RunEvaluator:
    """TOFU's metrics along a run (``--eval-every``): a fixed seeded sample of ``size`` forget and retain
    items, evaluated by :func:`evaluate` with ``metrics=("tofu",)``; rows for ``eval.csv``. It uses no
    random numbers and restores the model's mode, so the run trains exactly as without it."""

    def __init__(self, tok, forget: list[QARecord], retain: list[QARecord], fmt, max_length: int, size: int,
                 max_new_tokens: int, seed: int, reference: dict | None = None, batch_size: int = 16):
        import random
        f_idx = _sample(len(forget), size, random.Random(seed + 11))
        r_idx = _sample(len(retain), size, random.Random(seed + 12))
        self.tok, self.sets = tok, EvalSets([forget[i] for i in f_idx], [retain[i] for i in r_idx])
        if reference is not None:      # keyed by the whole forget set's indices: keep the sample's
            reference = {str(j): reference[str(i)] for j, i in enumerate(f_idx)}
        self.opts = EvalOptions(metrics=("tofu",), fmt=fmt, max_length=max_length, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, reference=reference)
        self.seconds = 0.0

    def __call__(self, model, step: int) -> list[dict]:
        t0 = time.perf_counter()
        res = evaluate(model, self.tok, self.sets, self.opts)
        dt = time.perf_counter() - t0
        self.seconds += dt
        items = f"{len(self.sets.forget)}+{len(self.sets.retain)}"
        return [{"step": step, "metric": k, "value": float(v), "items": items, "seconds": dt}
                for k, v in res["metrics"].items() if k != "model_utility_components"]


def _sample(n: int, size: int, rng) -> list[int]:
    return list(range(n)) if size <= 0 or size >= n else sorted(rng.sample(range(n), size))
