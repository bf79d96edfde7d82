import functools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omnigpt.checkpoint import load_checkpoint, open_run_folder, save_checkpoint
from omnigpt.config import ModelConfig, TrainConfig, save_json
from omnigpt.data import RandomWindows, prepare, sequential_windows
from omnigpt.errors import OmnigptError
from omnigpt.model import GPT
from omnigpt.tokenizer import Tokenizer
from omnigpt.train import Dist, fit, lr_factor, pretrain
from tests.conftest import CORPUS, single_and_two_process_runs

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_weights(checkpoint_a, checkpoint_b, atol: float, rtol: float) -> None:
    a, _ = load_checkpoint(checkpoint_a)
    b, _ = load_checkpoint(checkpoint_b)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol, msg=name)


@pytest.fixture
def data_dir(tmp_path, corpus_file):
    prepare([corpus_file], tmp_path / "data", "char", progress=False)
    return tmp_path / "data"


def test_loss_falls_on_a_repetitive_corpus(tmp_path, data_dir):
    cfg = TrainConfig(
        batch_size=16, max_steps=200, lr=1e-2, warmup_steps=10, eval_interval=100, log_interval=5
    )
    result = pretrain(
        data_dir, tmp_path / "run", ModelConfig(**{**TINY, "n_embd": 64}), cfg, progress=False
    )
    first = losses(tmp_path / "run")[1]
    assert first > 5.0  # ≈ ln(320): a fresh model knows nothing
    assert result.final_val_loss < 0.4
    assert result.steps == 200 and result.stopped_by == "max_steps"
    for name in (
        "best/model.safetensors",
        "latest/trainer_state.pt",
        "loss.png",
        "summary.json",
        "tokenizer.json",
    ):
        assert (tmp_path / "run" / name).is_file()
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["tokens"] == 200 * 16 * 32


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 1.0, cfg) == pytest.approx(0.1)


def _run(run_dir, tokens, tok, cfg, resume=False, interrupt_after_batches=None):
    model = (
        GPT(ModelConfig(**TINY, vocab_size=tok.vocab_size))
        if not resume
        else load_checkpoint(run_dir / "latest")[0]
    )
    batches = RandomWindows(tokens, 32, cfg.batch_size, cfg.seed)
    if interrupt_after_batches is not None:
        draw, count = batches.next_batch, [0]

        def next_batch():
            count[0] += 1
            if count[0] > interrupt_after_batches:
                raise KeyboardInterrupt
            return draw()

        batches.next_batch = next_batch
    val = functools.partial(sequential_windows, tokens[:500], 32, cfg.batch_size, cfg.eval_batches)
    return fit(model, tok, batches, val, cfg, run_dir, Dist(), resume=resume, progress=False)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, char_tokenizer, optimizer):
    tokens = np.asarray(char_tokenizer.encode(CORPUS), dtype=np.uint16)
    cfg = TrainConfig(
        batch_size=4,
        grad_accum=2,
        max_steps=30,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=10,
        log_interval=1,
        optimizer=optimizer,
    )
    (tmp_path / "a").mkdir()
    torch.manual_seed(0)
    _run(tmp_path / "a", tokens, char_tokenizer, cfg)

    (tmp_path / "b").mkdir()
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # mid-way through step 18's micro-batches
        _run(tmp_path / "b", tokens, char_tokenizer, cfg, interrupt_after_batches=17 * 2 + 1)
    assert max(losses(tmp_path / "b")) == 17
    _run(tmp_path / "b", tokens, char_tokenizer, cfg, resume=True)

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 31))
    for step in range(18, 31):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert_same_weights(tmp_path / "a/latest", tmp_path / "b/latest", atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_equals_a_big_batch(tmp_path, char_tokenizer):
    tokens = np.asarray(char_tokenizer.encode(CORPUS), dtype=np.uint16)
    results = []
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**TINY, vocab_size=char_tokenizer.vocab_size))
        cfg = TrainConfig(
            batch_size=batch,
            grad_accum=accum,
            max_steps=5,
            eval_interval=100,
            log_interval=1,
            precision="fp32",  # exact sums: bf16 rounds the two halves differently
        )
        (tmp_path / name).mkdir()
        # the accumulating run draws 4 + 4 windows per step from the same stream as one draw of 8
        batches = RandomWindows(tokens, 32, batch, 0)
        if accum == 2:
            big = RandomWindows(tokens, 32, 8, 0)
            queue = []

            def next_batch(big=big, queue=queue):
                if not queue:
                    x, y = big.next_batch()
                    queue.extend([(x[4:], y[4:]), (x[:4], y[:4])])
                return queue.pop()

            batches.next_batch = next_batch
        fit(
            model,
            char_tokenizer,
            batches,
            functools.partial(
                sequential_windows, tokens[:300], 32, cfg.batch_size, cfg.eval_batches
            ),
            cfg,
            tmp_path / name,
            Dist(),
            progress=False,
        )
        results.append(model.state_dict())
    for name, p in results[0].items():
        torch.testing.assert_close(p, results[1][name], atol=2e-6, rtol=1e-5, msg=name)


def test_kill_during_save_keeps_last_good_checkpoint(tmp_path, char_tokenizer, monkeypatch):
    model = GPT(ModelConfig(**TINY, vocab_size=char_tokenizer.vocab_size))
    save_checkpoint(tmp_path / "latest", model, char_tokenizer)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.wte.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", crash)  # dies half-way through writing the new checkpoint
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "latest", model, char_tokenizer, trainer_state={"step": 1})
    loaded, _ = load_checkpoint(tmp_path / "latest")
    torch.testing.assert_close(loaded.wte.weight, good["wte.weight"])

    # A crash between the two renames of the swap: only .latest.old is left, and it is found.
    os.replace(tmp_path / "latest", tmp_path / ".latest.old")
    loaded, _ = load_checkpoint(tmp_path)
    torch.testing.assert_close(loaded.wte.weight, good["wte.weight"])
    # ... and --resume puts it back as latest/
    save_json(tmp_path / "config.json", {"train": {}})
    assert open_run_folder(tmp_path, resume=True) == {"train": {}}
    loaded, _ = load_checkpoint(tmp_path / "latest")
    torch.testing.assert_close(loaded.wte.weight, good["wte.weight"])


def test_corrupt_and_mismatched_checkpoints_are_clear(tmp_path, char_tokenizer):
    model = GPT(ModelConfig(**TINY, vocab_size=char_tokenizer.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, char_tokenizer)
    weights = tmp_path / "ckpt/model.safetensors"
    other = Tokenizer.train_char(["only a few letters"])
    other.save(tmp_path)
    with pytest.raises(OmnigptError, match="does not match checkpoint"):
        load_checkpoint(tmp_path / "ckpt", tokenizer_path=tmp_path / "tokenizer.json")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OmnigptError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(OmnigptError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_existing_run_is_not_overwritten(tmp_path, data_dir):
    cfg = TrainConfig(batch_size=4, max_steps=3, eval_interval=100)
    pretrain(data_dir, tmp_path / "run", ModelConfig(**TINY), cfg, progress=False)
    before = (tmp_path / "run/latest/model.safetensors").read_bytes()
    with pytest.raises(OmnigptError, match="already holds a run"):
        pretrain(data_dir, tmp_path / "run", ModelConfig(**TINY), cfg, progress=False)
    assert (tmp_path / "run/latest/model.safetensors").read_bytes() == before


def test_time_budget_stops_training(tmp_path, char_tokenizer, monkeypatch):
    """Each step takes 0.25 s on a fake clock: a 1 s budget is exactly 4 steps on any machine, and
    the schedule's progress follows the clock."""
    import omnigpt.train

    clock = [1000.0]
    monkeypatch.setattr(omnigpt.train, "time", SimpleNamespace(time=lambda: clock[0]))
    tokens = np.asarray(char_tokenizer.encode(CORPUS), dtype=np.uint16)
    batches = RandomWindows(tokens, 32, 4, seed=0)
    draw = batches.next_batch

    def next_batch():
        clock[0] += 0.25
        return draw()

    batches.next_batch = next_batch
    model = GPT(ModelConfig(**TINY, vocab_size=char_tokenizer.vocab_size))
    cfg = TrainConfig(
        batch_size=4,
        max_steps=10**6,
        max_seconds=1.0,
        warmup_steps=1,
        min_lr_ratio=0.0,
        eval_interval=10**6,
        log_interval=1,
    )
    val = functools.partial(sequential_windows, tokens[:300], 32, 4, cfg.eval_batches)
    result = fit(model, char_tokenizer, batches, val, cfg, tmp_path, Dist(), progress=False)
    assert result.stopped_by == "max_seconds"
    assert result.steps == 4 and result.seconds == 1.0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    lrs = [r["lr"] for r in records if "lr" in r]
    # warmup, then cosine over the 1 s: progress 0.25, 0.5, 0.75 of the budget at steps 2–4
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.8536, 1e-3 * 0.5, 1e-3 * 0.1464], abs=1e-6)


def test_two_process_ddp_matches_single_process(tmp_path, data_dir):
    common = [
        "train",
        "--data",
        str(data_dir),
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "32",
        "--max-steps",
        "8",
        "--eval-interval",
        "4",
        "--log-interval",
        "1",
    ]
    common += ["--lr", "3e-3", "--warmup-steps", "2", "--no-progress", "--device", "cpu"]
    common += ["--precision", "fp32"]  # exact sums: bf16 rounds each process's half differently
    single_and_two_process_runs(common, tmp_path, batch_size=8)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert a.keys() == b.keys() and len(a) >= 2
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    assert_same_weights(tmp_path / "single/latest", tmp_path / "ddp/latest", atol=1e-5, rtol=1e-4)


def test_per_part_learning_rates():
    from omnigpt.train import build_optimizers

    model = GPT(ModelConfig(**TINY, vocab_size=64))
    cfg = TrainConfig(lr=1e-3, optimizer="adamw", lr_scale={"h.1": 0.1, "h.1.mlp": 2.0})
    (adamw,) = build_optimizers(model, cfg, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in adamw.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["h.0.attn.c_attn.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["h.1.attn.c_attn.weight"])] == pytest.approx(1e-4)
    assert lr_of[id(named["h.1.mlp.c_fc.weight"])] == pytest.approx(2e-3)  # the longest prefix
    decay = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert (
        decay[id(named["h.1.ln_1.weight"])] == 0.0 and decay[id(named["h.1.mlp.c_fc.weight"])] > 0
    )


def test_evaluations_are_printed_with_or_without_the_progress_bar(tmp_path, data_dir, capsys):
    cfg = TrainConfig(batch_size=4, max_steps=4, eval_interval=2, eval_batches=1)
    result = pretrain(data_dir, tmp_path / "run", ModelConfig(**TINY), cfg, progress=False)
    out = capsys.readouterr().out
    assert "step 2: val loss" in out and "precision:" not in out  # no bar, no start-up line
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == result.steps == 4 and (tmp_path / "run/loss.png").is_file()
