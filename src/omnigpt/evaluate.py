"""Task evaluation: generate an answer for every example and score it, or measure perplexity.

    summary = evaluate(model, tokenizer, records, ["bleu", "chrf"], GenerationOptions(temperature=0))

Answers are generated from each example's prompt (or its conversation up to the last assistant turn)
in length-sorted batches on the KV cache, until `<|endoftext|>` / `<|end|>` or the token limit.
Perplexity is exp of the mean loss over the completion/assistant tokens, as in fine-tuning.
With `out_dir`, writes `predictions.jsonl` (one line per example, with its scores) and `summary.json`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from omnigpt.config import save_json
from omnigpt.ctc import JointCTCScorer
from omnigpt.errors import OmnigptError
from omnigpt.examples import (
    collate_media,
    encode_prompt,
    encode_records,
    eval_batches,
    media_loader,
    pad_id,
)
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.metrics import METRICS, corpus_metric, example_metric
from omnigpt.model import GPT
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.template import reference, stop_ids
from omnigpt.tokenizer import Tokenizer
from omnigpt.train import evaluate_loss


def perplexity(
    model: GPT | MultimodalGPT,
    tokenizer: Tokenizer,
    records: list[dict],
    batch_size: int = 16,
    precision: str = "auto",
    base_dir: str | Path = ".",
) -> float:
    """exp of the mean loss over the records' completion/assistant tokens, as in fine-tuning."""
    block = model.config.block_size
    loader = media_loader(model, base_dir)
    examples, _ = encode_records(tokenizer, records, block, "truncate", loader)
    if not examples:
        raise OmnigptError("no example fits the model's context for perplexity")
    batches = eval_batches(examples, block, batch_size, pad_id(tokenizer))
    return math.exp(evaluate_loss(model, batches, model.wte.weight.device, None, precision))


def generate_answers(
    model: GPT | MultimodalGPT,
    tokenizer: Tokenizer,
    records: list[dict],
    opts: GenerationOptions,
    batch_size: int = 32,
    progress: bool = True,
    base_dir: str | Path = ".",
) -> list[str]:
    """The model's answer to each record, in record order. A multimodal model reads the images and
    audio the records name (paths relative to `base_dir`); they are encoded once per batch."""
    if not records:
        return []
    loader = media_loader(model, base_dir)
    prompts, media = zip(*(encode_prompt(tokenizer, r, loader) for r in records), strict=True)
    limit = model.config.block_size - 1
    # keep the end of a text prompt longer than the context (cutting media would break them)
    prompts = [p if media[i] else p[-limit:] for i, p in enumerate(prompts)]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(records)
    bar = tqdm(total=len(records), unit="example", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        stops = sorted({s for i in chunk for s in stop_ids(tokenizer, records[i])})
        inputs = collate_media([media[i] for i in chunk if media[i]])
        device = model.wte.weight.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        rescore = None
        if opts.ctc_weight:
            rescore = _joint_ctc(model, [media[i] for i in chunk], inputs, stops, opts.ctc_weight)
        new = generate_tokens(
            model,
            [prompts[i] for i in chunk],
            opts,
            stops,
            tokenizer.vocab_size,
            prefill_inputs=inputs,
            rescore=rescore,
        )
        for i, ids in zip(chunk, new, strict=True):
            answers[i] = tokenizer.decode(ids, skip_special=True).strip()
        bar.update(len(chunk))
    bar.close()
    return answers


def _joint_ctc(model, media: list[dict], inputs: dict, stops: list[int], weight: float):
    """The joint CTC/attention scorer of a batch whose every example holds exactly one clip."""
    if not isinstance(model, MultimodalGPT) or model.audio_ctc is None:
        raise OmnigptError(
            "--ctc-weight needs a model trained with a CTC head (ctc=WEIGHT in --audio)"
        )
    if any(len(m.get("mel", [])) != 1 for m in media):
        raise OmnigptError("--ctc-weight needs exactly one audio clip in each prompt")
    with torch.inference_mode():
        log_probs = model.ctc_log_probs(inputs["mel"], inputs["frames"])
    return JointCTCScorer(log_probs, model.audio_id, set(stops), weight)


def evaluate(
    model: GPT,
    tokenizer: Tokenizer,
    records: list[dict],
    metrics: list[str],
    opts: GenerationOptions,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    precision: str = "auto",
    progress: bool = True,
    base_dir: str | Path = ".",
) -> dict:
    """Scores on `metrics` (see metrics.METRICS); returns and, with `out_dir`, writes the summary."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise OmnigptError(
            f"unknown metric(s) {', '.join(unknown)}; choose from: {', '.join(METRICS)}"
        )
    t0 = time.time()
    scores: dict[str, float] = {}
    if "perplexity" in metrics:
        scores["perplexity"] = perplexity(
            model, tokenizer, records, batch_size, precision, base_dir
        )
    generated = [m for m in metrics if m != "perplexity"]
    rows = []
    if generated:
        answers = generate_answers(model, tokenizer, records, opts, batch_size, progress, base_dir)
        refs = [reference(r).strip() for r in records]
        for m in generated:
            scores[m] = corpus_metric(m, answers, refs)
        for i, (record, answer, ref) in enumerate(zip(records, answers, refs, strict=True)):
            row = {"index": i, "prediction": answer, "reference": ref}
            if "prompt" in record:
                row["prompt"] = record["prompt"]
            row.update({m: round(example_metric(m, answer, ref), 4) for m in generated})
            rows.append(row)
    summary = {
        "examples": len(records),
        "metrics": {k: round(v, 4) for k, v in scores.items()},
        "generation": {k: v for k, v in opts.__dict__.items()},
        "seconds": round(time.time() - t0, 2),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if rows:
            with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        save_json(out_dir / "summary.json", summary)
    return summary
