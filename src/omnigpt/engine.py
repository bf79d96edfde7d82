"""Continuous batching: one engine thread owns the model and decodes every running request together.

    engine = Engine(model, tokenizer, max_running=16, max_waiting=64)   # its own thread
    ticket = engine.submit(Request(prompt=ids, opts=GenerationOptions(temperature=0)), on_event)
    # on_event(Piece | Finished | Failed) is called from the engine thread as the answer grows
    ticket.cancel()                        # its sequences leave the batch at the next step
    engine.close()

The KV cache holds `max_running` slots of the model's whole context, each sequence at its own length.
Running sequences sit in slots 0..n-1: a step feeds one token to each, at its own position, attending
to its own keys only (a mask per row), so what a sequence generates does not depend on what else is in
the batch. Between steps, the waiting requests that fit are prefilled together (left-padded, one pass,
as `generate` does) into free slots and join the next step; a request for n answers is prefilled once
and its cache copied. A finished or cancelled sequence leaves, and a sequence from the end moves into
its slot, so the batch stays one dense block.
A `Job` (drawing images, say) runs whole between two steps.

Sampling is `generate.sample_next`, per sequence with its own options and its own seeded generator;
text is cut at stop strings by `generate.StopText`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from omnigpt.config import GenerationOptions
from omnigpt.errors import OmnigptError
from omnigpt.generate import StopText, _prefill, apply_repetition_penalty, left_pad, sample_next
from omnigpt.model.attention import KVCache, RowCache, row_mask
from omnigpt.tokenizer import Tokenizer

log = logging.getLogger("omnigpt.engine")

PREFILL_TOKENS = 4096  # the most prompt tokens (padding included) one prefill pass takes

# -- what goes in ---------------------------------------------------------------------------------


@dataclass
class Request:
    """A prompt to continue `n` times. `inputs` are extra model inputs for the prompt (a multimodal
    model's images and audio); `stop_ids` end an answer (not part of it); `logprobs`, when not None,
    asks for each token's log-probability and that many alternatives."""

    prompt: list[int]
    opts: GenerationOptions
    stop_ids: frozenset[int] = frozenset()
    n: int = 1
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    logprobs: int | None = None


@dataclass
class Job:
    """Work that runs whole in the engine thread between two steps: `run(model)`'s result is sent
    as `Done`."""

    run: Callable[[Any], Any]


# -- what comes out -------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class Piece:
    """More text of answer `index`, and the tokens it came from (a token whose text is held back is
    sent with the next piece); `logprobs` when the request asked for them."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    """Answer `index` is complete: `reason` is "stop" (an end token or stop string) or "length"
    (its token limit or the model's context)."""

    index: int
    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The request cannot be served: `status` 400 when it asked for what the model cannot do (the
    message says what), 500 when the engine failed, 503 when the server shut down."""

    message: str
    status: int = 500


@dataclass
class Done:
    result: Any


Event = Piece | Finished | Failed | Done


class Busy(OmnigptError):
    """The queue is full: try again later."""


class Ticket:
    """A submitted request: `cancel()` drops it (waiting, or at the next step when running)."""

    def __init__(self, work: Request | Job, on_event: Callable[[Event], None]):
        self.work, self.on_event = work, on_event
        self.submitted = time.perf_counter()
        self.first_token: float | None = None  # seconds from submission to the first piece
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


# -- the engine -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Sequence:
    ticket: Ticket
    index: int
    slot: int  # its rows in the KV cache
    start: int  # its first position in them (what is before is padding)
    length: int  # the position its next token is written to
    last: int  # the token to feed at position `length`
    text: StopText
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (V,) tokens so far, for the repetition penalty
    made: int = 0  # tokens generated
    held: list[int] = field(default_factory=list)  # tokens whose text is not sent yet
    held_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def request(self) -> Request:
        return self.ticket.work


class Engine:
    """Serves `Request`s and `Job`s from one thread (see the module's docstring)."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        max_running: int = 16,
        max_waiting: int = 64,
        on_tokens: Callable[[int], None] | None = None,
        start: bool = True,
    ):
        if max_running < 1 or max_waiting < 0:
            raise OmnigptError("an engine needs at least 1 running slot and 0 or more waiting")
        self.model, self.tokenizer = model, tokenizer
        self.max_running, self.max_waiting = max_running, max_waiting
        self.block_size = model.config.block_size
        # answers are text: a drawing model's image codes (the end of its vocabulary) are left out
        codes = tokenizer.code_ids
        self.vocab = codes.start if codes else tokenizer.vocab_size
        self.device = model.wte.weight.device
        self.caches = model.make_caches(max_running, self.block_size)
        self.on_tokens = on_tokens  # told how many tokens each step made (for metrics)
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: list[_Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self.run, name="omnigpt-engine", daemon=True)
            self._thread.start()

    # -- the outside: any thread --------------------------------------------------------------

    def submit(self, work: Request | Job, on_event: Callable[[Event], None]) -> Ticket:
        """Queues work; raises Busy when `max_waiting` requests already wait."""
        if isinstance(work, Request):
            self._check(work)
        ticket = Ticket(work, on_event)
        with self._cond:
            if self._closed:
                raise OmnigptError("the engine is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise Busy(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def _check(self, request: Request) -> None:
        if not request.prompt:
            raise OmnigptError("the prompt is empty")
        if len(request.prompt) >= self.block_size:
            raise OmnigptError(
                f"the prompt is {len(request.prompt)} tokens; the model's context is "
                f"{self.block_size}, so at most {self.block_size - 1} leave room for an answer"
            )
        if not 1 <= request.n <= self.max_running:
            raise OmnigptError(
                f"n must be from 1 to {self.max_running} (the answers decode side by side)"
            )

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests with at least one sequence in the decode batch."""
        return len({id(s.ticket) for s in list(self._running)})

    def close(self) -> None:
        """Stops the engine; whatever waits or runs is told it failed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the engine thread --------------------------------------------------------------------

    def run(self) -> None:
        """The engine's loop, until `close()`: in its own thread (the default), or in the caller's
        (`start=False`; `omnigpt serve` runs it on the main thread, where PyTorch's CPU kernels
        run 15–20% faster than on another thread)."""
        try:
            self._loop()
        finally:
            with self._cond:
                self._closed = True
                left = [*self._waiting, *{id(s.ticket): s.ticket for s in self._running}.values()]
                self._waiting.clear()
            for ticket in left:
                ticket.on_event(Failed("the server is shutting down", 503))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    break
                admitted = self._admit()
            try:
                for ticket in admitted:
                    if isinstance(ticket.work, Job):
                        self._run_job(ticket)
                self._start([t for t in admitted if isinstance(t.work, Request)])
                self._running = [s for s in self._running if not s.ticket.cancelled]
                self._compact()
                if self._running:
                    self._step()
            except Exception as e:  # a bug or an out-of-memory: fail what runs, keep serving
                log.exception("the engine failed; the requests it was running are told so")
                for ticket in {id(s.ticket): s.ticket for s in self._running}.values():
                    ticket.on_event(Failed(f"the engine failed: {e}"))
                self._running = []

    def _admit(self) -> list[Ticket]:
        """Waiting tickets that start now, in order: jobs, and requests while their answers fit in
        the free slots (the first that does not fit waits, so no request is passed over)."""
        admitted, free = [], self.max_running - len(self._running)
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.cancelled:
                self._waiting.popleft()
                continue
            if isinstance(ticket.work, Request):
                if ticket.work.n > free:
                    break
                free -= ticket.work.n
            admitted.append(self._waiting.popleft())
        return admitted

    def _run_job(self, ticket: Ticket) -> None:
        try:
            result = ticket.work.run(self.model)
        except OmnigptError as e:
            ticket.on_event(Failed(str(e), 400))
        else:
            ticket.on_event(Done(result))

    def _start(self, tickets: list[Ticket]) -> None:
        """Prefills admitted requests into free slots, in groups of similar length that together
        hold at most PREFILL_TOKENS (padding included), and samples their first tokens."""
        group: list[Ticket] = []
        for ticket in sorted(tickets, key=lambda t: len(t.work.prompt)):
            longest = len(ticket.work.prompt)  # sorted: the newcomer is the longest
            if group and (len(group) + 1) * longest > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(ticket)
        if group:
            self._prefill(group)

    @torch.inference_mode()
    def _prefill(self, tickets: list[Ticket]) -> None:
        """One left-padded pass over the prompts of `tickets` (their media spliced in), written to
        the slots after the running ones; when it fails on one request's media, each alone."""
        base, k = len(self._running), len(tickets)  # the running sequences fill slots 0..base-1
        requests = [t.work for t in tickets]
        tokens, pads = left_pad([r.prompt for r in requests])
        tokens, pads = tokens.to(self.device), pads.to(self.device)
        views = [_rows_view(c, base, k) for c in self.caches]
        inputs = _merge_inputs([r.inputs for r in requests], self.device)
        try:
            logits, _ = _prefill(self.model, tokens, pads, views, tokens.size(1), inputs)
        except OmnigptError as e:  # a request's media do not fit its text
            if k > 1:
                for ticket in tickets:
                    self._prefill([ticket])
            else:
                tickets[0].on_event(Failed(str(e), 400))
            return
        except Exception as e:  # a bug or memory running out: these requests fail, not the rest
            log.exception("a prefill failed; its requests are told so")
            for ticket in tickets:
                ticket.on_event(Failed(f"the engine failed: {e}"))
            return
        T, slot = tokens.size(1), base + k  # further answers go after the first ones
        logits = logits[:, -1, : self.vocab].float()
        for row, (ticket, request) in enumerate(zip(tickets, requests, strict=True)):
            sequences = []
            for index in range(request.n):
                if index:  # a further answer starts from a copy of the prompt's cache
                    for c in self.caches:
                        c.k[slot, :, :T] = c.k[base + row, :, :T]
                        c.v[slot, :, :T] = c.v[base + row, :, :T]
                    slot += 1
                at = base + row if index == 0 else slot - 1
                sequences.append(self._sequence(ticket, index, at, int(pads[row]), T))
            self._running += sequences
            self._advance(sequences, logits[row : row + 1].expand(request.n, -1))
        self._compact()

    def _sequence(self, ticket: Ticket, index: int, slot: int, start: int, length: int):
        """Answer `index` of a request, its prompt in cache positions start..length-1 of `slot`."""
        request, opts = ticket.work, ticket.work.opts
        seed = None if opts.seed is None else opts.seed + index
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        seen = None
        if opts.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            prompt = torch.tensor(request.prompt, device=self.device)
            seen[prompt.clamp(max=self.vocab - 1)] = True
        text = StopText(self.tokenizer, opts.stop_strings)
        return _Sequence(ticket, index, slot, start, length, -1, text, generator, seen)

    @torch.inference_mode()
    def _step(self) -> None:
        """One token for every running sequence, each at its own position."""
        running = self._running
        ids = torch.tensor([[s.last] for s in running], device=self.device)  # (n, 1)
        lengths = torch.tensor([s.length for s in running], device=self.device)  # (n,)
        starts = torch.tensor([s.start for s in running], device=self.device)
        end = max(s.length for s in running) + 1
        mask = row_mask(starts, lengths, 1, end)  # each row sees its own keys only
        caches = [RowCache(c, lengths, end) for c in self.caches]
        positions = (lengths - starts)[:, None]
        logits, _ = self.model(ids, positions=positions, attn_mask=mask, caches=caches)
        for s in running:
            s.length += 1
        self._advance(running, logits[:, -1, : self.vocab].float())

    def _advance(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Samples each sequence's next token from its row of `logits` (n, V) and sends what it adds."""
        chosen = self._sample(sequences, logits)
        want = [s.request.logprobs is not None for s in sequences]
        log_probs = logits.log_softmax(-1) if any(want) else None
        finished, made = [], 0
        for row, (s, token) in enumerate(zip(sequences, chosen, strict=True)):
            if s.ticket.first_token is None:
                s.ticket.first_token = time.perf_counter() - s.ticket.submitted
            request, opts = s.request, s.request.opts
            if opts.stop_at_eot and token in request.stop_ids:
                self._finish(s, "stop", s.text.flush())
                finished.append(s)
                continue
            s.made += 1
            made += 1
            s.last = token
            if s.seen is not None:
                s.seen[token] = True
            s.held.append(token)
            if log_probs is not None and want[row]:
                s.held_logprobs.append(_logprob(log_probs[row], token, request.logprobs))
            text = s.text.push(token)
            if s.text.stopped:
                self._finish(s, "stop", text)
                finished.append(s)
            elif s.made >= opts.max_new_tokens or s.length + 1 >= self.block_size:
                self._finish(s, "length", text + s.text.flush())
                finished.append(s)
            elif text:
                self._send(s, text)
        if made and self.on_tokens is not None:
            self.on_tokens(made)
        if finished:
            gone = {id(s) for s in finished}
            self._running = [s for s in self._running if id(s) not in gone]
            self._compact()

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Greedy rows by one argmax; each sampled row with its own options and generator."""
        out = logits.argmax(-1).tolist()
        for row, s in enumerate(sequences):
            opts = s.request.opts
            if opts.temperature == 0 and s.seen is None:
                continue
            scores = logits[row : row + 1]
            if s.seen is not None:
                scores = apply_repetition_penalty(scores, s.seen[None], opts.repetition_penalty)
            out[row] = int(sample_next(scores, opts, s.generator)[0])
        return out

    def _send(self, s: _Sequence, text: str) -> None:
        logprobs = s.held_logprobs if s.request.logprobs is not None else None
        s.ticket.on_event(Piece(s.index, text, s.held, logprobs))
        s.held, s.held_logprobs = [], []

    def _finish(self, s: _Sequence, reason: str, text: str) -> None:
        if text or s.held:
            self._send(s, text)
        s.ticket.on_event(Finished(s.index, reason, len(s.request.prompt), s.made))

    def _compact(self) -> None:
        """Moves the running sequences into slots 0..n-1 (a sequence beyond them has its cache copied
        into a free one), so that row i of a step is slot i."""
        n = len(self._running)
        free = sorted(set(range(n)) - {s.slot for s in self._running})
        for s in self._running:
            if s.slot >= n:
                dst = free.pop(0)
                for c in self.caches:
                    c.k[dst, :, s.start : s.length] = c.k[s.slot, :, s.start : s.length]
                    c.v[dst, :, s.start : s.length] = c.v[s.slot, :, s.start : s.length]
                s.slot = dst
        self._running.sort(key=lambda s: s.slot)


def _rows_view(cache: KVCache, first: int, count: int) -> KVCache:
    """Slots first..first+count-1 of a layer's cache as a KVCache of that batch: what a prefill
    writes lands in those slots."""
    view = KVCache.__new__(KVCache)
    view.k, view.v = cache.k[first : first + count], cache.v[first : first + count]
    return view


def _merge_inputs(inputs: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    """The media inputs of several requests as one batch's, in order: images concatenated, clips
    zero-padded to the longest (their lengths in `frames`)."""
    images = [i["images"] for i in inputs if "images" in i]
    mels = [i["mel"] for i in inputs if "mel" in i]
    out = {}
    if images:
        out["images"] = torch.cat(images).to(device)
    if mels:
        longest = max(m.size(-1) for m in mels)
        out["mel"] = torch.cat([F.pad(m, (0, longest - m.size(-1))) for m in mels]).to(device)
        out["frames"] = torch.cat([i["frames"] for i in inputs if "mel" in i]).to(device)
    return out


def _logprob(log_probs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability (V,) and the `top` most likely tokens'."""
    best = torch.topk(log_probs, top) if top else None
    alternatives = (
        list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else []
    )
    return TokenLogprob(token, float(log_probs[token]), alternatives)
