"""Generation speed: omnigpt against Hugging Face `transformers` on a GPT-2 124M-shape model: fp32,
and omnigpt with int8 weights (and bf16 weights where bf16 is native).

    python benchmarks/generation_speed.py [--batch-sizes 1 16] [--new-tokens 128] [--repeats 3]

Both models have random weights (the work per token does not depend on their values); a prompt of
32 random tokens per sequence, greedy decoding of exactly `--new-tokens` tokens, timed end to end
(prefill included), median of `--repeats` runs after one warm-up. The same run also measures the
machine's memory read bandwidth, to show how close batch 1 comes to the bound that reading every
weight once per token sets (for int8: the int8 matrices and their scales). The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from omnigpt.config import ModelConfig
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.hardware import bf16_native, machine_info
from omnigpt.model import GPT
from omnigpt.quantize import Int8Linear, quantize

VOCAB = 50257


def read_bandwidth_gb_s(megabytes: int = 1024, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of a matrix-vector product over a matrix far larger than the caches."""
    w = torch.randn(megabytes * 2**20 // 4 // 768, 768)
    v = torch.randn(768)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        w @ v
        best = min(best, time.perf_counter() - t)
    return w.numel() * 4 / best / 1e9


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true", help="time omnigpt alone")
    args = p.parse_args()

    torch.manual_seed(0)
    ours = GPT(ModelConfig.from_preset("gpt2", vocab_size=VOCAB)).eval()
    # what a token reads: every weight once (the tied LM head is the embedding, read once), in fp32;
    # int8: the int8 matrices and their scales (the embedding is a lookup of one row)
    variants = {"omnigpt": (ours, ours.num_params() * 4)}
    quantized = quantize(copy.deepcopy(ours), "int8")
    int8_bytes = sum(
        m.weight.numel() + 4 * m.scale.numel()
        for m in quantized.modules()
        if isinstance(m, Int8Linear)
    )
    variants["omnigpt_int8"] = (quantized, int8_bytes)
    if bf16_native(torch.device("cpu")):
        variants["omnigpt_bf16"] = (quantize(copy.deepcopy(ours), "bf16"), ours.num_params() * 2)
    hf = None
    if not args.skip_transformers:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB)).eval()

    opts = GenerationOptions(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)
    results: dict[str, float] = {}
    for batch in args.batch_sizes:
        prompts = torch.randint(0, VOCAB, (batch, args.prompt_tokens))
        n_new = batch * args.new_tokens
        line = f"batch {batch:>3}:"
        for name, (model, _) in variants.items():

            def run_ours(prompts=prompts, model=model) -> None:
                out = generate_tokens(model, prompts.tolist(), opts)
                assert all(len(o) == args.new_tokens for o in out)

            results[f"{name}_batch{batch}_tokens_per_s"] = n_new / timed(run_ours, args.repeats)
            line += f"  {name} {results[f'{name}_batch{batch}_tokens_per_s']:7.1f}"
        if hf is not None:

            def run_hf(prompts=prompts) -> None:
                with torch.inference_mode():
                    out = hf.generate(
                        prompts,
                        attention_mask=torch.ones_like(prompts),
                        do_sample=False,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        pad_token_id=0,
                    )
                assert out.shape[1] == args.prompt_tokens + args.new_tokens

            theirs = n_new / timed(run_hf, args.repeats)
            results[f"transformers_batch{batch}_tokens_per_s"] = theirs
            line += f"  transformers {theirs:7.1f}  (tokens/s)"
            for name in variants:
                ratio = results[f"{name}_batch{batch}_tokens_per_s"] / theirs
                results[f"{name}_batch{batch}_vs_transformers"] = ratio
        print(line, flush=True)

    bandwidth = read_bandwidth_gb_s()
    results.update(read_bandwidth_gb_s=bandwidth, machine=machine_info())
    if 1 in args.batch_sizes:
        for name, (_, weight_bytes) in variants.items():
            bound = bandwidth * 1e9 / weight_bytes
            achieved = results[f"{name}_batch1_tokens_per_s"]
            results[f"{name}_weights_mb"] = weight_bytes / 1e6
            results[f"{name}_batch1_bound_tokens_per_s"] = bound
            results[f"{name}_batch1_fraction_of_bound"] = achieved / bound
            print(
                f"{name} batch 1: {weight_bytes / 1e6:.0f} MB read per token at {bandwidth:.1f} GB/s "
                f"→ bound {bound:.1f} tokens/s; reaches {achieved / bound:.0%} of it"
            )
        if hf is not None:
            hf_bound = bandwidth * 1e9 / (ours.num_params() * 4)
            results["transformers_batch1_fraction_of_bound"] = (
                results["transformers_batch1_tokens_per_s"] / hf_bound
            )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
