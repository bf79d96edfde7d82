"""Precision and device that follow the hardware, and a description of the machine."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from omnigpt import hardware
from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.data import RandomWindows, sequential_windows
from omnigpt.model import GPT
from omnigpt.train import Dist, fit, padded_vocab
from tests.conftest import CORPUS

CPU = torch.device("cpu")


def test_auto_is_fp32_on_a_cpu_without_native_bf16(fake_cpu):
    probes = fake_cpu("AVX2")  # e.g. AMD Zen 3: bf16 matmuls are emulated
    assert hardware.resolve_precision("auto", CPU) == "fp32"
    assert hardware.matmul_dtype(CPU) == torch.float32
    assert probes == []  # what the CPU reports settles it: no probe needed


def test_auto_is_bf16_where_the_cpu_has_amx(fake_cpu):
    probes = fake_cpu("AVX512", amx=True, avx512_bf16=True)
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    assert hardware.matmul_dtype(CPU) == torch.bfloat16
    assert probes == []  # AMX settles it


def test_the_probe_decides_for_avx512_bf16_without_amx(fake_cpu):
    probes = fake_cpu("AVX512", avx512_bf16=True, bf16_faster=False)
    assert hardware.resolve_precision("auto", CPU) == "fp32"
    probes = fake_cpu("AVX512", avx512_bf16=True, bf16_faster=True)
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    assert probes == [1]  # measured once, then remembered


def test_avx2_kernels_mean_fp32_even_on_a_cpu_with_amx(fake_cpu):
    probes = fake_cpu("AVX2", amx=True)  # ATen held to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    assert hardware.resolve_precision("auto", CPU) == "fp32" and probes == []


def test_the_probe_runs_on_one_thread_and_restores_the_threads(monkeypatch):
    threads, seen = torch.get_num_threads(), []
    timed = hardware._matmul_seconds

    def recording(dtype):
        seen.append(torch.get_num_threads())
        return timed(dtype)

    monkeypatch.setattr(hardware, "_matmul_seconds", recording)
    assert isinstance(hardware.bf16_matmul_is_faster(), bool)
    assert seen == [1, 1]  # bf16, then fp32, each on one thread
    assert torch.get_num_threads() == threads


def test_an_avx512_cpu_without_bf16_instructions_is_fp32(fake_cpu):
    probes = fake_cpu("AVX512", amx=False)
    assert hardware.resolve_precision("auto", CPU) == "fp32" and probes == []


def test_other_architectures_are_decided_by_the_probe(fake_cpu):
    fake_cpu("DEFAULT", arch="aarch64", bf16_faster=True)
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    fake_cpu("DEFAULT", arch="aarch64", bf16_faster=False)
    assert hardware.resolve_precision("auto", CPU) == "fp32"


def test_auto_on_cuda_follows_native_bf16_support(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert hardware.resolve_precision("auto", cuda) == "fp32"  # e.g. a V100 or T4


def test_explicit_precisions_are_kept(fake_cpu):
    fake_cpu("AVX512", amx=True)
    assert hardware.resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        hardware.resolve_precision("fp16", CPU)


def test_a_bf16_run_on_an_emulating_cpu_warns_once(fake_cpu, capsys, tmp_path, char_tokenizer):
    fake_cpu("AVX2")
    tokens = np.asarray(char_tokenizer.encode(CORPUS), dtype=np.uint16)
    vocab = padded_vocab(char_tokenizer.vocab_size)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=32))
    cfg = TrainConfig(batch_size=2, max_steps=3, eval_interval=2, eval_batches=1, precision="bf16")
    result = fit(
        model,
        char_tokenizer,
        RandomWindows(tokens, 16, 2, seed=0),
        functools.partial(sequential_windows, tokens[:200], 16, 2, cfg.eval_batches),
        cfg,
        tmp_path,
        Dist(),
        progress=False,
    )
    assert result.precision == "bf16"  # honoured, though slow
    err = capsys.readouterr().err
    assert err.count("bf16 on this CPU (AVX2, no AMX or AVX-512 BF16) is emulated") == 1


def test_no_warning_where_bf16_is_native(fake_cpu, capsys):
    fake_cpu("AVX512", amx=True)
    assert hardware.resolve_precision("bf16", CPU) == "bf16"
    assert capsys.readouterr().err == ""


def test_machine_info_names_the_machine():
    info = hardware.machine_info()
    assert info["cpu"] and info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cores"] >= 1 and info["torch"] == torch.__version__
    assert isinstance(info["bf16_native_cpu"], bool)


# -- Muon -----------------------------------------------------------------------------------------
