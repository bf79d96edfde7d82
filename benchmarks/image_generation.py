"""Built-in shapes, text → image: a model trained from nothing draws scenes from their captions, and a
pixel checker scores what it drew.

    python benchmarks/image_generation.py --out runs/draw --minutes 20

Steps, all through omnigpt's library functions:
1. `synthetic.write_shapes(draw=True)`: scenes of one or two shapes (seed 1) with their captions as
   text→image examples, validation scenes (seed 2); three colour–shape combinations never appear
   in training (HELD_OUT);
2. `finetune.train_on_examples`: a character tokenizer, image codes fitted by k-means (`--palette`
   codes of `--patch`² pixels at `--image-size`²), a decoder with 2-D positions for image codes,
   trained within `--minutes`, with 10% of examples also seen without their prompt;
3. `imagine.imagine` with guidance `--cfg`: `--samples` images for each one-shape prompt (the 12
   trained combinations and the 3 held out) and for TWO_SHAPE_PROMPTS, written to
   DIR/samples/NNNN.png with DIR/samples.jsonl, and scored by `synthetic.score_scene`: right count,
   colours, kinds and left-to-right order;
4. speed: images per second at batch 16, with and without the KV cache.

The last line printed is one JSON object with the settings, times and scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import timed

from omnigpt.config import (
    GenerationOptions,
    ImageTokensConfig,
    ModelConfig,
    TrainConfig,
    load_json,
)
from omnigpt.finetune import train_on_examples
from omnigpt.hardware import machine_info
from omnigpt.imagine import imagine, save_images
from omnigpt.load import load_model
from omnigpt.synthetic import COLOURS, SHAPES, score_scene, write_shapes

HELD_OUT = frozenset({("purple", "triangle"), ("yellow", "square"), ("green", "circle")})
SIZES = (20, 28)  # shapes 20 to 28 pixels across in a 64-pixel scene: 10 to 14 at 32×32
TWO_SHAPE_PROMPTS = [
    ("red", "circle", "blue", "square"),
    ("blue", "triangle", "yellow", "circle"),
    ("green", "square", "red", "triangle"),
    ("yellow", "triangle", "purple", "circle"),
    ("purple", "square", "green", "triangle"),
    ("red", "square", "red", "circle"),
    ("blue", "circle", "green", "triangle"),
    ("yellow", "circle", "blue", "square"),
]


def prompts() -> list[tuple[str, list[tuple[str, str]], str]]:
    """(prompt, shapes asked for left to right, group) for every prompt drawn."""
    out = []
    for colour in COLOURS:
        for kind in SHAPES:
            group = "one_held_out" if (colour, kind) in HELD_OUT else "one"
            out.append((f"a {colour} {kind}", [(colour, kind)], group))
    for c1, k1, c2, k2 in TWO_SHAPE_PROMPTS:
        out.append((f"a {c1} {k1} and a {c2} {k2}", [(c1, k1), (c2, k2)], "two"))
    return out


def images_per_second(
    model, tokenizer, use_cache: bool, batch: int = 16, repeats: int = 2
) -> float:
    opts = GenerationOptions(temperature=1.0, seed=0, num_samples=batch)
    imagine(model, tokenizer, ["a red circle"], opts, use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        imagine(model, tokenizer, ["a red circle"], opts, use_cache=use_cache)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/draw"))
    ap.add_argument("--train-scenes", type=int, default=40000)
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget, wall-clock")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4, help="pixels per side of one image code")
    ap.add_argument("--palette", default="512", help="codes (k-means) or a palette spec")
    ap.add_argument("--decoder", default="6,6,192", help="decoder layers,heads,width")
    ap.add_argument("--no-image-positions", action="store_true", help="no 2-D positions")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=16, help="images drawn per prompt")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skip-training", action="store_true", help="draw with the model already in DIR/run"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}

    run = args.out / "run"
    if args.skip_training:
        result = load_json(run / "summary.json")
    else:
        result = train(args, times)

    model, tokenizer = load_model(run / "best")
    opts = GenerationOptions(
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, num_samples=args.samples
    )
    wanted = prompts()

    def draw_all():
        return imagine(model, tokenizer, [p for p, _, _ in wanted], opts, cfg_scale=args.cfg)

    drawn, times["generate"] = timed(draw_all)
    paths = save_images(drawn, args.out / "samples")
    right: dict[str, list[bool]] = {}
    parts: dict[str, list[dict]] = {}
    with open(args.out / "samples.jsonl", "w") as f:
        for i, (image, path) in enumerate(zip(drawn, paths, strict=True)):
            prompt, shapes, group = wanted[i // args.samples]
            score = score_scene(image, shapes)
            right.setdefault(group, []).append(score["right"])
            parts.setdefault(group, []).append(score)
            line = {
                "prompt": prompt,
                "image": str(path.relative_to(args.out)),
                # what the prompt asked for; the captions name no places, so x and y are open
                "shapes": [{"colour": c, "kind": k, "x": None, "y": None} for c, k in shapes],
                "score": score,
            }
            f.write(json.dumps(line) + "\n")
    accuracy = {g: round(sum(v) / len(v), 4) for g, v in right.items()}
    detail = {
        g: {k: round(sum(s[k] for s in v) / len(v), 4) for k in v[0]} for g, v in parts.items()
    }
    with torch.inference_mode():
        speed = {
            "images_per_s_batch16_cache": round(images_per_second(model, tokenizer, True), 2),
            "images_per_s_batch16_no_cache": round(images_per_second(model, tokenizer, False), 2),
        }
    report = {
        "one_shape_right": accuracy.get("one"),
        "one_shape_held_out_right": accuracy.get("one_held_out"),
        "two_shape_right": accuracy.get("two"),
        "detail": detail,
        "samples": len(drawn),
        "val_loss": result["best_val_loss"],
        "steps": result["steps"],
        "codec": tokenizer.images.describe(),
        "speed": speed,
        "times": times,
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


def train(args: argparse.Namespace, times: dict) -> dict:
    """Writes the data, trains a new model on it in DIR/run; its summary."""

    def write_all():
        common = {"questions": False, "counts": (1, 2), "read": False, "draw": True, "sizes": SIZES}
        train = write_shapes(args.out / "train", args.train_scenes, 1, exclude=HELD_OUT, **common)
        val = write_shapes(args.out / "val", 200, 2, exclude=HELD_OUT, **common)
        return train, val

    (train, _), times["data"] = timed(write_all)
    print(f"data: {times['data']}", flush=True)
    layers, heads, width = (int(v) for v in args.decoder.split(","))
    images = ImageTokensConfig(args.image_size, args.palette, args.patch)
    tokens = (args.image_size // args.patch) ** 2
    shape = ModelConfig(
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        block_size=-(-(tokens + 64) // 64) * 64,  # the longest caption and the image
        image_positions=not args.no_image_positions,
    )
    train_cfg = TrainConfig(
        batch_size=args.batch_size,
        max_steps=1_000_000,
        max_seconds=args.minutes * 60,
        lr=args.lr,
        warmup_steps=200,
        weight_decay=0.05,
        eval_interval=500,
        eval_batches=0,
        precision="auto",
        seed=args.seed,
    )
    result, times["train"] = timed(
        train_on_examples,
        train,
        args.out / "run",
        shape,
        train_cfg,
        images=images,
        progress=False,
        pack=True,
    )
    print(f"training: {result} {times['train']}", flush=True)
    return result.__dict__


if __name__ == "__main__":
    main()
