"""What the benchmark scripts share: timing, a new model to start from, and training in stages
within one wall-clock budget.

result, t = timed(pretrain, ...)                  # t = {"wall_s": ..., "cpu_s": ...}
init = build_init("runs/x", "train.jsonl", "4,4,128", block_size=128, seed=0, vision="small")
results, t = train_in_stages(init, [("1", "one.jsonl", "one-val.jsonl", 180),
                                    ("all", "all.jsonl", "val.jsonl", None)],
                             "runs/x", minutes=20, ...)
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from omnigpt.config import FinetuneConfig, ImageTokensConfig, ModelConfig, TrainConfig
from omnigpt.finetune import finetune, save_new_model


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, *args, **kwargs):
    """fn's result, and the wall and process CPU seconds it took."""
    wall, cpu = time.time(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, {"wall_s": round(time.time() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}


def build_init(
    out: Path,
    train: Path,
    decoder: str,
    block_size: int,
    seed: int,
    images: ImageTokensConfig | None = None,
    **encoders: str,
) -> Path:
    """A model built from nothing for the records in `train`: a decoder of "layers,heads,width", a
    character tokenizer, the encoders named by spec (`vision=`, `audio=`) and, for records that
    draw, image codes as `images` says; saved as out/init."""
    layers, heads, width = (int(v) for v in decoder.split(","))
    shape = ModelConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=block_size)
    save_new_model(train, out / "init", shape, "char", seed=seed, images=images, **encoders)
    return out / "init"


def train_in_stages(
    init: Path,
    stages: list[tuple[str, Path, Path, float | None]],
    out: Path,
    minutes: float,
    batch_size: int,
    lr: float,
    seed: int,
    max_steps: int = 100_000,
    pack: bool = False,
) -> tuple[list, dict]:
    """Full fine-tuning from `init` through (name, train JSONL, val JSONL, seconds) stages, each
    starting from the last one's best checkpoint, in run folders out/run-NAME. A stage with seconds
    None takes what is left of `minutes`; every stage stops when the budget is spent. Returns each
    stage's RunResult and the time all of it took."""

    def run_all():
        budget, start, base, results = minutes * 60, time.time(), init, []
        for name, data, val, seconds in stages:
            left = budget - (time.time() - start)
            cfg = TrainConfig(
                batch_size=batch_size,
                max_steps=max_steps,
                max_seconds=min(seconds or left, left),
                lr=lr,
                warmup_steps=100,
                weight_decay=0.05,
                eval_interval=250,
                eval_batches=0,
                precision="auto",
                seed=seed,
            )
            run = out / f"run-{name}"
            result = finetune(
                base, data, run, FinetuneConfig(pack=pack), cfg, val_data=val, progress=False
            )
            print(f"stage {name}: {result}", flush=True)
            results.append(result)
            base = run / "best"
        return results

    return timed(run_all)
