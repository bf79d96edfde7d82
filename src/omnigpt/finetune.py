"""Supervised fine-tuning: what to train, and `finetune()`; and `train_on_examples()`, a model
built from nothing and trained on examples alone.

    result = finetune("runs/base", "pairs.jsonl", "runs/tuned", FinetuneConfig(method="lora"))
    result = train_on_examples("shapes.jsonl", "runs/shapes", ModelConfig.from_preset("nano"),
                               TrainConfig(max_seconds=120), vision="tiny")

Records become examples and batches in `examples.py`; training runs through the same `fit()` loop
as pretraining. Three ways to adapt: `full` trains everything; `partial` freezes all but the named
parameters (`--trainable h.5,ln_f,lm_head` or `--last-blocks 2`); `lora` freezes the base and trains
low-rank adapters, saved on their own.

Multimodal training is staged the same way: `vision="small"` / `audio="small"` attach new encoders
to a text model; `method="partial", trainable=("vision", "image_proj")` aligns them with the decoder
frozen; a second run (full, partial or LoRA) then tunes the decoder on instructions.
"""

from __future__ import annotations

import fnmatch
import math
import random
from pathlib import Path
from typing import Any

import torch

from omnigpt.checkpoint import (
    is_sharded,
    open_run_folder,
    read_adapter,
    save_checkpoint,
    start_run_folder,
)
from omnigpt.config import (
    AudioConfig,
    FinetuneConfig,
    ImageTokensConfig,
    ModelConfig,
    TrainConfig,
    VisionConfig,
    load_json,
)
from omnigpt.errors import OmnigptError
from omnigpt.examples import (
    Example,
    ExampleBatches,
    encode_records,
    eval_batches,
    media_loader,
    pad_id,
    read_records,
)
from omnigpt.load import load_model
from omnigpt.lora import (
    add_lora,
    base_checksum,
    load_adapter_state,
    lora_layers,
    merge_lora,
    same_base,
)
from omnigpt.model import GPT
from omnigpt.model.fusion import MultimodalGPT, attach_encoders
from omnigpt.pixels import ImageCodec
from omnigpt.tokenizer import AUDIO, IMAGE, Tokenizer
from omnigpt.train import RunResult, fit, setup_distributed

# -- what to train --------------------------------------------------------------------------------


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Freezes every parameter but those named by `patterns` (a name, a module prefix or a glob).

    Returns the trainable names; raises when a pattern matches nothing.
    """
    names = [n for n, _ in model.named_parameters()]

    def hit(name: str, pat: str) -> bool:
        return any(
            fnmatch.fnmatchcase(n, pat)
            or n.startswith(pat + ".")
            or fnmatch.fnmatchcase(n, pat + ".*")
            for n in (name, name.removeprefix("gpt."))  # a multimodal model's decoder is "gpt."
        )

    for pat in patterns:
        if not any(hit(n, pat) for n in names):
            raise OmnigptError(
                f"--trainable {pat!r} matches no parameter (names look like h.0.attn.c_attn.weight, "
                "ln_f.weight, lm_head.weight; vision, image_proj, audio, audio_proj)"
            )
    trainable = []
    for name, p in model.named_parameters():
        on = any(hit(name, pat) for pat in patterns)
        p.requires_grad_(on)
        if on:
            trainable.append(name)
    return trainable


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen: dict[int, bool] = {}
    for p in model.parameters():
        seen[id(p)] = p.requires_grad
    sizes = {id(p): p.numel() for p in model.parameters()}
    return sum(sizes[i] for i, t in seen.items() if t), sum(sizes.values())


def prepare_model(model: GPT, cfg: FinetuneConfig) -> str:
    """Sets up what trains, per `cfg.method`; returns a line describing it."""
    if cfg.method == "lora":
        if "lm_head" in cfg.lora.targets and model.config.tie_embeddings:
            raise OmnigptError(
                "LoRA on lm_head needs an untied head (it shares its weight with the embedding)"
            )
        wrapped = add_lora(model, cfg.lora)
        what = (
            f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {len(wrapped)} layers "
            f"({', '.join(cfg.lora.targets)})"
        )
    elif cfg.method == "partial":
        patterns = list(cfg.trainable)
        n = model.config.n_layer
        if cfg.last_blocks > n:
            raise OmnigptError(f"--last-blocks {cfg.last_blocks}: the model has only {n} blocks")
        patterns += [f"h.{i}" for i in range(n - cfg.last_blocks, n)]
        freeze_except(model, patterns)
        what = f"partial: {', '.join(patterns)}"
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        what = "full fine-tuning"
    trainable, total = count_trainable(model)
    if trainable == 0:
        raise OmnigptError("nothing to train: every parameter is frozen")
    return (
        f"{what}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"
    )


# -- building multimodal models -------------------------------------------------------------------


def add_encoders(
    model: GPT | MultimodalGPT, tokenizer: Tokenizer, vision: str | None, audio: str | None
) -> GPT | MultimodalGPT:
    """`model` with new encoders attached, from specs such as "small" or "tiny,n_layer=3"."""
    if not (vision or audio):
        return model
    ids = {name: tokenizer.token_id(name) for name in (IMAGE, AUDIO)}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise OmnigptError(
            f"the model's tokenizer has no {' or '.join(missing)} token to place media at "
            "(omnigpt tokenizers reserve them; a GPT-2 vocabulary does not)"
        )
    return attach_encoders(
        model,
        VisionConfig.from_spec(vision) if vision else None,
        AudioConfig.from_spec(audio) if audio else None,
        ids[IMAGE],
        ids[AUDIO],
    )


def record_texts(record: dict) -> list[str]:
    """The text of an example: prompt and completion, or every message."""
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    return [record["prompt"], record.get("completion", "")]


def new_model(
    records: list[dict],
    model_cfg: ModelConfig,
    tokenizer_spec: str = "char",
    vision: str | None = None,
    audio: str | None = None,
    images: ImageTokensConfig | None = None,
    seed: int = 0,
) -> tuple[GPT | MultimodalGPT, Tokenizer]:
    """A randomly initialised model, with encoders as asked, and a tokenizer trained on the text of
    `records` ("char", or "bpe:VOCAB_SIZE"): for training on examples with nothing to start from.
    When records draw images ("image_out"), the tokenizer gets image codes fitted to those images
    as `images` says (default: ImageTokensConfig())."""
    texts = [t for r in records for t in record_texts(r)]
    if tokenizer_spec == "char":
        tokenizer = Tokenizer.train_char(texts)
    elif tokenizer_spec.startswith("bpe:") and tokenizer_spec[4:].isdigit():
        tokenizer = Tokenizer.train_bpe(texts, int(tokenizer_spec[4:]))
    else:
        raise OmnigptError(f"--tokenizer {tokenizer_spec!r}: use char or bpe:VOCAB_SIZE")
    drawn = [r["image_out"] for r in records if "image_out" in r]
    if drawn:
        images = images or ImageTokensConfig()
        codec = ImageCodec.from_spec(images.palette, drawn, images.image_size, images.patch, seed)
        tokenizer.with_images(codec)
        print(f"images: {codec.describe()}")
        if model_cfg.block_size < codec.tokens + 3:
            raise OmnigptError(
                f"a context of {model_cfg.block_size} tokens cannot hold an image of {codec.tokens} "
                "codes with its start, end and a prompt: raise --block-size or --patch, or lower "
                "--image-size"
            )
    cfg = ModelConfig(**{**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    cfg = cfg.with_image_grid(*tokenizer.image_grid())
    return add_encoders(GPT(cfg), tokenizer, vision, audio), tokenizer


def save_new_model(
    data: str | Path,
    folder: str | Path,
    model_cfg: ModelConfig,
    tokenizer_spec: str = "char",
    vision: str | None = None,
    audio: str | None = None,
    seed: int = 0,
    images: ImageTokensConfig | None = None,
) -> Tokenizer:
    """`new_model` for the examples in `data`, initialised from `seed` and saved as a checkpoint in
    `folder` (what `train_on_examples` and staged training start from); returns its tokenizer."""
    torch.manual_seed(seed)
    records = read_records(data)
    model, tokenizer = new_model(records, model_cfg, tokenizer_spec, vision, audio, images, seed)
    save_checkpoint(folder, model, tokenizer)
    return tokenizer


# -- the entry points -----------------------------------------------------------------------------


def finetune(
    base: str | Path,
    data: str | Path,
    out_dir: str | Path,
    ft_cfg: FinetuneConfig | None = None,
    train_cfg: TrainConfig | None = None,
    val_data: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    resume_overrides: dict[str, Any] | None = None,
) -> RunResult:
    """Fine-tunes the model at `base` (anything `load_model` loads) on the JSONL examples in `data`,
    into run folder `out_dir`; `train_cfg` defaults to `TrainConfig.finetuning()`.

    Validation examples come from `val_data`, or are a seeded random `val_fraction` of `data`. With
    `resume`, the model, data and settings come from the run folder (plus `resume_overrides`).
    """
    out_dir = Path(out_dir)
    ft_cfg, train_cfg = ft_cfg or FinetuneConfig(), train_cfg or TrainConfig.finetuning()
    saved = open_run_folder(out_dir, resume)
    if saved is not None:
        train_cfg = TrainConfig.from_dict({**saved["train"], **(resume_overrides or {})})
        ft_cfg = FinetuneConfig.from_dict(saved["finetune"])
        base, data, val_data = saved["base"], saved["data"], saved.get("val_data")
    dist_info = setup_distributed(train_cfg.device)
    if resume and ft_cfg.method != "lora":
        model, tokenizer = load_model(out_dir / "latest")
    else:
        model, tokenizer = load_model(base)
        merge_lora(model)  # a LoRA run as the base: its adapters become part of the weights
        model = add_encoders(model, tokenizer, ft_cfg.vision, ft_cfg.audio)
    model.train()
    train, val, stats = _examples(model, tokenizer, data, val_data, ft_cfg, train_cfg.seed)

    torch.manual_seed(train_cfg.seed)  # the same initial adapters on every process
    what = prepare_model(model, ft_cfg)
    extra: dict[str, Any] = {"finetune": ft_cfg.to_dict()}
    if ft_cfg.method == "lora":
        extra.update(_adapter_base(model, base, out_dir / "latest" if resume else None))

    torch.manual_seed(train_cfg.seed + dist_info.rank)
    block, batch = model.config.block_size, train_cfg.batch_size
    rank, world = dist_info.rank, dist_info.world_size
    pad = pad_id(tokenizer)
    batches = ExampleBatches(train, block, batch, pad, train_cfg.seed, ft_cfg.pack, rank, world)
    if ft_cfg.epochs and not resume:
        per_epoch = batches.batches_per_epoch() / train_cfg.grad_accum
        train_cfg.max_steps = max(1, math.ceil(ft_cfg.epochs * per_epoch))

    def val_batches():
        return eval_batches(val, block, batch, pad, ft_cfg.pack, rank, world)

    if dist_info.is_main:
        if saved is None:
            config = {"model": model.config.to_dict(), "train": train_cfg.to_dict()}
            config |= {"finetune": ft_cfg.to_dict(), "base": extra.get("base", str(base))}
            config |= {"data": str(Path(data).resolve())}
            config["val_data"] = str(Path(val_data).resolve()) if val_data else None
            start_run_folder(out_dir, config, tokenizer)
        print(model.describe())
        print(what)
        print(stats)
    return fit(
        model,
        tokenizer,
        batches,
        val_batches,
        train_cfg,
        out_dir,
        dist_info,
        resume=resume,
        progress=progress,
        extra_config=extra,
    )


def _examples(
    model: GPT | MultimodalGPT,
    tokenizer: Tokenizer,
    data: str | Path,
    val_data: str | Path | None,
    cfg: FinetuneConfig,
    seed: int,
) -> tuple[list[Example], list[Example], str]:
    """Training and validation examples, and a line that counts them. Without `val_data`, a seeded
    random `val_fraction` of `data` is held out."""
    records = read_records(data)
    if tokenizer.images is None and any("image_out" in r for r in records):
        raise OmnigptError(
            f"{data} has text→image examples but the model has no image tokens to draw with; "
            "train a model that draws from nothing: omnigpt train --data FILE.jsonl"
        )
    if val_data:
        val_records = read_records(val_data)
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_val = max(1, math.ceil(len(records) * cfg.val_fraction)) if len(records) > 1 else 0
        val_records = [records[i] for i in order[:n_val]] or records
        records = [records[i] for i in order[n_val:]] or records
    block = model.config.block_size
    train, train_stats = encode_records(
        tokenizer,
        records,
        block,
        cfg.too_long,
        media_loader(model, Path(data).parent),
        cfg.skip_bad_media,
        cfg.drop_condition,
        seed,
    )
    val, val_stats = encode_records(
        tokenizer,
        val_records,
        block,
        cfg.too_long,
        media_loader(model, Path(val_data or data).parent),
        cfg.skip_bad_media,
    )
    if not val:
        raise OmnigptError(f"no validation example fits the context of {block} tokens")
    return train, val, f"train: {train_stats}; validation: {val_stats}"


def _adapter_base(model: GPT, base: str | Path, resume_from: Path | None) -> dict[str, Any]:
    """What a LoRA run records of its base: where it is and a checksum of the adapted weights. A
    resumed run is refused when its base has changed, then takes its saved adapters."""
    info = {
        "base": str(Path(base).resolve()) if Path(base).exists() else str(base),
        "base_checksum": base_checksum(model, list(lora_layers(model))),
    }
    if resume_from is not None:
        saved_checksum = load_json(resume_from / "config.json").get("base_checksum")
        if saved_checksum and not same_base(info["base_checksum"], saved_checksum):
            raise OmnigptError(
                f"{resume_from.parent}: its base {base} has changed since the adapters were trained"
            )
        if not is_sharded(resume_from):  # a sharded run's adapters load with its optimizer state
            load_adapter_state(model, read_adapter(resume_from), str(resume_from))
    return info


def train_on_examples(
    data: str | Path,
    out_dir: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer_spec: str = "char",
    vision: str | None = None,
    audio: str | None = None,
    pack: bool = False,
    resume: bool = False,
    progress: bool = True,
    resume_overrides: dict[str, Any] | None = None,
    images: ImageTokensConfig | None = None,
    drop_condition: float = FinetuneConfig.drop_condition,
) -> RunResult:
    """A new model (encoders as asked, a tokenizer trained on the examples' text, image codes as
    `images` says when they draw) saved in out_dir/init, then trained on every weight by
    `finetune()`, in the same kind of run folder as `pretrain`. With `resume`, the run in `out_dir`
    continues."""
    out_dir = Path(out_dir)
    dist_info = setup_distributed(train_cfg.device)
    if not resume and dist_info.is_main:  # under torchrun the others wait for it, then load it
        open_run_folder(out_dir, resume=False)
        if (out_dir / "init").exists():
            raise OmnigptError(
                f"{out_dir} already holds a run; pass --resume, or choose another --out"
            )
        init = out_dir / "init"
        tokenizer = save_new_model(
            data, init, model_cfg, tokenizer_spec, vision, audio, train_cfg.seed, images
        )
        print(f"new model in {init} ({tokenizer.vocab_size} tokens: {tokenizer_spec})")
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    ft_cfg = FinetuneConfig(method="full", pack=pack, drop_condition=drop_condition)
    return finetune(
        out_dir / "init",
        data,
        out_dir,
        ft_cfg,
        train_cfg,
        resume=resume,
        progress=progress,
        resume_overrides=resume_overrides,
    )
