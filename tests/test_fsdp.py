"""Sharded training (FSDP2) on two CPU processes with gloo, against one process with the same
global batch: the same losses, sharded checkpoints that resume exactly after a SIGKILL, on two
processes or on one, and a best/ that every other command loads."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from omnigpt.checkpoint import is_sharded
from omnigpt.cli import main
from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.data import prepare
from omnigpt.load import load_model
from omnigpt.lora import adapter_state
from omnigpt.model import GPT
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.parallel import checkpoint_activations, memory_report
from omnigpt.train import build_optimizers
from tests.conftest import (
    CORPUS,
    single_and_two_process_runs,
    single_process_run,
    two_processes,
)
from tests.test_train import assert_same_weights, losses

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    prepare([tmp_path / "corpus.txt"], tmp_path / "data", "char", progress=False)
    return tmp_path / "data"


def train_args(data_dir, steps: int, every: int) -> list[str]:
    args = ["train", "--data", str(data_dir), "--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
    args += ["--block-size", "32", "--max-steps", str(steps), "--eval-interval", str(every)]
    args += ["--log-interval", "1", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress"]
    # exact sums (bf16 rounds each process's half differently), sharded
    return args + ["--device", "cpu", "--precision", "fp32", "--strategy", "fsdp"]


def grad_norms(run_dir) -> list[float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["grad_norm"] for r in records if "grad_norm" in r]


def assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys() and len(a) >= 2
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_fsdp_matches_single_process_and_its_best_loads_everywhere(
    tmp_path, data_dir, capsys, monkeypatch, optimizer
):
    # two micro-batches per step, and Muon orthogonalising whole matrices: both must see the
    # gradients of the whole batch
    args = train_args(data_dir, 8, 4) + ["--grad-accum", "2", "--optimizer", optimizer]
    # Muon orthogonalises in bf16 where bf16 is native, where sums in another order round
    # differently; in fp32 here (the processes: an AVX2 CPU's kernels, where bf16 is not native)
    monkeypatch.setattr("omnigpt.muon.matmul_dtype", lambda device: torch.float32)
    env = {"ATEN_CPU_CAPABILITY": "avx2"} if optimizer == "muon" else None
    single_and_two_process_runs(args, tmp_path, batch_size=4, name="fsdp", env=env)
    assert_same_losses(losses(tmp_path / "single"), losses(tmp_path / "fsdp"))
    # clipping (at 1.0) saw the norm of the whole gradient, not of a process's shards
    norms = [grad_norms(tmp_path / run) for run in ("single", "fsdp")]
    assert norms[1] == pytest.approx(norms[0], abs=1e-3) and max(norms[0]) > 1.0
    # latest/ is sharded (every process wrote its part); it loads whole in one process
    assert is_sharded(tmp_path / "fsdp/latest") and is_sharded(tmp_path / "single/latest")
    assert len(list((tmp_path / "fsdp/latest/shards").glob("*.distcp"))) == 2
    assert_same_weights(tmp_path / "single/latest", tmp_path / "fsdp/latest", atol=1e-4, rtol=1e-4)
    # best/ is one model.safetensors, gathered from the shards
    assert (tmp_path / "fsdp/best/model.safetensors").is_file()
    assert_same_weights(tmp_path / "single/best", tmp_path / "fsdp/best", atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    for model in ("fsdp", "fsdp/latest"):
        args = ["generate", "--model", str(tmp_path / model), "the ", "--temperature", "0"]
        assert main([*args, "--max-new-tokens", "8"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("the ") and len(out) >= 10


def test_fsdp_lora_matches_single_process(tmp_path, base_dir, task_files):
    args = ["finetune", "--model", str(base_dir), "--data", str(task_files[0])]
    args += ["--method", "lora", "--lora-rank", "2", "--pack", "--max-steps", "6"]
    args += ["--eval-interval", "3", "--log-interval", "1", "--lr", "1e-2", "--no-progress"]
    args += ["--device", "cpu", "--precision", "fp32", "--strategy", "fsdp"]
    single_and_two_process_runs(args, tmp_path, batch_size=8, name="fsdp")
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(a) == 6
    assert_same_losses(a, b)
    # best/ holds the adapters alone, as any LoRA run's; loaded onto the base they agree
    single, _ = load_model(tmp_path / "single/best")
    fsdp, _ = load_model(tmp_path / "fsdp/best")
    for (name, pa), pb in zip(
        adapter_state(single).items(), adapter_state(fsdp).values(), strict=True
    ):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)
    assert any(v.abs().sum() > 0 for k, v in adapter_state(fsdp).items() if "lora_B" in k)
    # latest/ holds the adapters and their optimizer state, sharded (the base is not training
    # state); both runs resume from theirs in one process and go on alike
    for run in ("single", "fsdp"):
        more = ["--max-steps", "8", "--batch-size", "8", "--no-progress"]
        again = ["--model", str(base_dir), "--data", str(task_files[0])]
        single_process_run(["finetune", *again, "--resume", "--out", str(tmp_path / run), *more])
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(a) == 8
    assert_same_losses(a, b)


def _kill_when(run: subprocess.Popen, metrics: Path, step: int, marker: str) -> None:
    """SIGKILL to every process of the run (torchrun and its workers) once `step` is logged."""
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None:
        if metrics.is_file() and f'"step": {step},' in metrics.read_text():
            break
        time.sleep(0.005)
    assert run.poll() is None, "the run ended before it could be killed"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, PermissionError, ProcessLookupError, ValueError):
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    run.wait(timeout=30)


def test_fsdp_run_killed_mid_run_resumes_exactly_on_two_processes_and_on_one(tmp_path, data_dir):
    steps, every = 24, 3
    args = train_args(data_dir, steps, every)
    single_process_run([*args, "--batch-size", "4", "--out", str(tmp_path / "single")])
    reference = losses(tmp_path / "single")

    killed = tmp_path / "killed"
    run = subprocess.Popen(
        two_processes([*args, "--batch-size", "2", "--out", str(killed)]),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_when(run, killed / "metrics.jsonl", 7, str(killed))
    saved_at = torch.load(killed / "latest/trainer_state.pt", weights_only=True)["step"]
    assert 6 <= saved_at < steps and saved_at % every == 0
    shutil.copytree(killed, tmp_path / "on_one")

    resumed = subprocess.run(
        two_processes(["train", "--resume", "--out", str(killed), "--no-progress"]),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    # one process, the same global batch: the shards of two processes load into one
    single_process_run(
        ["train", "--resume", "--out", str(tmp_path / "on_one")]
        + ["--batch-size", "4", "--no-progress"]
    )
    for run_dir in (killed, tmp_path / "on_one"):
        got = losses(run_dir)  # the last record of each step: the resumed run's
        assert_same_losses(reference, got)
        assert_same_weights(tmp_path / "single/latest", run_dir / "latest", atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, vocab_size=64))
    x = torch.randint(64, (2, 16))

    def grads(m):
        m.zero_grad()
        m(x, x)[1].backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    def saved_bytes(m):
        """What the forward pass keeps for the backward pass."""
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, x)[1].backward()
        return sum(kept)

    plain, plain_bytes = grads(model), saved_bytes(model)
    keys = set(model.state_dict())
    checkpoint_activations(model)
    assert set(model.state_dict()) == keys  # names unchanged: checkpoints stay compatible
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], msg=name)
    assert saved_bytes(model) < 0.6 * plain_bytes


def test_memory_report_counts_parameters_gradients_and_optimizer_state():
    model = GPT(ModelConfig(**TINY, vocab_size=64))
    n = sum(p.numel() for p in model.parameters())  # the tied embedding once
    opts = build_optimizers(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    report = memory_report(model, opts, "ddp", 1)
    mb = 4 * n / 1e6
    assert f"parameters {mb:,.1f} MB, gradients {mb:,.1f} MB" in report
    assert f"optimizer state {2 * mb:,.1f} MB" in report
    # Muon keeps one value per matrix entry instead of AdamW's two
    opts = build_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert (
        float(memory_report(model, opts, "ddp", 1).split("optimizer state ")[1].split()[0]) < 2 * mb
    )


def test_resuming_a_ddp_run_as_fsdp_is_refused(tmp_path, data_dir, capsys):
    args = train_args(data_dir, 2, 1)
    args[args.index("fsdp")] = "ddp"
    single_process_run([*args, "--out", str(tmp_path / "run")])
    config = tmp_path / "run/config.json"
    config.write_text(config.read_text().replace('"strategy": "ddp"', '"strategy": "fsdp"'))
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--max-steps", "3"]) == 2
    assert "not sharded; it resumes with strategy ddp" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_compiled_with_activation_checkpointing_matches_single_process(tmp_path, data_dir):
    args = train_args(data_dir, 6, 3) + ["--compile", "--activation-checkpointing"]
    single_and_two_process_runs(args, tmp_path, batch_size=4, name="fsdp")
    a, b = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert a.keys() == b.keys() and len(a) == 6
    for step in a:  # compiled kernels may sum in another order
        assert b[step] == pytest.approx(a[step], abs=1e-4), step


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_multimodal_training_on_two_processes_whose_batches_hold_different_media(
    tmp_path, strategy, monkeypatch
):
    # a process's batch may hold images and no audio while the other's holds audio: every process
    # must still use every encoder, or DDP's averaging and FSDP's gathering wait on each other.
    # The encoders a batch leaves out then get zero gradients, which AdamW steps (by momentum)
    # where one process alone would skip them: the reference process does the same
    monkeypatch.setattr(MultimodalGPT, "every_part_each_pass", True)
    assert main(["make-data", "shapes", "keypad", "--out", str(tmp_path / "data"), "-n", "16"]
                + ["--seed", "0", "--max-shapes", "1", "--max-digits", "2"]) == 0  # fmt: skip
    args = ["train", "--data", str(tmp_path / "data/all.jsonl"), "--preset", "nano"]
    args += ["--vision", "tiny", "--audio", "tiny,sample_rate=8000,n_fft=200,hop_length=80,"
             "n_mels=40,max_seconds=1", "--max-steps", "4", "--eval-interval", "2"]  # fmt: skip
    args += ["--log-interval", "1", "--no-progress", "--device", "cpu", "--precision", "fp32"]
    single_and_two_process_runs(
        [*args, "--strategy", strategy], tmp_path, batch_size=2, name=strategy
    )
    assert_same_losses(losses(tmp_path / "single"), losses(tmp_path / strategy))
