"""Speculative decoding: a small draft model proposes k tokens, the model checks them in one pass.

    new, stats = speculative_tokens(model, draft, prompts, opts, k=4, stop_ids=[eot])
    print(stats.acceptance)                       # the share of proposed tokens the model kept

Each round, the draft decodes k tokens one by one (cheap), then the model runs once over the last
token and the k proposals (one pass reads its weights once, as one plain step would) and keeps the
longest run of proposals it agrees with, plus one token of its own. The rule (Leviathan et al.,
2023; Chen et al., 2023): proposal d, drawn from the draft's q, is kept with probability
min(1, p(d) / q(d)); at the first rejection the next token is drawn from max(0, p − q), normalised;
when all k are kept, one more comes from p. The tokens then follow the model's own distribution p
exactly (after temperature, top-k and top-p, applied to both models alike); greedily (temperature
0, one-hot p and q) the output is the model's greedy output.

Prompts of different lengths decode together: both models keep a KV cache in which each row has
its own length, as the serving engine's does, so rows that accept more simply run ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from omnigpt.config import GenerationOptions
from omnigpt.errors import OmnigptError
from omnigpt.generate import StopText, _prefill, left_pad, top_k_filter, top_p_filter
from omnigpt.model.attention import RowCache, row_mask


@dataclass
class SpeculativeStats:
    rounds: int = 0  # passes of the model
    proposed: int = 0  # draft tokens offered to it (rows still decoding)
    accepted: int = 0  # ... and kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def token_probs(logits: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """The distribution tokens are drawn from, (..., V): one-hot at the argmax for temperature 0,
    else softmax after temperature, top-k and top-p (as `generate.sample_next` samples)."""
    if opts.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1]) / opts.temperature
    if opts.top_k is not None:
        logits = top_k_filter(logits, opts.top_k)
    if opts.top_p is not None and opts.top_p < 1.0:
        logits = top_p_filter(logits, opts.top_p)
    return logits.softmax(-1).reshape(shape)


def accept_drafts(
    p: torch.Tensor,
    q: torch.Tensor,
    drafted: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/reject rule for B rows: the model's distributions p (B, k+1, V) at each proposal
    and one beyond, the draft's q (B, k, V), the proposals `drafted` (B, k). Returns how many
    proposals each row keeps (B,) and the token that follows them (B,)."""
    B, k = drafted.shape
    p_d = p[:, :k].gather(-1, drafted[..., None])[..., 0]
    q_d = q.gather(-1, drafted[..., None])[..., 0]
    u = torch.rand(B, k, generator=generator, device=p.device)
    kept = (u * q_d < p_d).int().cumprod(dim=1)  # a proposal counts only after kept ones
    accepted = kept.sum(dim=1)
    rows = torch.arange(B, device=p.device)
    target = p[rows, accepted]  # (B, V): p where the first rejection (or the end) is
    draft = q[rows, accepted.clamp(max=k - 1)] * (accepted < k)[:, None]
    residual = (target - draft).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target)
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


@torch.inference_mode()
def speculative_tokens(
    model,
    draft,
    prompts: Sequence[Sequence[int]],
    opts: GenerationOptions,
    k: int = 4,
    stop_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
    on_tokens: Callable[[int, list[int]], bool] | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """New tokens for each prompt (stop tokens excluded), and the acceptance statistics.

    `on_tokens(row, ids)` is told each row's new tokens as a round commits them; it may return
    True to end that row (a stop string)."""
    if k < 1:
        raise OmnigptError("the draft proposes at least 1 token a round (k ≥ 1)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OmnigptError("every prompt needs at least one token")
    block = min(model.config.block_size, draft.config.block_size)
    longest = max(len(p) for p in prompts)
    max_new = min(opts.max_new_tokens, block - longest - k)
    if max_new < 1:
        raise OmnigptError(
            f"a prompt of {longest} tokens leaves no room to propose {k} tokens in a context of {block}"
        )
    device = model.wte.weight.device
    generator = None if opts.seed is None else torch.Generator(device).manual_seed(opts.seed)
    stops = set(stop_ids) if opts.stop_at_eot else set()
    tokens, pads = left_pad(prompts)
    tokens, pads = tokens.to(device), pads.to(device)
    B, T = tokens.shape
    total = T + max_new + k
    caches = {m: m.make_caches(B, total) for m in (model, draft)}
    if T > 1:  # both read the prompt but its last token, which each round starts from
        for m in (model, draft):
            _prefill(m, tokens[:, :-1], pads, caches[m], total, {})
    at = torch.full((B,), T - 1, device=device)  # where each row's pending token goes
    last = tokens[:, -1]
    vocab = vocab_limit or min(model.config.vocab_size, draft.config.vocab_size)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stats = SpeculativeStats()

    def run(m, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        n = ids.size(1)
        end = int(where.max()) + n
        mask = row_mask(pads, where, n, end)
        positions = where[:, None] - pads[:, None] + torch.arange(n, device=device)
        views = [RowCache(c, where, end) for c in caches[m]]
        logits, _ = m(ids, positions=positions, attn_mask=mask, caches=views)
        return logits[..., :vocab].float()

    greedy = opts.temperature == 0  # one-hot p and q: the rule reduces to argmax comparisons
    while not all(done):
        drafted, q, current = [], [], last
        for j in range(k + 1):  # the (k+1)-th feed only writes the last proposal into the cache
            logits = run(draft, current[:, None], at + j)[:, -1]
            if j == k:
                break
            if greedy:
                current = logits.argmax(-1)
            else:
                q.append(token_probs(logits, opts))
                current = torch.multinomial(q[-1], 1, generator=generator)[:, 0]
            drafted.append(current)
        drafted_ids = torch.stack(drafted, dim=1)  # (B, k)
        checked = run(model, torch.cat([last[:, None], drafted_ids], 1), at)  # (B, k+1, V)
        if greedy:
            best = checked.argmax(-1)  # (B, k+1)
            accepted = (drafted_ids == best[:, :k]).int().cumprod(dim=1).sum(dim=1)
            following = best.gather(1, accepted[:, None])[:, 0]
        else:
            p = token_probs(checked, opts)
            accepted, following = accept_drafts(p, torch.stack(q, dim=1), drafted_ids, generator)
        stats.rounds += 1
        rows_accepted, rows_drafted, rows_next = (
            accepted.tolist(),
            drafted_ids.tolist(),
            following.tolist(),
        )
        for row in range(B):
            if done[row]:
                continue
            stats.proposed += k
            stats.accepted += rows_accepted[row]
            new = rows_drafted[row][: rows_accepted[row]] + [rows_next[row]]
            for i, token in enumerate(new):
                if token in stops:
                    new, done[row] = new[:i], True
                    break
            new = new[: max_new - len(out[row])]
            out[row] += new
            if new and on_tokens is not None and on_tokens(row, new):
                done[row] = True
            if len(out[row]) >= max_new:
                done[row] = True
        still = torch.tensor([not d for d in done], device=device)
        at = torch.where(still, at + accepted + 1, at)  # finished rows stay where they are
        last = torch.where(still, following, last)
    return out, stats


def speculative_text(
    model,
    draft,
    tokenizer,
    prompts: Sequence[str],
    opts: GenerationOptions,
    k: int = 4,
    on_text: Callable[[int, str], None] | None = None,
) -> tuple[list[str], SpeculativeStats]:
    """`generate.generate_text` with a draft model: completions (`num_samples` per prompt), streamed
    to `on_text(sequence_index, piece)` a round at a time, cut at stop strings. Token healing and
    the repetition penalty are not applied here."""
    if opts.repetition_penalty != 1.0:
        raise OmnigptError("speculative decoding does not apply a repetition penalty")
    ids = [tokenizer.encode(p) for p in prompts for _ in range(opts.num_samples)]
    if any(len(i) == 0 for i in ids):
        raise OmnigptError("empty prompt: give at least one character")
    streams = [StopText(tokenizer, opts.stop_strings) for _ in ids]
    texts = [""] * len(ids)

    def emit(row: int, piece: str) -> None:
        texts[row] += piece
        if piece and on_text is not None:
            on_text(row, piece)

    def on_tokens(row: int, new: list[int]) -> bool:
        for token in new:
            emit(row, streams[row].push(token))
            if streams[row].stopped:
                return True
        return False

    _, stats = speculative_tokens(
        model, draft, ids, opts, k, [tokenizer.eot_id], tokenizer.vocab_size, on_tokens
    )
    for row, stream in enumerate(streams):
        emit(row, stream.flush())
    return texts, stats
