"""Tiny Shakespeare, character level: the val loss reached in a fixed wall-clock training budget.

    python benchmarks/shakespeare_char.py --data ../shared/data/tinyshakespeare/input.txt --seconds 90

Train split: the first 90% of the characters; val: the last 10%. The defaults are the recipe in
benchmarks/RESULTS.md, which follows the machine (`RECIPES` below): where bf16 matmuls are native
(AMX / AVX-512 BF16), bf16 autocast (attention stays in fp32), 4 layers × 128 wide, context 128,
batch 32; elsewhere fp32, 4 layers × 96 wide, context 64, batch 16. Both: Muon for the weight
matrices, AdamW for the rest, no dropout. Each can be changed on the command line (`--help`).

The budget covers the whole training loop (model build excluded, every optimizer step included);
the val loss is then measured over every character of the val split. The last line printed is one
JSON object with the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.data import RandomWindows, sequential_windows
from omnigpt.hardware import machine_info, resolve_precision
from omnigpt.model import GPT
from omnigpt.tokenizer import Tokenizer
from omnigpt.train import fit, padded_vocab, setup_distributed

# The recipe's shape follows what the machine computes fast (measured in benchmarks/RESULTS.md §1).
# Where bf16 is native (AMX, AVX-512 BF16), steps of 32 × 128 tokens on a 128-wide model are cheap;
# in fp32 a step costs about twice as much, and a narrower model taking more, smaller steps learns
# more in the same time. Flags given on the command line override these.
RECIPES = {
    "bf16": dict(n_embd=128, batch_size=32, block_size=128),
    "fp32": dict(n_embd=96, batch_size=16, block_size=64),
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="path to tinyshakespeare input.txt")
    p.add_argument("--seconds", type=float, default=90.0, help="training wall-clock budget")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, help="width (default: the machine's recipe)")
    p.add_argument("--block-size", type=int, help="context (default: the machine's recipe)")
    p.add_argument("--batch-size", type=int, help="batch (default: the machine's recipe)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="muon")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--muon-lr", type=float, default=0.015)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--pos-encoding", choices=["learned", "sinusoidal", "rope"], default="learned")
    p.add_argument("--mlp", choices=["gelu", "swiglu"], default="gelu")
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"], default="layernorm")
    p.add_argument("--no-bias", action="store_true", help="drop biases from Linear and LayerNorm")
    p.add_argument("--untie", action="store_true", help="separate LM head from the token embedding")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast where bf16 matmuls are native (AMX, AVX-512 BF16, CUDA), else fp32",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    for name, value in RECIPES[precision].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    text = Path(args.data).read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    tokenizer = Tokenizer.train_char([text[:split]])
    train_tokens = np.asarray(tokenizer.encode(text[:split]), dtype=np.uint16)
    val_tokens = np.asarray(tokenizer.encode(text[split:]), dtype=np.uint16)
    assert len(val_tokens) == len(text) - split, "every val character must be one token"

    torch.manual_seed(args.seed)
    model_cfg = ModelConfig(
        vocab_size=padded_vocab(tokenizer.vocab_size),
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        pos_encoding=args.pos_encoding,
        mlp=args.mlp,
        norm=args.norm,
        bias=not args.no_bias,
        tie_embeddings=not args.untie,
        dropout=args.dropout,
    )
    train_cfg = TrainConfig(
        batch_size=args.batch_size,
        max_steps=10**9,
        max_seconds=args.seconds,
        optimizer=args.optimizer,
        lr=args.lr,
        muon_lr=args.muon_lr,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        precision=args.precision,
        eval_interval=10**9,
        eval_batches=0,
        log_interval=50,
        seed=args.seed,
    )
    model = GPT(model_cfg)
    print(model.describe())
    batches = RandomWindows(train_tokens, args.block_size, args.batch_size, args.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.time()
        result = fit(
            model,
            tokenizer,
            batches,
            functools.partial(sequential_windows, val_tokens, args.block_size, args.batch_size),
            train_cfg,
            run_dir,
            setup_distributed("cpu"),
            progress=False,
        )
        total = time.time() - t0
    print(
        json.dumps(
            {
                "val_loss": round(result.final_val_loss, 4),
                "tokens_per_s": round(result.tokens / result.seconds),
                "seconds": round(result.seconds, 1),
                "steps": result.steps,
                "tokens": result.tokens,
                "params": model.num_params(),
                "precision": result.precision,
                "recipe": precision,
                "wall_seconds_with_eval": round(total, 1),
                "machine": machine_info(),
                "config": {k: v for k, v in vars(args).items() if k not in ("data",)},
            }
        )
    )


if __name__ == "__main__":
    main()
