"""Built-in shapes: caption exact match and question-answering accuracy on a fresh seeded split.

    python benchmarks/shapes.py --out runs/shapes --minutes 15

Steps, all through omnigpt's library functions:
1. `synthetic.write_shapes`: training scenes (seed 1), validation scenes for checkpoint choice
   (seed 2) and test scenes (seed 3), each with its caption and its questions (colour, shape,
   count, which of two shapes is further left), written as PNG files and JSONL;
2. a small model built from nothing (`finetune.new_model`): a ViT image encoder, a decoder and a
   character tokenizer, trained on captions and questions together with `finetune()` within
   `--minutes` of wall-clock time, in two stages: scenes of one shape (seed 11, for
   `--stage1-minutes`), then scenes of one to three;
3. greedy answers on the test scenes from the best checkpoint: caption exact match, and accuracy
   per question kind.

The last line printed is one JSON object with the settings, times and scores.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch

from omnigpt.chat import read_records
from omnigpt.checkpoint import save_checkpoint
from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.evaluate import generate_answers
from omnigpt.finetune import FinetuneConfig, finetune, new_model
from omnigpt.generate import GenerationOptions
from omnigpt.hf import load_model
from omnigpt.synthetic import CAPTION_PROMPT, write_shapes


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def question_kind(prompt: str) -> str:
    if prompt == CAPTION_PROMPT:
        return "caption"
    for kind, start in (
        ("count", "how many"),
        ("colour", "what colour"),
        ("shape", "what shape"),
        ("left", "which is further left"),
    ):
        if prompt.startswith(start):
            return kind
    raise ValueError(f"unknown question {prompt!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/shapes"))
    ap.add_argument("--train-scenes", type=int, default=10000)
    ap.add_argument("--test-scenes", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget, wall-clock")
    ap.add_argument(
        "--stage1-minutes", type=float, default=3.0, help="of the budget, on one-shape scenes"
    )
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--vision", default="small", help="image encoder spec (VisionConfig.from_spec)")
    ap.add_argument("--decoder", default="4,4,128", help="decoder layers,heads,width")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}

    t0, c0 = time.time(), cpu_seconds()
    train = write_shapes(args.out / "train", args.train_scenes, seed=1)
    val = write_shapes(args.out / "val", 200, seed=2)
    train_1 = write_shapes(args.out / "train-1", args.train_scenes // 4, seed=11, counts=(1, 1))
    val_1 = write_shapes(args.out / "val-1", 200, seed=12, counts=(1, 1))
    test = write_shapes(args.out / "test", args.test_scenes, seed=3)
    times["data"] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}
    print(f"data: {times['data']}", flush=True)

    layers, heads, width = (int(v) for v in args.decoder.split(","))
    torch.manual_seed(args.seed)
    model, tokenizer = new_model(
        read_records(train),
        ModelConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=128),
        "char",
        vision=args.vision,
    )
    save_checkpoint(args.out / "init", model, tokenizer)

    # Two stages, as for speech: scenes of one shape first, then scenes of one to three.
    budget = args.minutes * 60
    base, results = args.out / "init", []
    t0, c0 = time.time(), cpu_seconds()
    for name, data, val_data, seconds in (
        ("1", train_1, val_1, args.stage1_minutes * 60),
        ("all", train, val, None),
    ):
        left = budget - (time.time() - t0)
        train_cfg = TrainConfig(
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            max_seconds=min(seconds or left, left),
            lr=args.lr,
            warmup_steps=100,
            weight_decay=0.05,
            eval_interval=250,
            eval_batches=0,
            precision="bf16",
            seed=args.seed,
        )
        run = args.out / f"run-{name}"
        result = finetune(
            base, data, run, FinetuneConfig(pack=True), train_cfg, val_data=val_data, progress=False
        )
        print(f"stage {name}: {result}", flush=True)
        results.append(result)
        base = run / "best"
    times["train"] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}
    print(f"training: {times['train']}", flush=True)

    model, tokenizer = load_model(run / "best")
    model.eval()
    records = read_records(test)
    t0 = time.time()
    answers = generate_answers(
        model,
        tokenizer,
        records,
        GenerationOptions(temperature=0, max_new_tokens=60),
        batch_size=64,
        progress=False,
        base_dir=test.parent,
    )
    times["eval"] = {"wall_s": round(time.time() - t0, 1)}
    right, total = defaultdict(int), defaultdict(int)
    for record, answer in zip(records, answers, strict=True):
        kind = question_kind(record["prompt"])
        total[kind] += 1
        right[kind] += answer == record["completion"]
    accuracy = {k: round(right[k] / total[k], 4) for k in total}
    core = ("colour", "shape", "count")
    report = {
        "caption_exact_match": accuracy.pop("caption"),
        "answer_accuracy": accuracy,
        "colour_shape_count_accuracy": round(
            sum(right[k] for k in core) / sum(total[k] for k in core), 4
        ),
        "test_examples": dict(total),
        "steps": [r.steps for r in results],
        "times": times,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
