"""int8 weights: close to fp32 on a trained tiny model, saved and loaded exactly, on every command."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CORPUS

from omnigpt.checkpoint import load_checkpoint, save_checkpoint
from omnigpt.cli import main
from omnigpt.config import LoRAConfig
from omnigpt.errors import OmnigptError
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.load import load_model
from omnigpt.lora import add_lora
from omnigpt.quantize import Int8Linear, quantization_of, quantize, quantize_int8


def test_weights_round_to_within_half_a_step_of_their_channel(code_model):
    model, _ = code_model
    layer = model.h[0].mlp.c_fc
    q = Int8Linear.from_weight(layer.weight, layer.bias)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    error = (q.dequantized() - layer.weight).abs()
    assert (error <= q.scale[:, None] / 2 + 1e-7).all()  # per output channel: max |w| / 127 steps
    assert torch.equal(q.bias, layer.bias)


def test_a_rows_int8_result_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    layer = Int8Linear.from_weight(torch.randn(64, 32) * 0.1, torch.randn(64))
    x = torch.randn(1, 32)
    crowd = torch.cat([x, 100 * torch.randn(1, 32), 0.01 * torch.randn(3, 32)])
    assert torch.equal(layer(x)[0], layer(crowd)[0])  # the kernel's one range would differ
    exact = x @ layer.dequantized().t() + layer.bias
    assert (layer(x) - exact).abs().max() <= 0.02 * exact.abs().max()


def test_int8_logits_stay_close_to_fp32(code_model):
    model, tok = code_model
    quantized = quantize_int8(copy.deepcopy(model))
    assert isinstance(quantized.lm_head, Int8Linear) and isinstance(
        quantized.h[1].attn.c_proj, Int8Linear
    )
    assert quantized.lm_head.weight.data_ptr() != quantized.wte.weight.data_ptr()
    x = torch.tensor([tok.encode(CORPUS[:64]), tok.encode(CORPUS[100:164])])
    with torch.no_grad():
        full, small = model(x)[0], quantized(x)[0]
    # stated tolerance: every logit within 5% of the largest, the top token the same at ≥ 95%
    assert (full - small).abs().max() <= 0.05 * full.abs().max()
    assert (full.argmax(-1) == small.argmax(-1)).float().mean() >= 0.95
    y = torch.tensor([tok.encode(CORPUS[1:65]), tok.encode(CORPUS[101:165])])
    assert abs(quantized(x, y)[1] - model(x, y)[1]) <= 0.02 * model(x, y)[1] + 0.01


def test_a_saved_int8_model_loads_with_identical_logits(tmp_path, code_model, capsys):
    model, tok = code_model
    quantized = quantize_int8(copy.deepcopy(model))
    save_checkpoint(tmp_path / "int8", quantized, tok)
    again, _ = load_checkpoint(tmp_path / "int8")
    assert quantization_of(again) == "int8"
    x = torch.tensor([tok.encode(CORPUS[:50])])
    with torch.no_grad():
        assert torch.equal(again(x)[0], quantized(x)[0])
    opts = GenerationOptions(max_new_tokens=20, temperature=0)
    assert generate_tokens(again, x.tolist(), opts) == generate_tokens(quantized, x.tolist(), opts)
    # the CLI: a saved int8 model, and an fp32 one quantized as it loads, generate alike
    save_checkpoint(tmp_path / "fp32", model, tok)
    for args in (["--model", str(tmp_path / "int8")], ["--model", str(tmp_path / "fp32"), "--quantize", "int8"]):  # fmt: skip
        assert (
            main(["generate", *args, "def ", "--temperature", "0", "--max-new-tokens", "12"]) == 0
        )
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second and len(first) > 4


def test_lora_is_merged_and_bf16_needs_native_hardware(tmp_path, code_model, fake_cpu):
    model, tok = code_model
    tuned = copy.deepcopy(model)
    add_lora(tuned, LoRAConfig(rank=2))
    with pytest.raises(OmnigptError, match="merge the LoRA adapters"):
        quantize_int8(tuned)
    save_checkpoint(tmp_path / "plain", model, tok)
    loaded, _ = load_model(tmp_path / "plain", quantization="int8")
    assert quantization_of(loaded) == "int8"
    fake_cpu("AVX2", bf16_faster=False)
    with pytest.raises(OmnigptError, match="natively"):
        quantize(copy.deepcopy(model), "bf16")
    fake_cpu("AVX512", amx=True)
    half = quantize(copy.deepcopy(model), "bf16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    x = torch.tensor([tok.encode(CORPUS[:40])])
    with torch.no_grad():
        assert (half(x)[0].float().argmax(-1) == model(x)[0].argmax(-1)).float().mean() >= 0.95


def test_an_int8_model_serves(code_model):
    import threading

    from omnigpt.engine import Engine, Finished, Piece, Request

    model, tok = code_model
    quantized = quantize_int8(copy.deepcopy(model))
    prompts = [tok.encode("def add"), tok.encode("class")]
    opts = GenerationOptions(max_new_tokens=16, temperature=0, stop_at_eot=False)
    engine = Engine(quantized, tok, max_running=2)
    got, done = {0: [], 1: []}, threading.Semaphore(0)

    def on(i):
        def event(e):
            if isinstance(e, Piece):
                got[i] += e.tokens
            elif isinstance(e, Finished):
                done.release()

        return event

    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, opts), on(i))
        assert done.acquire(timeout=20) and done.acquire(timeout=20)
    finally:
        engine.close()
    assert [got[0], got[1]] == [generate_tokens(quantized, [p], opts)[0] for p in prompts]
