import pytest

from omnigpt.errors import OmnigptError
from omnigpt.metrics import corpus_metric, example_metric

PRED, REF = "The cat sat on the mat.", "the cat is on the mat"


def test_rouge_by_hand():
    # unigrams: the×2, cat, on, mat shared → P = R = 5/6
    assert example_metric("rouge1", PRED, REF) == pytest.approx(5 / 6)
    # bigrams: "the cat", "on the", "the mat" of 5 each
    assert example_metric("rouge2", PRED, REF) == pytest.approx(3 / 5)
    # longest common subsequence: the cat on the mat
    assert example_metric("rougeL", PRED, REF) == pytest.approx(5 / 6)
    assert example_metric("rougeL", "mat the", "the mat") == pytest.approx(1 / 2)
    assert example_metric("rouge1", "", REF) == 0.0


def test_question_answering_metrics_normalise_like_squad():
    assert example_metric("exact_match", "The Cat!", "cat") == 1.0
    assert example_metric("exact_match", "a cat", "dog") == 0.0
    # "red car" vs "red truck" after dropping articles: one of two tokens shared
    assert example_metric("f1", "a red car", "the red truck") == pytest.approx(0.5)
    assert corpus_metric("f1", ["red car", "blue"], ["red truck", "blue"]) == pytest.approx(0.75)


def test_bleu_chrf_and_wer_come_from_their_libraries():
    import jiwer
    import sacrebleu

    preds, refs = [PRED, "Ein Hund läuft."], [REF, "Ein Hund rennt."]
    assert corpus_metric("bleu", refs, refs) == pytest.approx(100.0)
    assert corpus_metric("bleu", preds, refs) == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs]).score
    )
    assert 0 < corpus_metric("chrf", preds, refs) < 100
    assert corpus_metric("wer", ["one too three"], ["one two three"]) == pytest.approx(1 / 3)
    assert corpus_metric("wer", preds, refs) == pytest.approx(jiwer.wer(refs, preds))


def test_unknown_metric_and_mismatched_lengths_are_refused():
    with pytest.raises(OmnigptError, match="unknown metric"):
        example_metric("meteor", "a", "b")
    with pytest.raises(OmnigptError, match="as many predictions"):
        corpus_metric("bleu", ["a"], ["a", "b"])
