import itertools
import math

import numpy as np
import torch

from omnigpt.ctc import JointCTCScorer, empty_prefix, extend, full_score

BLANK = 0


def collapse(path):
    out, prev = [], None
    for p in path:
        if p != prev and p != BLANK:
            out.append(p)
        prev = p
    return tuple(out)


def brute_force(log_probs, prefix, whole=False):
    """Sum over every frame labelling whose collapsed output starts with (or is) `prefix`."""
    T, V = log_probs.shape
    total = 0.0
    for path in itertools.product(range(V), repeat=T):
        out = collapse(path)
        if out == prefix or (not whole and out[: len(prefix)] == prefix):
            total += math.exp(sum(log_probs[t, p] for t, p in enumerate(path)))
    return math.log(total)


def test_prefix_scores_match_a_sum_over_every_frame_labelling():
    rng = np.random.default_rng(0)
    log_probs = torch.tensor(rng.normal(size=(5, 4))).log_softmax(-1).numpy()
    g = empty_prefix(log_probs, BLANK)
    for prefix in [(1,), (1, 1), (1, 2), (2, 1, 3)]:
        g = empty_prefix(log_probs, BLANK)
        for token in prefix:
            [g] = extend(log_probs, BLANK, g, [token])
        assert math.isclose(g.score, brute_force(log_probs, prefix), rel_tol=1e-9)
        assert math.isclose(full_score(g), brute_force(log_probs, prefix, whole=True), rel_tol=1e-9)
    # several candidates at once give what each gives alone
    g = empty_prefix(log_probs, BLANK)
    [g] = extend(log_probs, BLANK, g, [2])
    together = extend(log_probs, BLANK, g, [1, 2, 3])
    for token, h in zip([1, 2, 3], together, strict=True):
        [alone] = extend(log_probs, BLANK, g, [token])
        assert math.isclose(h.score, alone.score) and h.last == token


def test_joint_scores_keep_the_decoder_to_what_the_audio_holds():
    # the CTC head is sure the clip says 3 then 1; the decoder prefers 1 first
    T, V, EOT = 6, 5, 4
    frames = [3, BLANK, BLANK, 1, BLANK, BLANK]
    log_probs = torch.full((T, V), math.log(0.01))
    for t, label in enumerate(frames):
        log_probs[t, label] = math.log(1 - 0.01 * (V - 1))
    scorer = JointCTCScorer([log_probs], BLANK, {EOT}, weight=0.5, candidates=V)
    decoder = torch.tensor([[-9.0, 2.0, 0.0, 1.5, 0.0]])  # 1 > 3 > 2 = EOT
    chosen, text = None, []
    for _ in range(4):
        scores = scorer(decoder, chosen)
        assert scores[0, BLANK] == float("-inf")  # the blank is never an answer
        chosen = [int(scores.argmax())]
        if chosen[0] == EOT:
            break
        text.append(chosen[0])
    assert text == [3, 1]
    # with weight 0 the decoder alone decides
    alone = JointCTCScorer([log_probs], BLANK, {EOT}, weight=0.0, candidates=V)
    assert int(alone(decoder, None).argmax()) == 1
