"""int8 weights and speculative decoding on a trained model: Multi30k English→German.

    python benchmarks/multi30k.py --data ../shared/data/multi30k --out runs/m30k-target \\
        --pretrain-seconds 240 --finetune-seconds 480 --methods full
    python benchmarks/multi30k.py --data ../shared/data/multi30k --out runs/m30k-draft --n-layer 2 \\
        --pretrain-seconds 120 --finetune-seconds 240 --methods full
    python benchmarks/int8_and_draft.py --model runs/m30k-target/finetune-full \\
        --draft runs/m30k-draft/finetune-full --data runs/m30k-target/val.jsonl

1. Quality (all 1,014 val pairs): perplexity of the references (fp32 arithmetic) and greedy
   sacreBLEU / chrF (batch 64) of the model with fp32 weights and with int8 weights.
2. Speed at batch 1 (the first `--sentences` val sentences, one at a time, greedy, up to 96 new
   tokens): plain decoding, and decoding with the 2-layer draft proposing `--draft-tokens` tokens,
   in fp32 and with both models in int8; answers identical to plain decoding (counted), acceptance
   rate, tokens/s.

The two models come from the same script and data, so they share the tokenizer. The last line
printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from omnigpt.evaluate import evaluate
from omnigpt.examples import encode_prompt, read_records
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.hardware import machine_info
from omnigpt.load import load_model
from omnigpt.quantize import quantize
from omnigpt.speculative import speculative_tokens
from omnigpt.template import stop_ids


def quality(model, tok, records, out: Path) -> dict:
    greedy = GenerationOptions(temperature=0.0, max_new_tokens=96, token_healing=False)
    metrics = ["perplexity", "bleu", "chrf"]
    summary = evaluate(model, tok, records, metrics, greedy, out, 64, "fp32", progress=False)
    return {k: round(v, 4) for k, v in summary["metrics"].items()}


def speed(model, draft, tok, prompts, k: int) -> dict:
    """Plain greedy decoding of each prompt alone, then with the draft; the same answers?"""
    greedy = GenerationOptions(temperature=0.0, max_new_tokens=96, token_healing=False)
    stops = stop_ids(tok, {"prompt": ""})
    generate_tokens(model, [prompts[0]], greedy, stops, tok.vocab_size)  # warm-up
    t = time.perf_counter()
    plain = [generate_tokens(model, [p], greedy, stops, tok.vocab_size)[0] for p in prompts]
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    fast, proposed, accepted, rounds = [], 0, 0, 0
    for p in prompts:
        [new], stats = speculative_tokens(model, draft, [p], greedy, k, stops, tok.vocab_size)
        fast.append(new)
        proposed, accepted, rounds = (
            proposed + stats.proposed,
            accepted + stats.accepted,
            rounds + stats.rounds,
        )
    fast_s = time.perf_counter() - t
    tokens = sum(len(a) for a in plain)
    return {
        "sentences": len(prompts),
        "tokens": tokens,
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "speculative_tokens_per_s": round(sum(len(a) for a in fast) / fast_s, 1),
        "speedup": round(plain_s / fast_s, 3),
        "identical_answers": sum(a == b for a, b in zip(plain, fast, strict=True)),
        "acceptance": round(accepted / proposed, 3),
        "tokens_per_model_pass": round(sum(len(a) for a in fast) / rounds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--data", required=True, help="val JSONL of prompt/completion pairs")
    p.add_argument("--sentences", type=int, default=150)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--out", default=None, help="where predictions go (default: beside --model)")
    args = p.parse_args()

    records = read_records(args.data)
    model, tok = load_model(args.model)
    draft, draft_tok = load_model(args.draft)
    assert tok.differs_from(draft_tok) is None, tok.differs_from(draft_tok)
    out = Path(args.out or Path(args.model) / "int8-and-draft")
    report: dict = {"machine": machine_info(), "model": model.describe(), "draft": draft.describe()}
    small = quantize(copy.deepcopy(model), "int8")
    small_draft = quantize(copy.deepcopy(draft), "int8")
    report["fp32"] = quality(model, tok, records, out / "fp32")
    report["int8"] = quality(small, tok, records, out / "int8")
    print(json.dumps({"fp32": report["fp32"], "int8": report["int8"]}), flush=True)
    prompts = [encode_prompt(tok, r)[0] for r in records[: args.sentences]]
    report["speed_fp32"] = speed(model, draft, tok, prompts, args.draft_tokens)
    print(json.dumps({"speed_fp32": report["speed_fp32"]}), flush=True)
    report["speed_int8"] = speed(small, small_draft, tok, prompts, args.draft_tokens)
    print(json.dumps({"speed_int8": report["speed_int8"]}), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
