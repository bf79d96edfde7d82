"""Handwritten digits: next-pixel likelihood (bits per pixel) and guided drawing of a named digit.

    python benchmarks/image_digits.py --out runs/digits --minutes 6

The data is scikit-learn's `load_digits` (inside the scikit-learn wheel, no download): 1,797 images of
8×8 pixels in 17 grey levels. Split: the first 1,000 train, the next 350 validation (checkpoint
choice), the last 447 test. Steps, all through omnigpt's library functions:
1. every image written as a PNG with the exact 17-level grey palette (`pixels.ImageCodec.exact`), so
   image → codes → image is lossless; text→image examples "a handwritten 3" → the image;
2. a decoder trained from nothing (`finetune.save_new_model` + `finetune`), 10% of examples also
   without their prompt, the best validation checkpoint kept;
3. bits per pixel on the test split: the mean negative log2-likelihood of each of the 64 pixel codes,
   given "a handwritten D" (class-conditional) and given no prompt (unconditional);
4. `--per-digit` samples of each digit drawn with guidance `--cfg`, labelled by a logistic regression
   fitted on the real training images: the share labelled as the digit asked for, and the share
   that are exact copies of a training image.

The last line printed is one JSON object with the settings, times and scores.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from common import timed
from PIL import Image

from omnigpt.config import (
    FinetuneConfig,
    GenerationOptions,
    ImageTokensConfig,
    ModelConfig,
    TrainConfig,
    load_json,
)
from omnigpt.finetune import finetune, save_new_model
from omnigpt.hardware import machine_info
from omnigpt.imagine import imagine, save_images
from omnigpt.load import load_model
from omnigpt.template import render
from omnigpt.tokenizer import IGNORE_INDEX

SPLITS = {"train": (0, 1000), "val": (1000, 1350), "test": (1350, 1797)}
GREYS = [[round(v * 255 / 16)] * 3 for v in range(17)]  # grey level v of 0..16; ink is dark


def prompt(digit: int) -> str:
    return f"a handwritten {digit}"


def write_split(out: Path, name: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """8×8 PNGs (ink dark on white) and a JSONL of text→image examples."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        grey = np.asarray(GREYS, dtype=np.uint8)[16 - pixels.astype(int)]
        Image.fromarray(grey).save(folder / f"{i:04d}.png")
        lines.append(json.dumps({"prompt": prompt(int(label)), "image_out": f"{name}/{i:04d}.png"}))
    path = out / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.inference_mode()
def bits_per_pixel(model, tokenizer, records: list[dict], batch: int = 64) -> float:
    """Mean -log2 p(code) over every pixel code of the records' images (the end token left out)."""
    total, count = 0.0, 0
    codes = tokenizer.code_ids
    for i in range(0, len(records), batch):
        rendered = [render(tokenizer, r) for r in records[i : i + batch]]
        T = max(len(r.ids) for r in rendered)
        x = torch.zeros(len(rendered), T - 1, dtype=torch.long)
        y = torch.full((len(rendered), T - 1), IGNORE_INDEX)
        for row, r in enumerate(rendered):
            x[row, : len(r.ids) - 1] = torch.tensor(r.ids[:-1])
            y[row, : len(r.ids) - 1] = torch.tensor(r.labels[1:])
        logits, _ = model(x)
        keep = (y >= codes.start) & (y < codes.stop)
        log_probs = logits[keep].float().log_softmax(-1)
        total -= log_probs.gather(1, y[keep][:, None]).sum().item()
        count += int(keep.sum())
    return total / count / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/digits"))
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget, wall-clock")
    ap.add_argument("--decoder", default="4,4,128", help="decoder layers,heads,width")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--no-image-positions", action="store_true", help="no 2-D positions")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--per-digit", type=int, default=50, help="guided samples drawn per digit")
    ap.add_argument("--cfg", type=float, default=2.0, help="guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skip-training", action="store_true", help="score the model already in DIR/run"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    data = {name: (digits.images[a:b], digits.target[a:b]) for name, (a, b) in SPLITS.items()}
    paths = {name: write_split(args.out, name, *data[name]) for name in SPLITS}
    palette = args.out / "greys.json"
    palette.write_text(json.dumps(GREYS))

    layers, heads, width = (int(v) for v in args.decoder.split(","))
    shape = ModelConfig(
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        block_size=96,
        dropout=args.dropout,
        image_positions=not args.no_image_positions,
    )
    images = ImageTokensConfig(image_size=8, palette=str(palette), patch=1)
    init = args.out / "init"
    if not args.skip_training:
        save_new_model(paths["train"], init, shape, "char", seed=args.seed, images=images)
    train_cfg = TrainConfig(
        batch_size=args.batch_size,
        max_steps=1_000_000,
        max_seconds=args.minutes * 60,
        lr=args.lr,
        warmup_steps=100,
        weight_decay=args.weight_decay,
        eval_interval=100,
        eval_batches=0,
        precision="auto",
        seed=args.seed,
    )
    run = args.out / "run"
    if args.skip_training:
        result, train_time = load_json(run / "summary.json"), None
    else:
        result, train_time = timed(
            finetune,
            init,
            paths["train"],
            run,
            FinetuneConfig(drop_condition=0.1),
            train_cfg,
            val_data=paths["val"],
            progress=False,
        )
        print(f"training: {result} {train_time}", flush=True)
        result = result.__dict__

    model, tokenizer = load_model(run / "best")
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    for r in test:
        r["image_out"] = str(args.out / r["image_out"])
    conditional = bits_per_pixel(model, tokenizer, test)
    unconditional = bits_per_pixel(model, tokenizer, [{**r, "prompt": ""} for r in test])

    train_x = data["train"][0].reshape(-1, 64) / 16.0
    classifier = LogisticRegression(max_iter=2000).fit(train_x, data["train"][1])
    test_accuracy = classifier.score(data["test"][0].reshape(-1, 64) / 16.0, data["test"][1])
    opts = GenerationOptions(temperature=1.0, seed=args.seed, num_samples=args.per_digit)
    drawn, draw_time = timed(
        imagine, model, tokenizer, [prompt(d) for d in range(10)], opts, args.cfg
    )
    save_images(drawn, args.out / "samples", scale=6)
    levels = np.stack([16 - np.rint(np.asarray(im, float)[:, :, 0] * 16 / 255) for im in drawn])
    asked = np.repeat(np.arange(10), args.per_digit)
    labelled = classifier.predict(levels.reshape(-1, 64) / 16.0)
    train_set = {tuple(x.astype(int).ravel()) for x in data["train"][0]}
    copies = sum(tuple(x.astype(int).ravel()) in train_set for x in levels)
    report = {
        "test_bits_per_pixel_conditional": round(conditional, 4),
        "test_bits_per_pixel_unconditional": round(unconditional, 4),
        "guided_samples_labelled_as_asked": round(float((labelled == asked).mean()), 4),
        "guided_samples_copying_training": round(copies / len(drawn), 4),
        "classifier_test_accuracy": round(float(test_accuracy), 4),
        "samples": len(drawn),
        "best_val_loss": result["best_val_loss"],
        "steps": result["steps"],
        "times": {"train": train_time, "draw": draw_time},
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
