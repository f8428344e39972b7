"""TOFU's per-item evaluation log, computed from a model as TOFU's ``evaluate_util.py`` computes it.

Per item (keyed by its index as a string, as TOFU keys them): ``avg_gt_loss`` (mean token NLL of
the answer), ``avg_paraphrased_loss``, ``average_perturb_loss`` (one per perturbed answer),
``rougeL_recall`` (ROUGE-L recall of the greedy answer against the answer, with ``rouge-score``'s
stemmer, as TOFU calls it) and ``generated_text`` ([question, greedy answer, answer]). The log is
what :func:`geffect.eval.tofu.items` aggregates, so geffect's logs and TOFU's published ones go
through the same code.
"""
from __future__ import annotations

from geffect.data.prompts import PromptFormat
from geffect.data.records import QARecord
from geffect.eval.generate import generate
from geffect.eval.scoring import AnswerScores, score_answers


def rouge_l_recall(answers: list[str], generations: list[str]) -> list[float]:
    """ROUGE-L recall of each generation against its answer (``rouge_scorer.score(target, prediction)``)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(a, g)["rougeL"].recall for a, g in zip(answers, generations)]


def tofu_log(model, tok, records: list[QARecord], fmt: str | PromptFormat = "chat", max_length: int = 128,
             batch_size: int = 16, max_new_tokens: int = 64, with_z: bool = False,
             generations: list[str] | None = None) -> tuple[dict, list[AnswerScores]]:
    """The TOFU log of ``records`` and the answers' scores (with Min-K%++'s z if ``with_z``).
    ``generations`` reuses greedy answers already made."""
    ids = [str(i) for i in range(len(records))]
    with_tr = [(i, r) for i, r in zip(ids, records) if r.paraphrased_answer and r.perturbed_answer]
    # every answer of a question in one call, so that they share the pass over its prompt
    rows = [(r.question, r.answer, r.source) for r in records]
    rows += [(r.question, r.paraphrased_answer, r.source) for _, r in with_tr]
    rows += [(r.question, p, r.source) for _, r in with_tr for p in r.perturbed_answer]
    scores = iter(score_answers(model, tok, rows, max_length, fmt, batch_size,
                                [with_z] * len(records) + [False] * (len(rows) - len(records))))
    gt = [next(scores) for _ in records]
    log: dict = {"avg_gt_loss": {i: s.loss for i, s in zip(ids, gt)}}
    if with_tr:
        log["avg_paraphrased_loss"] = {i: next(scores).loss for i, _ in with_tr}
        log["average_perturb_loss"] = {i: [next(scores).loss for _ in r.perturbed_answer] for i, r in with_tr}
    if generations is None:
        generations = generate(model, tok, [r.question for r in records], fmt, max_new_tokens, batch_size)
    log["rougeL_recall"] = dict(zip(ids, rouge_l_recall([r.answer for r in records], generations)))
    log["generated_text"] = {i: [r.question, g, r.answer] for i, r, g in zip(ids, records, generations)}
    return log, gt
