"""The continuous-batching engine: answers in a busy batch are the answers alone, requests join and
leave between steps, cancelled ones free their slots; stop strings held back and cut."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import slowed

from omnigpt.engine import Busy, Done, Engine, Failed, Finished, Job, Piece, Request
from omnigpt.errors import OmnigptError
from omnigpt.generate import GenerationOptions, StopText, generate_tokens

GREEDY = GenerationOptions(max_new_tokens=30, temperature=0, stop_at_eot=False)


@pytest.fixture
def parts(code_model):
    return code_model


class Answers:
    """Collects each request's events; `wait()` until every request finished or failed."""

    def __init__(self):
        self.tokens, self.text, self.finished, self.failed = {}, {}, {}, {}
        self.order: list[tuple[int, int]] = []  # (request, index) as pieces arrive
        self.lock = threading.Lock()
        self.expected = 0
        self.done = threading.Event()

    def on(self, key: int, n: int = 1):
        self.expected += n
        for i in range(n):
            self.tokens[key, i], self.text[key, i] = [], ""

        def on_event(event):
            with self.lock:
                if isinstance(event, Piece):
                    self.tokens[key, event.index] += event.tokens
                    self.text[key, event.index] += event.text
                    self.order.append((key, event.index))
                elif isinstance(event, Finished):
                    self.finished[key, event.index] = event
                elif isinstance(event, Failed):
                    self.failed[key] = event
                    self.done.set()
                if len(self.finished) == self.expected:
                    self.done.set()

        return on_event

    def wait(self, seconds: float = 20) -> None:
        assert self.done.wait(seconds), "the engine did not finish in time"


def test_answers_in_a_busy_batch_equal_answers_alone(parts):
    model, tok = parts
    prompts = [
        tok.encode(p) for p in ["def add(a", "class Point:\n", "    return", "x", "self.y = "]
    ]
    alone = [generate_tokens(model, [p], GREEDY)[0] for p in prompts]
    engine = Engine(model, tok, max_running=3, max_waiting=8)
    try:
        slowed(engine, 0.002)
        answers = Answers()
        for i, p in enumerate(prompts):  # they arrive while others decode; 3 slots for 5
            engine.submit(Request(p, GREEDY), answers.on(i))
            time.sleep(0.01)
        answers.wait()
    finally:
        engine.close()
    for i, expected in enumerate(alone):
        assert answers.tokens[i, 0] == expected
        assert answers.finished[i, 0].reason == "length"
        assert answers.finished[i, 0].completion_tokens == len(expected) == 30
        assert answers.finished[i, 0].prompt_tokens == len(prompts[i])
    # the later requests joined before the first ones were done
    first_done = max(n for n, (key, _) in enumerate(answers.order) if key == 0)
    assert any(key in (1, 2) for key, _ in answers.order[:first_done])


def test_n_answers_share_a_prompt_and_each_has_its_own_seed(parts):
    model, tok = parts
    prompt = tok.encode("def ")
    sampled = GenerationOptions(max_new_tokens=12, temperature=1.0, seed=7, stop_at_eot=False)
    engine = Engine(model, tok, max_running=4)
    try:
        answers = Answers()
        engine.submit(Request(prompt, sampled, n=3), answers.on(0, 3))
        engine.submit(Request(prompt, sampled, n=1), answers.on(1))
        answers.wait()
    finally:
        engine.close()
    choices = [answers.tokens[0, i] for i in range(3)]
    assert len(set(map(tuple, choices))) == 3  # each answer samples on its own
    assert answers.tokens[1, 0] == choices[0]  # the same seed gives the same answer
    alone = generate_tokens(model, [prompt], sampled)[0]
    assert choices[0] == alone  # and the same as generate's, seeded alike


def test_cancelled_requests_leave_and_the_rest_continue(parts):
    model, tok = parts
    long = GenerationOptions(max_new_tokens=60, temperature=0, stop_at_eot=False)
    prompts = [tok.encode(p) for p in ["def ", "class ", "return "]]
    engine = Engine(model, tok, max_running=3)
    try:
        slowed(engine, 0.005)
        answers = Answers()
        tickets = [engine.submit(Request(p, long), answers.on(i)) for i, p in enumerate(prompts)]
        time.sleep(0.08)
        assert engine.running == 3
        tickets[0].cancel()  # the first slot frees; the last sequence moves into it
        deadline = time.time() + 2
        while engine.running != 2 and time.time() < deadline:
            time.sleep(0.005)
        assert engine.running == 2
        answers.expected -= 1
        answers.wait()
    finally:
        engine.close()
    assert (0, 0) not in answers.finished
    for i in (1, 2):
        assert answers.tokens[i, 0] == generate_tokens(model, [prompts[i]], long)[0]


def test_stop_tokens_stop_strings_and_limits(parts):
    model, tok = parts
    prompt = tok.encode("def add")
    [free] = generate_tokens(model, [prompt], GREEDY)
    text = tok.decode(free)
    engine = Engine(model, tok, max_running=2)
    try:
        answers = Answers()
        # the token generated 5th ends the answer; it is not part of it
        ending = GenerationOptions(max_new_tokens=30, temperature=0)
        engine.submit(Request(prompt, ending, frozenset({free[4]})), answers.on(0))
        stop = text[6:9]  # three characters: three tokens of a char tokenizer
        opts = GenerationOptions(max_new_tokens=30, temperature=0, stop_strings=(stop,))
        engine.submit(Request(prompt, opts), answers.on(1))
        answers.wait()
    finally:
        engine.close()
    first = free.index(free[4])
    assert answers.tokens[0, 0] == free[:first]
    assert answers.finished[0, 0].reason == "stop"
    assert answers.finished[0, 0].completion_tokens == first
    cut = text.index(stop)
    assert answers.text[1, 0] == text[:cut]
    assert answers.finished[1, 0].reason == "stop"
    assert answers.tokens[1, 0] == free[: cut + len(stop)]  # every token it generated is reported


def test_limits_and_jobs(parts):
    model, tok = parts
    engine = Engine(model, tok, max_running=1, max_waiting=1)
    try:
        slowed(engine, 0.01)
        answers = Answers()
        long = GenerationOptions(max_new_tokens=50, temperature=0, stop_at_eot=False)
        first = engine.submit(Request(tok.encode("a"), long), answers.on(0))
        time.sleep(0.05)
        engine.submit(Request(tok.encode("b"), long), answers.on(1))  # waits
        with pytest.raises(Busy):
            engine.submit(Request(tok.encode("c"), long), answers.on(2))
        with pytest.raises(OmnigptError, match="context is 96"):
            engine.submit(Request(tok.encode("x" * 96), long), answers.on(3))
        with pytest.raises(OmnigptError, match="n must be from 1 to 1"):
            engine.submit(Request(tok.encode("x"), long, n=2), answers.on(4))
        first.cancel()  # its slot goes to the waiting request
        deadline = time.time() + 2
        while (engine.waiting or not engine.running) and time.time() < deadline:
            time.sleep(0.005)
        assert engine.waiting == 0 and engine.running == 1
        results = []
        engine.submit(Job(lambda m: m.config.block_size), results.append)
        answers.expected = 1  # request 1
        answers.wait()
        deadline = time.time() + 2
        while not results and time.time() < deadline:
            time.sleep(0.01)
        assert results == [Done(96)]
        engine.submit(Job(lambda m: (_ for _ in ()).throw(OmnigptError("cannot"))), results.append)
        while len(results) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert results[1] == Failed("cannot", 400)
    finally:
        engine.close()


def test_stop_text_holds_back_what_may_begin_a_stop_string(char_tokenizer):
    tok = char_tokenizer
    text = StopText(tok, ["self.x", "\n\n"])
    shown = [text.push(i) for i in tok.encode("a + self.y\n")]
    assert "".join(shown) == "a + self.y"  # "\n" may begin "\n\n": held
    assert shown[4:8] == ["", "", "", ""]  # "self" was held until "." and "y" ruled it out
    assert text.push(tok.encode("b")[0]) == "\nb"
    assert [text.push(i) for i in tok.encode(" self.x = 1")] == [" "] + [""] * 10
    assert text.stopped and text.push(tok.encode("z")[0]) == "" and text.flush() == ""
    ending = StopText(tok, ["\n\n"])
    assert ending.push(tok.encode("\n")[0]) == "" and ending.flush() == "\n"


def test_a_failing_prefill_fails_its_requests_and_the_engine_serves_on(parts):
    model, tok = parts
    engine = Engine(model, tok, max_running=2)
    try:
        answers = Answers()
        broken = Request(tok.encode("def "), GREEDY, inputs={"images": torch.zeros(1, 3, 8, 8)})
        engine.submit(broken, answers.on(0))  # a text model given images: its forward fails
        answers.wait()
        assert answers.failed[0].status == 500 and "engine failed" in answers.failed[0].message
        answers = Answers()
        engine.submit(Request(tok.encode("def "), GREEDY), answers.on(1))
        answers.wait()
        assert answers.finished[1, 0].completion_tokens == 30
    finally:
        engine.close()
