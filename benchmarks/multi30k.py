"""Multi30k English→German: pretrain a small GPT on the training text, fine-tune it on the pairs, and
report sacreBLEU on the val split, for full fine-tuning and for LoRA.

    python benchmarks/multi30k.py --data ../shared/data/multi30k --out runs/multi30k

Steps, all through omnigpt's library functions:
1. a byte-level BPE (8,000 tokens) and next-token pretraining on the 58,000 training sentences (the
   English and German sides as separate documents; no pairs are seen here);
2. fine-tuning on the 29,000 pairs as {"prompt": "<English>\\n", "completion": "<German>"}, loss on the
   German tokens only, examples packed into rows: once fully, once with LoRA (from the same base);
3. greedy translation of the 1,014 val sentences and corpus BLEU / chrF with sacreBLEU's defaults.

Training budgets are wall-clock (`--pretrain-seconds`, `--finetune-seconds`); `torch.compile` time
counts inside them. The script reports wall and process CPU seconds of every stage; the last line
printed is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from common import timed

from omnigpt.config import FinetuneConfig, LoRAConfig, ModelConfig, TrainConfig
from omnigpt.data import prepare
from omnigpt.evaluate import evaluate
from omnigpt.examples import read_records
from omnigpt.finetune import finetune
from omnigpt.generate import GenerationOptions
from omnigpt.hardware import machine_info
from omnigpt.load import load_model
from omnigpt.train import pretrain


def read_pairs(folder: Path, split: str) -> list[tuple[str, str]]:
    def lines(lang: str) -> list[str]:
        with gzip.open(folder / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            return f.read().splitlines()

    en, de = lines("en"), lines("de")
    assert len(en) == len(de), f"{split}: {len(en)} English vs {len(de)} German lines"
    return list(zip(en, de, strict=True))


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="folder with {train,val}.{en,de}.gz")
    p.add_argument("--out", default="runs/multi30k", help="work folder (must not hold runs yet)")
    p.add_argument("--pretrain-seconds", type=float, default=360)
    p.add_argument("--finetune-seconds", type=float, default=1380)
    p.add_argument("--methods", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast where bf16 matmuls are native, else fp32",
    )
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, val_pairs = read_pairs(data, "train"), read_pairs(data, "val")
    report: dict = {
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "machine": machine_info(),
        "stages": {},
    }

    # 1. pretraining text: each sentence of either language is a document
    sentences = [{"text": s} for pair in train_pairs for s in pair]
    random.Random(0).shuffle(sentences)
    write_jsonl(out / "sentences.jsonl", sentences)
    write_jsonl(
        out / "train.jsonl", [{"prompt": en + "\n", "completion": de} for en, de in train_pairs]
    )
    write_jsonl(
        out / "val.jsonl", [{"prompt": en + "\n", "completion": de} for en, de in val_pairs]
    )
    print(prepare([out / "sentences.jsonl"], out / "text", f"bpe:{args.vocab}", val_fraction=0.05))

    common = dict(
        batch_size=args.batch_size,
        max_steps=1_000_000,
        precision=args.precision,
        compile=not args.no_compile,
        seed=args.seed,
        log_interval=20,
    )
    model_cfg = ModelConfig(
        block_size=128,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        pos_encoding="rope",
        mlp="swiglu",
        norm="rmsnorm",
    )
    pre_cfg = TrainConfig(
        **common,
        max_seconds=args.pretrain_seconds,
        optimizer="muon",
        lr=3e-3,
        muon_lr=0.015,
        warmup_steps=50,
        eval_interval=250,
    )
    result, t = timed(pretrain, out / "text", out / "pretrain", model_cfg, pre_cfg, progress=False)
    report["stages"]["pretrain"] = {
        **t,
        "val_loss": round(result.final_val_loss, 4),
        "steps": result.steps,
    }

    val_records = read_records(out / "val.jsonl")
    greedy = GenerationOptions(temperature=0.0, max_new_tokens=96, token_healing=False)
    for method in [m for m in args.methods.split(",") if m]:
        if method == "full":
            ft_cfg = FinetuneConfig(method="full", pack=True)
            opt = dict(optimizer="muon", lr=3e-3, muon_lr=0.015)
        else:
            ft_cfg = FinetuneConfig(
                method="lora",
                pack=True,
                lora=LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank),
            )
            opt = dict(optimizer="adamw", lr=args.lora_lr, weight_decay=0.0)
        ft_train = TrainConfig(
            **common,
            **opt,
            max_seconds=args.finetune_seconds,
            warmup_steps=50,
            eval_interval=250,
            eval_batches=0,
            early_stop_patience=4,
        )
        run = out / f"finetune-{method}"
        result, t = timed(
            finetune,
            out / "pretrain",
            out / "train.jsonl",
            run,
            ft_cfg,
            ft_train,
            val_data=out / "val.jsonl",
            progress=False,
        )
        model, tokenizer = load_model(run)  # best/ by val loss
        summary, t_eval = timed(
            evaluate,
            model,
            tokenizer,
            val_records,
            ["bleu", "chrf"],
            greedy,
            run / "eval-val",
            batch_size=64,
            progress=False,
        )
        training_wall = report["stages"]["pretrain"]["wall_s"] + t["wall_s"]
        report["stages"][f"finetune-{method}"] = {
            **t,
            "val_loss": round(result.best_val_loss, 4),
            "steps": result.steps,
            "stopped_by": result.stopped_by,
            "bleu": summary["metrics"]["bleu"],
            "chrf": summary["metrics"]["chrf"],
            "eval_wall_s": t_eval["wall_s"],
            "training_wall_s_with_pretrain": round(training_wall, 1),
        }
        print(
            f"{method}: BLEU {summary['metrics']['bleu']:.2f}, chrF {summary['metrics']['chrf']:.2f}, "
            f"training {training_wall / 60:.1f} min (pretraining included)"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
