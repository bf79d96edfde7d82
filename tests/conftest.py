"""Shared fixtures: tiny corpora, tokenizers and models built in-process (no downloads, no ../shared)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from omnigpt.config import ModelConfig
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


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def single_and_two_process_runs(args: list[str], out_dir, batch_size: int) -> None:
    """Runs the CLI with `args` twice: in this process on one thread with `batch_size`
    (out_dir/single), and under torchrun as two single-threaded processes with half the batch each
    (out_dir/ddp). Each run's every step should then be the same."""
    from omnigpt.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--batch-size", str(batch_size), "--out", str(out_dir / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.run(
        [*torchrun, "-m", "omnigpt", *args]
        + ["--batch-size", str(batch_size // 2), "--out", str(out_dir / "ddp")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr
