"""What must also hold on CUDA (bf16 autocast, compiled training, the serving engine, int8 weight-only,
speculative decoding). Skipped without a CUDA device; run by benchmarks/gpu_check.sh."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import tiny_model

from omnigpt.config import GenerationOptions, TrainConfig
from omnigpt.generate import generate_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
CUDA = torch.device("cuda")


def test_compiled_bf16_training_steps_learn_a_batch():
    from omnigpt.train import Dist, build_optimizers, train_step

    torch.manual_seed(0)
    model = tiny_model(128, block_size=64, n_layer=2, n_head=2, n_embd=64).train().to(CUDA)
    cfg = TrainConfig(batch_size=8, optimizer="adamw", lr=3e-3, compile=True, precision="bf16")
    optimizers = build_optimizers(model, cfg, CUDA)
    data = torch.randint(0, 128, (8, 65), device=CUDA)
    micro = [(data[:, :-1], data[:, 1:])]
    dist_info = Dist(device=CUDA)
    train_model = torch.compile(model)
    losses = [
        train_step(model, train_model, optimizers, micro, cfg, "bf16", dist_info).mean_loss(
            dist_info
        )
        for _ in range(30)
    ]
    assert losses[-1] < 0.5 * losses[0]


def test_engine_and_speculative_decoding_match_generate_on_cuda(code_model):
    from omnigpt.engine import Engine, Finished, Piece, Request
    from omnigpt.speculative import speculative_tokens

    model, tok = code_model
    model = copy.deepcopy(model).to(CUDA)
    prompts = [tok.encode("def add"), tok.encode("class P"), tok.encode("x")]
    opts = GenerationOptions(max_new_tokens=20, temperature=0, stop_at_eot=False)
    alone = [generate_tokens(model, [p], opts)[0] for p in prompts]
    got, done = {i: [] for i in range(3)}, threading.Semaphore(0)
    engine = Engine(model, tok, max_running=2)
    try:
        for i, p in enumerate(prompts):

            def on(event, i=i):
                if isinstance(event, Piece):
                    got[i] += event.tokens
                elif isinstance(event, Finished):
                    done.release()

            engine.submit(Request(p, opts), on)
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    assert [got[i] for i in range(3)] == alone
    new, _ = speculative_tokens(model, model, prompts, opts, 3)
    assert new == alone


def test_int8_weight_only_on_cuda_is_close_to_fp32(code_model):
    from omnigpt.quantize import quantize_int8

    model, tok = code_model
    full = copy.deepcopy(model).to(CUDA)
    small = quantize_int8(copy.deepcopy(model)).to(CUDA)
    x = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")], device=CUDA)
    with torch.no_grad():
        a, b = full(x)[0], small(x)[0]
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
