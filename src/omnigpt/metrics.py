"""Task metrics over predictions and references: BLEU and chrF (sacreBLEU), ROUGE, exact match and
token F1 (SQuAD-style normalisation), word error rate (jiwer). Perplexity comes from a loss instead.

    score = corpus_metric("bleu", predictions, references)      # 0-100, as sacreBLEU reports it
    per_example = example_metric("f1", prediction, reference)   # 0-1
"""

from __future__ import annotations

import collections
import re
import string

from omnigpt.errors import OmnigptError

CORPUS_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "f1", "wer")
METRICS = ("perplexity", *CORPUS_METRICS)


# -- question answering (SQuAD's evaluation script) ----------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# -- ROUGE (F-measure, tokenised as Google's rouge-score does without stemming) -------------------


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    def grams(tokens: list[str]) -> collections.Counter:
        return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    pred, ref = grams(_rouge_tokens(prediction)), grams(_rouge_tokens(reference))
    return _f(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def rouge_l(prediction: str, reference: str) -> float:
    """F-measure of the longest common subsequence of tokens."""
    a, b = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return _f(prev[-1], len(a), len(b))


# -- dispatch -------------------------------------------------------------------------------------


def example_metric(name: str, prediction: str, reference: str) -> float:
    """One example's score on the metric's own scale (BLEU/chrF 0-100, the others 0-1)."""
    if name == "exact_match":
        return exact_match(prediction, reference)
    if name == "f1":
        return token_f1(prediction, reference)
    if name == "rouge1":
        return rouge_n(prediction, reference, 1)
    if name == "rouge2":
        return rouge_n(prediction, reference, 2)
    if name == "rougeL":
        return rouge_l(prediction, reference)
    if name in ("bleu", "chrf"):
        import sacrebleu

        scorer = sacrebleu.sentence_bleu if name == "bleu" else sacrebleu.sentence_chrf
        return scorer(prediction, [reference]).score
    if name == "wer":
        import jiwer

        return jiwer.wer(reference, prediction) if reference.strip() else float(bool(prediction))
    raise OmnigptError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")


def corpus_metric(name: str, predictions: list[str], references: list[str]) -> float:
    """The metric over a whole set: corpus BLEU/chrF and WER as their tools define them, the mean
    of per-example scores for the others."""
    if len(predictions) != len(references) or not predictions:
        raise OmnigptError("metrics need as many predictions as references, and at least one")
    if name in ("bleu", "chrf"):
        import sacrebleu

        scorer = sacrebleu.corpus_bleu if name == "bleu" else sacrebleu.corpus_chrf
        return scorer(predictions, [references]).score
    if name == "wer":
        import jiwer

        return jiwer.wer(references, predictions)
    return sum(
        example_metric(name, p, r) for p, r in zip(predictions, references, strict=True)
    ) / len(predictions)
