"""Joint CTC/attention decoding (Watanabe et al., 2017, "Hybrid CTC/Attention Architecture for
End-to-End Speech Recognition"): each next token is chosen by a weighted sum of the decoder's
log-probability and the change in the CTC prefix probability of the answer so far.

    scorer = JointCTCScorer([log_probs], blank=audio_id, stop_ids={eot_id}, weight=0.3)
    generate_tokens(model, prompts, opts, eot_id, rescore=scorer)   # one clip per prompt

The CTC prefix probability of a token string g is the probability, under the encoder's per-frame
CTC distribution, of every frame labelling whose collapsed output starts with g. It only grows by
tokens the audio holds, in the order it holds them, so it keeps the decoder from dropping, repeating
or inventing words: the decoder's usual errors on long utterances. The end of the answer is scored
by the probability that the whole clip says exactly g.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

NEG_INF = -np.inf


@dataclass
class Prefix:
    """The CTC forward variables of one token string: log-probabilities (T,) that frames 0..t
    collapse to it, ending in a non-blank (`r_n`) or a blank (`r_b`), and its prefix score."""

    r_n: np.ndarray
    r_b: np.ndarray
    score: float
    last: int | None  # the string's last token, None when empty


def empty_prefix(log_probs: np.ndarray, blank: int) -> Prefix:
    """The empty string: every frame so far blank. `log_probs` (T, V) are one clip's frame log-probs."""
    T = log_probs.shape[0]
    return Prefix(np.full(T, NEG_INF), np.cumsum(log_probs[:, blank]), 0.0, None)


def extend(log_probs: np.ndarray, blank: int, g: Prefix, candidates: Sequence[int]) -> list[Prefix]:
    """The prefixes g + c for each candidate token c (not the blank), by the CTC prefix recursion,
    vectorised over candidates."""
    T = log_probs.shape[0]
    c = np.asarray(candidates)
    x = log_probs[:, c]  # (T, K)
    # probability of g over frames 0..t, as the start of a new token c: a repeated token needs a blank
    phi = np.repeat(np.logaddexp(g.r_n, g.r_b)[:, None], len(c), axis=1)
    phi[:, c == g.last] = g.r_b[:, None]
    r_n = np.full((T, len(c)), NEG_INF)
    r_b = np.full((T, len(c)), NEG_INF)
    if g.last is None:
        r_n[0] = x[0]
    for t in range(1, T):
        r_n[t] = np.logaddexp(r_n[t - 1], phi[t - 1]) + x[t]
        r_b[t] = np.logaddexp(r_n[t - 1], r_b[t - 1]) + log_probs[t, blank]
    # the prefix score: c starts at some frame t after g has ended by frame t - 1
    starts = np.concatenate(
        [r_n[:1] if g.last is None else np.full((1, len(c)), NEG_INF), phi[:-1] + x[1:]]
    )
    scores = np.logaddexp.reduce(starts, axis=0)
    return [Prefix(r_n[:, k], r_b[:, k], float(scores[k]), int(c[k])) for k in range(len(c))]


def full_score(g: Prefix) -> float:
    """log-probability that the whole clip collapses to exactly g."""
    return float(np.logaddexp(g.r_n[-1], g.r_b[-1]))


class JointCTCScorer:
    """A `rescore` hook for `generate_tokens`: per sequence (one clip each), the scores of the
    decoder's `candidates` most likely next tokens become

        (1 - weight) · log p_decoder(c) + weight · (log p_ctc(g + c) - log p_ctc(g)),

    with the full-clip probability of g for a stop token; every other token is ruled out."""

    def __init__(
        self,
        log_probs: Sequence[torch.Tensor],
        blank: int,
        stop_ids: set[int],
        weight: float,
        candidates: int = 4,
    ):
        self.log_probs = [lp.detach().float().cpu().numpy().astype(np.float64) for lp in log_probs]
        self.blank, self.stop_ids, self.weight, self.k = blank, stop_ids, weight, candidates
        self.prefixes = [empty_prefix(lp, blank) for lp in self.log_probs]
        self.pending: list[dict[int, Prefix]] = [{} for _ in self.log_probs]

    def __call__(self, logits: torch.Tensor, chosen: list[int] | None) -> torch.Tensor:
        """Scores (B, V) for the next token from the decoder's logits (B, V); `chosen` are the ids
        picked at the step before (None at the first step)."""
        if len(self.prefixes) != logits.size(0):
            raise ValueError(f"{len(self.prefixes)} clips for {logits.size(0)} sequences")
        if chosen is not None:
            for row, token in enumerate(chosen):
                if token in self.pending[row]:
                    self.prefixes[row] = self.pending[row][token]
        decoder = logits.float().log_softmax(-1)
        top = decoder.topk(min(self.k, decoder.size(-1)), dim=-1).indices.tolist()
        scores = torch.full_like(decoder, float("-inf"))
        for row, ids in enumerate(top):
            g, lp = self.prefixes[row], self.log_probs[row]
            labels = [i for i in ids if i not in self.stop_ids and i != self.blank]
            grown = dict(zip(labels, extend(lp, self.blank, g, labels), strict=True))
            self.pending[row] = grown
            for i in ids:
                if i in self.stop_ids:
                    ctc = full_score(g)
                elif i in grown:
                    ctc = grown[i].score
                else:  # the blank: never an answer token
                    continue
                scores[row, i] = (1 - self.weight) * decoder[row, i] + self.weight * (ctc - g.score)
        return scores
