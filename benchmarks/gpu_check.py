"""The prepared GPU check: one short run that says what omnigpt does on this GPU (under 5 minutes).

    bash benchmarks/gpu_check.sh          # installs the project, runs this, then the GPU-marked tests
    python benchmarks/gpu_check.py        # this part alone; on a machine without CUDA: the CPU path

1. Training: GPT-2 124M (the `gpt2` preset, vocabulary 50,304, context 1,024) on random tokens,
   bf16 autocast, attention through SDPA (flash kernels on CUDA), fused AdamW, `torch.compile`,
   omnigpt's own `build_optimizers` and `train_step`; `--steps` timed after `--warmup` steps (the
   compilation). Prints tokens/s and model FLOPs utilisation: 6·N + 12·L·C·T FLOPs per token
   (`GPT.flops_per_token`) against the GPU's dense bf16 peak from the table below.
2. Decoding: `generate_tokens` at batch 1 and 16, 32-token prompts, 128 new tokens, greedy, in fp32
   and with bf16 weights.

Without CUDA it runs the same code on the CPU with the `micro` shape and a few steps (no MFU: no
peak to divide by), so the script can be checked before GPU time is spent on it. The last line
printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from omnigpt.config import GenerationOptions, ModelConfig, TrainConfig
from omnigpt.generate import generate_tokens
from omnigpt.hardware import machine_info
from omnigpt.model import GPT
from omnigpt.parallel import parallelize
from omnigpt.quantize import quantize
from omnigpt.train import Dist, build_optimizers, train_step

# dense bf16 tensor-core peaks, TFLOPS (vendor data sheets; SXM parts where there are two)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def train_speed(model: GPT, device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    cfg = TrainConfig(batch_size=batch, optimizer="adamw", lr=3e-4, compile=True, precision="bf16")
    dist_info = Dist(device=device)
    train_model = parallelize(model, cfg, dist_info, "bf16")  # compiled, as `fit` does it
    optimizers = build_optimizers(model, cfg, device)
    T, V = model.config.block_size, model.config.vocab_size
    data = torch.randint(0, V, (batch, T + 1), device=device)
    micro = [(data[:, :-1], data[:, 1:])]
    losses = []
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        stats = train_step(model, train_model, optimizers, micro, cfg, "bf16", dist_info)
        losses.append(stats.mean_loss(dist_info))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = steps * batch * T / seconds
    return {
        "batch": batch,
        "context": T,
        "steps_timed": steps,
        "tokens_per_s": round(tokens_per_s),
        "flops_per_token": model.flops_per_token(T),
        "achieved_tflops": round(tokens_per_s * model.flops_per_token(T) / 1e12, 2),
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
    }


def decode_speed(model: GPT, device: torch.device, new_tokens: int) -> dict:
    out = {}
    opts = GenerationOptions(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)
    for batch in (1, 16):
        prompts = torch.randint(0, model.config.vocab_size, (batch, 32)).tolist()
        generate_tokens(model, prompts, GenerationOptions(max_new_tokens=4, temperature=0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate_tokens(model, prompts, opts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"batch{batch}_tokens_per_s"] = round(
            batch * new_tokens / (time.perf_counter() - start), 1
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (GPU 30, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (GPU 5, CPU 1)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="sequences per step (GPU 16, CPU 4)"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (GPU 128, CPU 16)")
    args = p.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    report: dict = {"machine": machine_info()}
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(0)
        report["gpu"] = {"name": name, "capability": list(torch.cuda.get_device_capability(0))}
        shape = ModelConfig.from_preset("gpt2", vocab_size=50304)
    else:
        print("no CUDA device: the CPU path, with the micro shape (checks the script, no MFU)")
        name, shape = None, ModelConfig.from_preset("micro", vocab_size=4096)
    steps = args.steps or (30 if gpu else 3)
    warmup = args.warmup or (5 if gpu else 1)
    batch = args.batch_size or (16 if gpu else 4)
    new_tokens = args.new_tokens or (128 if gpu else 16)

    torch.manual_seed(0)
    model = GPT(shape).to(device)
    print(model.describe(), flush=True)
    training = train_speed(model, device, batch, steps, warmup)
    peak = peak_tflops(name) if name else None
    if peak:
        training["peak_tflops"] = peak
        training["mfu"] = round(training["achieved_tflops"] / peak, 4)
    report["training"] = training
    print(json.dumps({"training": training}), flush=True)

    model.eval()
    decoding = {"fp32": decode_speed(model, device, new_tokens)}
    try:
        decoding["bf16_weights"] = decode_speed(
            quantize(copy.deepcopy(model), "bf16"), device, new_tokens
        )
    except Exception as e:  # bf16 not native here: say so, go on
        decoding["bf16_weights"] = f"skipped: {e}"
    report["decoding"] = decoding
    print(json.dumps({"decoding": decoding}), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
