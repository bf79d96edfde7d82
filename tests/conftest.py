"""Shared fixtures: tiny corpora, tokenizers and models built in-process (no downloads, no ../shared)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from omnigpt import hardware
from omnigpt.checkpoint import save_checkpoint
from omnigpt.config import ModelConfig
from omnigpt.examples import encode_records
from omnigpt.model import GPT
from omnigpt.tokenizer import Tokenizer

CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "def sub(a, b):\n    return a - b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
) * 20


@pytest.fixture(autouse=True)
def _deterministic_and_offline(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach the Hugging Face Hub


@pytest.fixture
def fake_cpu(monkeypatch):
    """Makes the machine look like a given CPU: fake_cpu("AVX2"), fake_cpu("AVX512", amx=True)."""

    def fake(
        capability: str,
        amx: bool = False,
        avx512_bf16: bool = False,
        bf16_faster: bool = True,
        arch: str = "x86_64",
    ):
        probes = []

        def probe() -> bool:
            probes.append(1)
            return bf16_faster

        monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware.platform, "machine", lambda: arch)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(hardware, "bf16_matmul_is_faster", probe)
        hardware.cpu_bf16_native.cache_clear()
        monkeypatch.setattr(hardware, "_warned", set())
        return probes

    yield fake
    hardware.cpu_bf16_native.cache_clear()


@pytest.fixture
def char_tokenizer() -> Tokenizer:
    return Tokenizer.train_char([CORPUS])


def tiny_model(vocab_size: int = 64, **overrides) -> GPT:
    cfg = ModelConfig(
        **{
            **dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32),
            **overrides,
        }
    )
    return GPT(cfg).eval()


@pytest.fixture(scope="session")
def code_model() -> tuple[GPT, Tokenizer]:
    """A tiny GPT trained for about a second on CORPUS with a character tokenizer: its greedy answers
    are printable, code-like and differ from prompt to prompt (an untrained model's are not)."""
    tok = Tokenizer.train_char([CORPUS])
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size, block_size=96).train()
    data = torch.tensor(tok.encode(CORPUS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 33, (16,), generator=rows)
        x = torch.stack([data[i : i + 32] for i in starts])
        y = torch.stack([data[i + 1 : i + 33] for i in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def single_and_two_process_runs(
    args: list[str], out_dir, batch_size: int, name="ddp", env: dict | None = None
) -> None:
    """Runs the CLI with `args` twice: in this process on one thread with `batch_size`
    (out_dir/single), and under torchrun as two single-threaded processes with half the batch each
    (out_dir/NAME; `env` added to their environment). Each run's every step should then be the same."""
    single_process_run([*args, "--batch-size", str(batch_size), "--out", str(out_dir / "single")])
    ddp = subprocess.run(
        two_processes([*args, "--batch-size", str(batch_size // 2), "--out", str(out_dir / name)]),
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr


def single_process_run(args: list[str]) -> None:
    """The CLI with `args` in this process, on one thread (as each of two processes runs)."""
    from omnigpt.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def two_processes(args: list[str]) -> list[str]:
    """The command line that runs the CLI with `args` under torchrun, two processes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*torchrun, "-m", "omnigpt", *args]


# -- supervised examples: a character tokenizer, string-reversal tasks and a small base model -------

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <|end|> 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz0123456789 =+?,.<>|AW"])


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def reversal_examples(tok, n=12, seed=0):
    """`n` records reversing 2-7 letter strings ("abc=" → "cba"), and their encoded examples."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        s = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 7)))
        records.append({"prompt": s + "=", "completion": s[::-1]})
    return records, encode_records(tok, records, 40)[0]


@pytest.fixture
def base_dir(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=48)
    )
    save_checkpoint(tmp_path / "base", model, tok)
    return tmp_path / "base"


@pytest.fixture
def task_files(tmp_path, tok):
    train, _ = reversal_examples(tok, 400, seed=1)
    val, _ = reversal_examples(tok, 40, seed=2)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", val)
    return tmp_path / "train.jsonl", tmp_path / "val.jsonl"


QUICK = dict(batch_size=16, max_steps=8, eval_interval=4, warmup_steps=2, lr=1e-2, log_interval=1)


# -- a server on loopback, in this process ---------------------------------------------------------


@contextlib.contextmanager
def running_server(service):
    """Serves `service` (omnigpt.server.Service) with uvicorn on 127.0.0.1 at a free port, in a
    thread; yields its base URL."""
    import socket
    import threading

    import uvicorn

    from omnigpt.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def slowed(engine, seconds: float) -> None:
    """Makes each decode step of an engine take at least `seconds` longer (to catch it mid-way)."""
    step = engine._step

    def slow_step():
        time.sleep(seconds)
        step()

    engine._step = slow_step
