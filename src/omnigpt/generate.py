"""Text generation: sampling as pure functions, and a batched prefill + decode engine on the KV cache.

    opts = GenerationOptions(max_new_tokens=100, temperature=0.8, top_k=50)
    texts = generate_text(model, tokenizer, ["def ", "class "], opts)

Prompts of different lengths are left-padded into one batch: each sequence gets its own positions
and an attention mask that hides its padding, so every prompt decodes exactly as it would alone.
The model is run once over all prompts (prefill), then one token at a time for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from omnigpt.config import GenerationOptions as GenerationOptions  # its home is config.py
from omnigpt.errors import OmnigptError
from omnigpt.model import GPT
from omnigpt.tokenizer import StreamDecoder, Tokenizer

# -- sampling: pure functions of logits ----------------------------------------------------------


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty: logits (B, V) of tokens marked in `seen` (B, V, bool) are divided by
    `penalty` when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k largest logits of each row (B, V); the rest become -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keeps the smallest set of top tokens whose probability sum reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already ≥ p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor, opts: GenerationOptions, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token (B,) from last-position logits (B, V): the argmax at temperature 0, else a sample
    after temperature, top-k and top-p."""
    if opts.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / opts.temperature
    if opts.top_k is not None:
        logits = top_k_filter(logits, opts.top_k)
    if opts.top_p is not None and opts.top_p < 1.0:
        logits = top_p_filter(logits, opts.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- the engine ----------------------------------------------------------------------------------


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) with prompts right-aligned, and the number of pad tokens before each (B,)."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    pads = torch.tensor([T - len(p) for p in prompts])
    for row, p in enumerate(prompts):
        tokens[row, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    return tokens, pads


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    opts: GenerationOptions,
    eot_id: int | Sequence[int] | None = None,
    vocab_limit: int | None = None,
    on_step: Callable[[list[int]], Sequence[bool] | None] | None = None,
    first_allowed: Sequence[Sequence[int] | None] | None = None,
    prefill_inputs: dict | None = None,
    rescore: Callable[[torch.Tensor, list[int] | None], torch.Tensor] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (EOT excluded), decoded together on the KV cache.

    `prefill_inputs` are extra model inputs for the prompt pass only: a multimodal model's images
    and audio, encoded once into the cache.
    `eot_id` is the end-of-text id, or several ids that each end a sequence (a chat model's
    `<|end|>` and `<|endoftext|>`).
    `vocab_limit` restricts sampling to the tokenizer's ids (the embedding may be padded larger).
    `first_allowed`, per prompt, restricts the first new token to those ids (None: no restriction).
    `on_step(new_ids)` is called after every step with one id per sequence; it may return, per
    sequence, whether to stop it now (stop strings are implemented that way).
    `rescore(logits, chosen)` maps each step's logits (B, V) to the scores the next token is chosen
    by, told the ids chosen at the step before (None at the first): joint CTC decoding
    (`ctc.JointCTCScorer`) is implemented that way.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OmnigptError("every prompt needs at least one token")
    block_size = model.config.block_size
    longest = max(len(p) for p in prompts)
    if longest > block_size:
        raise OmnigptError(
            f"prompt of {longest} tokens is longer than the model's context of {block_size}"
        )
    max_new = min(opts.max_new_tokens, block_size - longest)
    stop_ids = set() if eot_id is None else {eot_id} if isinstance(eot_id, int) else set(eot_id)
    device = model.wte.weight.device
    generator = None if opts.seed is None else torch.Generator(device).manual_seed(opts.seed)

    tokens, pads = left_pad(prompts)
    tokens, pads = tokens.to(device), pads.to(device)
    B, T = tokens.shape
    total = T + max_new
    caches = model.make_caches(B, total)
    logits, key_valid = _prefill(model, tokens, pads, caches, total, prefill_inputs or {})
    vocab = vocab_limit or logits.size(-1)
    seen = _prompt_tokens(tokens, pads, vocab) if opts.repetition_penalty != 1.0 else None
    out = torch.empty(B, max_new, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = [max_new] * B
    ids: list[int] | None = None
    for step in range(max_new):
        next_logits = logits[:, -1, :vocab].float()
        if step == 0 and first_allowed is not None:
            next_logits = _only_allowed(next_logits, first_allowed)
        if seen is not None:
            next_logits = apply_repetition_penalty(next_logits, seen, opts.repetition_penalty)
        if rescore is not None:
            next_logits = rescore(next_logits, ids)
        next_ids = sample_next(next_logits, opts, generator)
        out[:, step] = next_ids
        if seen is not None:
            seen[torch.arange(B, device=device), next_ids] = True
        ids = next_ids.tolist()
        stop_now = [False] * B
        if opts.stop_at_eot and stop_ids:
            stop_now = [i in stop_ids for i in ids]
        if on_step is not None:
            extra = on_step(ids)
            if extra is not None:
                stop_now = [a or b for a, b in zip(stop_now, extra, strict=True)]
        for row, stop in enumerate(stop_now):
            if stop and not done[row]:
                done[row] = True
                lengths[row] = step + (0 if ids[row] in stop_ids and opts.stop_at_eot else 1)
        if bool(done.all()) or step == max_new - 1:
            break
        # feed the chosen tokens; they sit at cache index T + step
        logits = _decode_step(model, next_ids, pads, key_valid, caches, T + step)
    out = out.tolist()
    return [row[:n] for row, n in zip(out, lengths, strict=True)]


def _prefill(
    model: GPT,
    tokens: torch.Tensor,
    pads: torch.Tensor,
    caches: list | None,
    total: int,
    inputs: dict,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt pass over left-padded `tokens` (B, T), filling the caches (if any); the last
    position's logits (B, 1, V), and for a padded batch which cache slots each sequence may attend
    to (B, total), else None."""
    if not bool(pads.any()):
        logits, _ = model(tokens, caches=caches, last_only=True, **inputs)
        return logits, None
    device, T = tokens.device, tokens.size(1)
    # per-sequence positions and a mask that hides each sequence's padding
    key_valid = torch.arange(total, device=device)[None] >= pads[:, None]  # (B, total)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = causal[None, None] & key_valid[:, None, None, :T]  # (B, 1, T, T)
    # pad rows attend to themselves, so no row is all-masked (which would give NaN)
    mask |= torch.eye(T, dtype=torch.bool, device=device)
    positions = (torch.arange(T, device=device)[None] - pads[:, None]).clamp(min=0)
    logits, _ = model(
        tokens, positions=positions, attn_mask=mask, caches=caches, last_only=True, **inputs
    )
    return logits, key_valid


def _decode_step(
    model: GPT,
    ids: torch.Tensor,
    pads: torch.Tensor,
    key_valid: torch.Tensor | None,
    caches: list,
    pos: int,
    **inputs,
) -> torch.Tensor:
    """One token per sequence (B,) fed at cache index `pos`; the next logits (B, 1, V). `inputs`
    are further model inputs (an image code's `image_index`)."""
    if key_valid is None:
        logits, _ = model(ids[:, None], caches=caches, start_pos=pos, **inputs)
    else:
        logits, _ = model(
            ids[:, None],
            positions=(pos - pads)[:, None],
            attn_mask=key_valid[:, None, None, : pos + 1],
            caches=caches,
            start_pos=pos,
            **inputs,
        )
    return logits


def _prompt_tokens(tokens: torch.Tensor, pads: torch.Tensor, vocab: int) -> torch.Tensor:
    """Which ids (B, vocab) each left-padded prompt holds, its padding left out."""
    seen = torch.zeros(tokens.size(0), vocab, dtype=torch.bool, device=tokens.device)
    for row in range(tokens.size(0)):
        seen[row, tokens[row, int(pads[row]) :].clamp(max=vocab - 1)] = True
    return seen


def _only_allowed(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """`logits` (B, V) with every id outside each row's allowed ids at -inf (None: all allowed)."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for row, ids in enumerate(allowed):
        if ids is None:
            keep[row] = True
        else:
            keep[row, torch.tensor(ids, dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    opts: GenerationOptions,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Completions for each prompt (`num_samples` each, prompt-major order), streamed piece by piece
    to `on_text(sequence_index, text)`; stop strings end a completion and are cut from it (text
    that could still be the start of one is held back until it cannot)."""
    ids = [tokenizer.encode(p) for p in prompts for _ in range(opts.num_samples)]
    if any(len(i) == 0 for i in ids):
        raise OmnigptError("empty prompt: give at least one character")
    first_allowed: list[list[int] | None] = [None] * len(ids)
    # characters of the prompt that the first generated token repeats (token healing), per sequence
    repeated = [0] * len(ids)
    if opts.token_healing:
        for row, prompt_ids in enumerate(ids):
            healed, allowed = tokenizer.heal(prompt_ids)
            if allowed is not None:
                repeated[row] = len(tokenizer.token_texts()[prompt_ids[-1]])
                ids[row], first_allowed[row] = healed, allowed
    streams = [StopText(tokenizer, opts.stop_strings, skip=n) for n in repeated]
    texts = [""] * len(ids)
    finished = [False] * len(ids)  # by end-of-text or a stop string
    eot = tokenizer.eot_id

    def emit(row: int, piece: str) -> None:
        texts[row] += piece
        if piece and on_text is not None:
            on_text(row, piece)

    def on_step(new_ids: list[int]) -> list[bool]:
        stop = [False] * len(new_ids)
        for row, token in enumerate(new_ids):
            if finished[row] or (opts.stop_at_eot and token == eot):
                finished[row] = True
                continue
            emit(row, streams[row].push(token))
            stop[row] = finished[row] = streams[row].stopped
        return stop

    generate_tokens(model, ids, opts, eot, tokenizer.vocab_size, on_step, first_allowed)
    for row, stream in enumerate(streams):  # what was held back at the very end
        emit(row, stream.flush())
    return texts


class StopText:
    """The text of a stream of tokens as it may be shown: whole UTF-8 characters only, cut before the
    first stop string, and holding back an end that could still be the start of one.

        text = StopText(tokenizer, ["\\n\\n"])
        shown = text.push(token_id)      # "" while held back; `text.stopped` once a stop string came
        shown = text.flush()             # the rest, when the stream ends for another reason

    `skip` characters at the very start are dropped (the prompt text a healed first token repeats).
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), skip: int = 0):
        self.decoder: StreamDecoder = tokenizer.stream()
        self.stops = [s for s in stop_strings if s]
        self.skip = skip
        self.held = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text that this token makes safe to show (maybe "")."""
        if self.stopped:
            return ""
        return self._release(self.decoder.push(token_id), final=False)

    def flush(self) -> str:
        """All that is still held back (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        if self.skip:
            cut = min(self.skip, len(piece))
            piece, self.skip = piece[cut:], self.skip - cut
        text = self.held + piece
        cut = _first_stop(text, self.stops, 0)
        if cut is not None:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = 0 if final else _stop_start(text, self.stops)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _stop_start(text: str, stop_strings: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins some stop string (0 if none)."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _first_stop(text: str, stop_strings: Sequence[str], start: int) -> int | None:
    hits = [i for s in stop_strings if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
