"""A GPT-2 124M-shape model saved by `transformers`: load time and generation speed, omnigpt against
`transformers` on the same weights, in the same run.

    python benchmarks/hf_interop.py [--repeats 3] [--new-tokens 128]

The model has random weights (saved once with `save_pretrained` into a temporary folder). Load time:
from the folder to a model ready to generate (tokenizer excluded), median of `--repeats` loads after a
warm-up load, so both read from the page cache. Generation: a 32-token prompt, greedy, batch 1,
exactly `--new-tokens` new tokens, median of `--repeats`; the two token sequences must be identical.
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.hardware import machine_info
from omnigpt.hf import load_hf
from omnigpt.tokenizer import Tokenizer


def median_time(fn, repeats: int):
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
        # load_hf wants a tokenizer; it is not part of the timed loads below
        Tokenizer.train_char(["placeholder"]).save(folder)

        def load_ours():
            model, _ = load_hf(folder)
            return model

        def load_theirs():
            return GPT2LMHeadModel.from_pretrained(folder).eval()

        ours_load, ours = median_time(load_ours, args.repeats)
        theirs_load, theirs = median_time(load_theirs, args.repeats)
        print(f"load: omnigpt {ours_load:.2f}s   transformers {theirs_load:.2f}s", flush=True)

    prompt = torch.randint(0, 50257, (1, 32))
    opts = GenerationOptions(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)
    ours_gen, ours_tokens = median_time(
        lambda: generate_tokens(ours, prompt.tolist(), opts)[0], args.repeats
    )

    def generate_theirs():
        with torch.inference_mode():
            out = theirs.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        return out[0, 32:].tolist()

    theirs_gen, theirs_tokens = median_time(generate_theirs, args.repeats)
    same = ours_tokens == theirs_tokens
    print(
        f"generate (batch 1): omnigpt {args.new_tokens / ours_gen:.1f} tokens/s   "
        f"transformers {args.new_tokens / theirs_gen:.1f} tokens/s   identical tokens: {same}"
    )
    print(
        json.dumps(
            {
                "omnigpt_load_s": round(ours_load, 3),
                "transformers_load_s": round(theirs_load, 3),
                "omnigpt_tokens_per_s": round(args.new_tokens / ours_gen, 2),
                "transformers_tokens_per_s": round(args.new_tokens / theirs_gen, 2),
                "identical_greedy_tokens": same,
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
