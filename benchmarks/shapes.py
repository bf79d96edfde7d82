"""Built-in shapes: caption exact match and question-answering accuracy on a fresh seeded split.

    python benchmarks/shapes.py --out runs/shapes --minutes 60

Steps, all through omnigpt's library functions:
1. `synthetic.write_shapes`: training scenes (seed 1), validation scenes for checkpoint choice
   (seed 2) and test scenes (seed 3), each with its caption and its questions (colour, shape,
   count, which of two shapes is further left), written as PNG files and JSONL;
2. a small model built from nothing (`finetune.new_model`): a ViT image encoder with a
   convolutional stem, a decoder and a character tokenizer, trained on captions and questions
   together with `finetune()` within `--minutes` of wall-clock time, in two stages: scenes of one
   shape (seed 11, for `--stage1-minutes`), then scenes of one to three;
3. greedy answers on the test scenes from the best checkpoint: caption exact match, and accuracy
   per question kind.

With `--draw`, every training scene also gives a text→image example (its caption → the scene, as
4×4-pixel patch codes at 32×32), so one model learns to read and to write: its caption and answer
scores, set beside those of a run without `--draw`, show what drawing costs reading.

The last line printed is one JSON object with the settings, times and scores.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from common import build_init, timed, train_in_stages

from omnigpt.config import ImageTokensConfig
from omnigpt.evaluate import generate_answers
from omnigpt.examples import read_records
from omnigpt.generate import GenerationOptions
from omnigpt.hardware import machine_info, pick_device
from omnigpt.imagine import imagine, save_images
from omnigpt.load import load_model
from omnigpt.synthetic import CAPTION_PROMPT, COLOURS, SHAPES, score_scene, write_shapes


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
    ap.add_argument("--train-scenes", type=int, default=40000)
    ap.add_argument("--test-scenes", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=60.0, help="training budget, wall-clock")
    ap.add_argument(
        "--stage1-minutes", type=float, default=5.0, help="of the budget, on one-shape scenes"
    )
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument(
        "--vision", default="small,stem=conv", help="image encoder spec (VisionConfig.from_spec)"
    )
    ap.add_argument("--decoder", default="4,4,128", help="decoder layers,heads,width")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--draw", action="store_true", help="also train text→image on every training scene"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}

    def write_all():
        draw = args.draw
        return [
            write_shapes(args.out / "train", args.train_scenes, seed=1, draw=draw),
            write_shapes(args.out / "val", 200, seed=2),
            write_shapes(
                args.out / "train-1", args.train_scenes // 4, seed=11, counts=(1, 1), draw=draw
            ),
            write_shapes(args.out / "val-1", 200, seed=12, counts=(1, 1)),
            write_shapes(args.out / "test", args.test_scenes, seed=3),
        ]

    (train, val, train_1, val_1, test), times["data"] = timed(write_all)
    print(f"data: {times['data']}", flush=True)

    images = ImageTokensConfig(image_size=32, palette="512", patch=4) if args.draw else None
    init = build_init(
        args.out,
        train,
        args.decoder,
        block_size=192 if args.draw else 128,  # 64 image codes and a caption
        seed=args.seed,
        images=images,
        vision=args.vision,
    )

    # Two stages, as for speech: scenes of one shape first, then scenes of one to three.
    stages = [("1", train_1, val_1, args.stage1_minutes * 60), ("all", train, val, None)]
    results, times["train"] = train_in_stages(
        init,
        stages,
        args.out,
        args.minutes,
        args.batch_size,
        args.lr,
        args.seed,
        args.max_steps,
        pack=True,
    )
    print(f"training: {times['train']}", flush=True)

    device = pick_device()  # where `finetune` trained: the GPU if there is one
    model, tokenizer = load_model(args.out / "run-all" / "best")
    model.to(device).eval()
    records = read_records(test)
    answers, times["eval"] = timed(
        generate_answers,
        model,
        tokenizer,
        records,
        GenerationOptions(temperature=0, max_new_tokens=60),
        batch_size=64,
        progress=False,
        base_dir=test.parent,
    )
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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    if args.draw:  # the same model draws: one-shape prompts, scored by the pixel checker
        wanted = [(c, k) for c in COLOURS for k in SHAPES]
        opts = GenerationOptions(temperature=1.0, seed=args.seed, num_samples=8)
        prompts = [f"a {c} {k}" for c, k in wanted]
        drawn, times["draw"] = timed(imagine, model, tokenizer, prompts, opts, 3.0)
        save_images(drawn, args.out / "drawn")
        right = [score_scene(im, [wanted[i // 8]])["right"] for i, im in enumerate(drawn)]
        report["one_shape_drawn_right"] = round(sum(right) / len(right), 4)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
