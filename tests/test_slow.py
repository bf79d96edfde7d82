"""Slow checks, run with `make test-slow`: compiled training and the built-in corpus end to end."""

import pytest
import torch

from omnigpt.checkpoint import load_checkpoint
from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.data import prepare, stdlib_corpus
from omnigpt.generate import GenerationOptions, generate_text
from omnigpt.train import pretrain

pytestmark = pytest.mark.slow


def test_compiled_training_matches_eager(tmp_path, corpus_file):
    prepare([corpus_file], tmp_path / "data", "char", progress=False)
    model_cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
    results = {}
    for compiled in (False, True):
        # fp32: compiled bf16 kernels round differently from eager ones, beyond these tolerances
        cfg = TrainConfig(
            batch_size=8, max_steps=20, eval_interval=100, compile=compiled, precision="fp32"
        )
        run = tmp_path / f"run-{compiled}"
        results[compiled] = pretrain(
            tmp_path / "data", run, ModelConfig(**model_cfg), cfg, progress=False
        )
        results[compiled, "model"] = load_checkpoint(run / "latest")[0]
    assert results[True].final_val_loss == pytest.approx(results[False].final_val_loss, abs=1e-3)
    # the checkpoint of a compiled run holds plain weight names and loads like any other
    for (name, a), b in zip(
        results[False, "model"].state_dict().items(),
        results[True, "model"].state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=name)


def test_builtin_corpus_trains_and_generates(tmp_path):
    files = stdlib_corpus()[:60]
    prepare(files, tmp_path / "data", "bpe:1024", progress=False)
    cfg = TrainConfig(batch_size=8, max_steps=150, lr=3e-3, optimizer="muon", eval_interval=1000)
    result = pretrain(
        tmp_path / "data", tmp_path / "run", ModelConfig.from_preset("nano"), cfg, progress=False
    )
    assert result.final_val_loss < 6.0  # ln(1024) ≈ 6.9 untrained
    model, tok = load_checkpoint(tmp_path / "run")
    text = generate_text(model, tok, ["def "], GenerationOptions(max_new_tokens=40, seed=0))[0]
    assert len(text) > 20
