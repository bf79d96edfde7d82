"""Drawing: images sampled code by code by a model that writes them, with classifier-free guidance.

    opts = GenerationOptions(temperature=1.0, top_k=None, seed=0, num_samples=8)
    images = imagine(model, tokenizer, ["a red circle"], opts, cfg_scale=3.0)   # Pillow images
    images = imagine(model, tokenizer, [""], opts, complete="half.png", rows=8)  # finish its top rows

A prompt becomes `prompt <|image_start|>` (and the given top rows' codes, to complete an image); then
exactly rows × cols codes are sampled, one per step on the KV cache, every sample of the batch
together. Only code tokens can be chosen inside an image (the rest of the vocabulary is masked), so
every sample is a whole image and `<|image_end|>` needs no sampling.

Guidance (Ho & Salimans, 2022) runs each prompt's conditional row and an unconditional row (the
image start alone) in one batch and samples from cond + (scale - 1) · (cond - uncond) logits; at
scale 1 that is the conditional logits exactly. It needs a model that also learned to draw without a
prompt (`FinetuneConfig.drop_condition`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from omnigpt.checkpoint import CONFIG, resolve
from omnigpt.config import GenerationOptions, load_json
from omnigpt.errors import OmnigptError
from omnigpt.generate import _decode_step, _prefill, left_pad, sample_next
from omnigpt.model import GPT
from omnigpt.pixels import contact_sheet
from omnigpt.tokenizer import IMAGE_START, Tokenizer


@torch.inference_mode()
def sample_codes(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    n_codes: int,
    code_ids: range,
    opts: GenerationOptions,
    unconditional: Sequence[Sequence[int]] | None = None,
    cfg_scale: float = 1.0,
    first_index: int = 0,
    use_cache: bool = True,
    trace: list | None = None,
) -> torch.Tensor:
    """`n_codes` codes (B, n_codes), indices into `code_ids`, sampled after each prompt (which ends
    in `<|image_start|>` and the `first_index` codes already known).

    With `unconditional` prompts (one per prompt), each step samples from guided logits. Without
    `use_cache`, every step runs the model over the whole sequence (for measuring what the cache
    saves). `trace`, when given, receives each step's logits over the codes (B, n_codes)."""
    device = model.wte.weight.device
    generator = None if opts.seed is None else torch.Generator(device).manual_seed(opts.seed)
    B = len(prompts)
    guided = unconditional is not None
    rows = list(prompts) + (list(unconditional) if guided else [])
    tokens, pads = left_pad(rows)
    tokens, pads = tokens.to(device), pads.to(device)
    T = tokens.size(1)
    total = T + n_codes
    caches = model.make_caches(len(rows), total) if use_cache else None
    logits, key_valid = _prefill(model, tokens, pads, caches, total, {})
    out = torch.empty(B, n_codes, dtype=torch.long, device=device)
    for step in range(n_codes):
        scores = logits[:, -1, code_ids.start : code_ids.stop].float()
        if guided:
            cond, uncond = scores[:B], scores[B:]
            scores = cond + (cfg_scale - 1.0) * (cond - uncond)
        if trace is not None:
            trace.append(scores)
        codes = sample_next(scores, opts, generator)
        out[:, step] = codes
        if step == n_codes - 1:
            break
        ids = codes + code_ids.start
        ids = torch.cat([ids, ids]) if guided else ids
        if use_cache:
            index = torch.full((len(rows), 1), first_index + step, device=device)
            logits = _decode_step(model, ids, pads, key_valid, caches, T + step, image_index=index)
        else:
            tokens = torch.cat([tokens, ids[:, None]], dim=1)
            logits, _ = _prefill(model, tokens, pads, None, tokens.size(1), {})
    return out


def imagine(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    opts: GenerationOptions,
    cfg_scale: float = 1.0,
    complete=None,
    rows: int = 0,
    use_cache: bool = True,
) -> list:
    """`opts.num_samples` Pillow images per prompt (prompt-major order), drawn from the prompt's text
    ("" draws unconditionally). With `complete` (an image or path), each sample keeps its top
    `rows` rows of codes and draws the rest."""
    codec = tokenizer.images
    if codec is None:
        raise OmnigptError("this model does not write images (its tokenizer has no image codes)")
    if not prompts:
        raise OmnigptError('no prompt: give one ("" draws without a prompt)')
    if cfg_scale < 0:
        raise OmnigptError(f"--cfg must be 0 or more, not {cfg_scale}")
    known: list[int] = []
    if complete is not None:
        if not 0 < rows < codec.rows:
            raise OmnigptError(
                f"--rows must be from 1 to {codec.rows - 1} (images are {codec.rows} rows of codes)"
            )
        known = codec.encode(complete)[: rows * codec.cols].tolist()
    code_ids = tokenizer.code_ids
    head = [tokenizer.token_id(IMAGE_START)] + [code_ids.start + c for c in known]
    encoded = [tokenizer.encode(p, allow_special=False) for p in prompts]
    longest = max((len(e) for e in encoded), default=0)
    needed = longest + codec.tokens + 2
    if needed > model.config.block_size:
        raise OmnigptError(
            f"the model's context of {model.config.block_size} tokens is too short for a prompt of "
            f"{longest} tokens + {codec.rows}×{codec.cols} image codes + 2"
        )
    conditional = [e + head for e in encoded for _ in range(opts.num_samples)]
    unconditional = [head] * len(conditional) if cfg_scale != 1.0 else None
    n_new = codec.tokens - len(known)
    codes = sample_codes(
        model, conditional, n_new, code_ids, opts, unconditional, cfg_scale, len(known), use_cache
    )
    return [codec.decode(known + row) for row in codes.tolist()]


def save_images(images: list, out_dir: str | Path, scale: int = 4) -> list[Path]:
    """The images as out_dir/0000.png, 0001.png, ... and all of them on out_dir/sheet.png, scaled up
    `scale` times so a person can see them. Returns the image paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out_dir / f"{i:04d}.png")
        image.save(paths[-1])
    contact_sheet(images, scale=scale).save(out_dir / "sheet.png")
    return paths


def learned_unconditional(path: str | Path) -> bool:
    """Whether the model at `path` was trained to draw without a prompt too (what guidance needs):
    fine-tuned with `drop_condition` > 0, or pretrained (on images with no text before them)."""
    config = load_json(resolve(path) / CONFIG)
    finetuned = config.get("finetune")
    return finetuned is None or finetuned.get("drop_condition", 0) > 0
