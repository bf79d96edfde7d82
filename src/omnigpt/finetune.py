"""Supervised fine-tuning: labelled examples into batches, what to train, and `finetune()`.

    result = finetune("runs/base", "pairs.jsonl", "runs/tuned", FinetuneConfig(method="lora"), TrainConfig())

Examples (see `chat.py`) become (tokens, labels) pairs; only completion/assistant tokens are targets.
Batches are either padded (examples of similar length batched together, right-padded: with causal
attention no real token ever sees a pad) or packed (several examples per row, each with its own
positions and a block-diagonal causal mask, so attention never crosses from one into another).

Three ways to adapt: `full` trains everything; `partial` freezes all but the named parameters
(`--trainable h.5,ln_f,lm_head` or `--last-blocks 2`); `lora` freezes the base and trains low-rank
adapters, saved on their own. Training runs through the same `fit()` loop as pretraining.

Multimodal training is staged the same way: `vision="small"` / `audio="small"` attach new encoders
to a text model; `method="partial", trainable=("vision", "image_proj")` aligns them with the decoder
frozen; a second run (full, partial or LoRA) then tunes the decoder on instructions. `new_model`
builds a model from nothing, tokenizer included, for training on examples alone.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnigpt.chat import read_records, reference, render, with_placeholders
from omnigpt.checkpoint import read_adapter
from omnigpt.config import AudioConfig, ModelConfig, TrainConfig, VisionConfig, load_json, save_json
from omnigpt.errors import OmnigptError
from omnigpt.hf import load_model
from omnigpt.lora import (
    LoRAConfig,
    add_lora,
    base_checksum,
    load_adapter_state,
    lora_layers,
    merge_lora,
    same_base,
)
from omnigpt.media import collate_media, record_media
from omnigpt.model import GPT, IGNORE_INDEX
from omnigpt.model.fusion import MultimodalGPT, attach_encoders
from omnigpt.tokenizer import AUDIO, IMAGE, PAD, Tokenizer
from omnigpt.train import RunResult, fit, setup_distributed

# inputs, targets (already shifted by one), and for multimodal examples a third item: the media
# (see media.record_media), whose placeholders the inputs hold
Example = tuple


@dataclass
class FinetuneConfig:
    """What to adapt and how examples become batches."""

    method: str = "full"  # full | partial | lora
    trainable: tuple[
        str, ...
    ] = ()  # partial: parameter names or globs ("h.5", "h.*.attn", "lm_head")
    last_blocks: int = 0  # partial: also train the last N Transformer blocks
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    pack: bool = False  # pack several examples per row instead of padding
    too_long: str = "truncate"  # truncate | drop: examples longer than the context
    epochs: float | None = None  # passes over the examples; sets TrainConfig.max_steps
    val_fraction: float = 0.05  # held out when no validation file is given
    skip_bad_media: bool = False  # leave out examples whose image/audio cannot be read
    vision: str | None = None  # attach a new image encoder: a preset and overrides ("small,...")
    audio: str | None = None  # attach a new audio encoder, likewise

    def __post_init__(self) -> None:
        if self.method not in ("full", "partial", "lora"):
            raise OmnigptError(f"unknown fine-tuning method {self.method!r} (full, partial, lora)")
        if self.too_long not in ("truncate", "drop"):
            raise OmnigptError(f"--too-long must be truncate or drop, not {self.too_long!r}")
        if self.method == "partial" and not (self.trainable or self.last_blocks):
            raise OmnigptError("partial fine-tuning needs --trainable NAMES or --last-blocks N")
        if self.method == "lora" and (self.vision or self.audio):
            raise OmnigptError(
                "new encoders cannot train under LoRA (only adapters are saved): align them first "
                "with --method partial --trainable vision,image_proj (or audio,audio_proj)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "lora"}
        d["trainable"] = list(self.trainable)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        d = dict(d)
        d["lora"] = LoRAConfig(**d.get("lora", {}))
        d["trainable"] = tuple(d.get("trainable", ()))
        return cls(**d)


# -- examples -------------------------------------------------------------------------------------


@dataclass
class ExampleStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0  # unreadable media

    def __str__(self) -> str:
        skipped = f", {self.skipped:,} skipped for unreadable media" if self.skipped else ""
        return f"{self.kept:,} examples ({self.truncated:,} truncated, {self.dropped:,} dropped as too long{skipped})"


def tokenize_records(
    tokenizer: Tokenizer,
    records: list[dict],
    block_size: int,
    too_long: str = "truncate",
    media_loader: Callable[[dict], tuple[dict, dict]] | None = None,
    skip_bad_media: bool = False,
) -> tuple[list[Example], ExampleStats]:
    """Renders records into (inputs, targets) of at most `block_size` tokens.

    Too long: `truncate` cuts the end (the example is dropped if no target token is left), `drop`
    drops it; an example with media is never cut (that could split an image's tokens), only dropped.
    `media_loader(record)` → (token counts per placeholder, media), for multimodal models; a
    missing or unreadable file stops with its path and line, or with `skip_bad_media` is reported
    and its example left out.
    """
    examples, stats = [], ExampleStats()
    for record in records:
        media = None
        if media_loader is not None:
            try:
                counts, media = media_loader(record)
            except OmnigptError as e:
                where = f"line {record['_line']}: " if "_line" in record else ""
                if not skip_bad_media:
                    raise OmnigptError(
                        f"{where}{e} (--skip-bad-media leaves such examples out)"
                    ) from None
                print(f"skipped {where}{e}", file=sys.stderr)
                stats.skipped += 1
                continue
            record = with_placeholders(record, {k: len(v) for k, v in counts.items()})
            r = render(tokenizer, record, counts)
            if len(media.get("mel", [])) == 1:  # its answer, for a CTC loss on the encoder
                answer = reference(record).strip()
                media["transcript"] = tokenizer.encode(answer, allow_special=False)
        else:
            r = render(tokenizer, record)
        x, y = r.ids[:-1], r.labels[1:]
        if len(x) > block_size:
            if too_long == "drop" or media:
                stats.dropped += 1
                continue
            x, y = x[:block_size], y[:block_size]
            if all(t == IGNORE_INDEX for t in y):
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append((x, y, media) if media else (x, y))
    stats.kept = len(examples)
    return examples, stats


def _media_inputs(examples: list[Example]) -> dict[str, torch.Tensor]:
    """The examples' images and clips in order of appearance, as model inputs."""
    media = [e[2] for e in examples if len(e) > 2]
    return collate_media(media) if media else {}


def _pad_rows(rows: list[Example], pad_id: int) -> tuple:
    T = max(len(e[0]) for e in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (xi, yi, *_) in enumerate(rows):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x, y, _media_inputs(rows)


def pack_rows(rows: list[list[Example]], block_size: int, pad_id: int) -> tuple:
    """Rows of several examples each → x, y (B, T), positions (B, T) and a mask (B, 1, T, T) that lets
    a token see only earlier tokens of its own example."""
    B, T = len(rows), block_size
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for seg, (xi, yi, *_) in enumerate(row):
            n = len(xi)
            x[i, start : start + n] = torch.tensor(xi)
            y[i, start : start + n] = torch.tensor(yi)
            positions[i, start : start + n] = torch.arange(n)
            segment[i, start : start + n] = seg
            start += n
        segment[i, start:] = torch.arange(len(row), len(row) + T - start)  # each pad on its own
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    extras = {"positions": positions, "attn_mask": mask[:, None]}
    return x, y, {**extras, **_media_inputs([e for row in rows for e in row])}


def _packed(examples: list[Example], order: list[int], block_size: int) -> list[list[Example]]:
    """Greedy first-fit in `order`: a new row starts when the next example does not fit."""
    rows, row, used = [], [], 0
    for i in order:
        n = len(examples[i][0])
        if row and used + n > block_size:
            rows.append(row)
            row, used = [], 0
        row.append(examples[i])
        used += n
    if row:
        rows.append(row)
    return rows


class ExampleBatches:
    """Endless shuffled fine-tuning batches; resumable, and split across DDP processes.

    Padded mode sorts each chunk of 50 global batches by length before cutting it into batches (so
    padding stays small) and shuffles the batch order. Packed mode fills rows of `block_size`.
    Every process builds the same global batch of `batch_size · world_size` rows and takes its slice.
    """

    def __init__(
        self,
        examples: list[Example],
        block_size: int,
        batch_size: int,
        pad_id: int,
        seed: int,
        pack: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not examples:
            raise OmnigptError("no training examples left")
        self.examples, self.block_size, self.batch_size = examples, block_size, batch_size
        self.pad_id, self.seed, self.pack = pad_id, seed, pack
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._epoch_batches: list[list] | None = None

    def _build_epoch(self) -> list[list]:
        """The global batches of the current epoch: lists of examples (padded) or of rows (packed)."""
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        G = self.batch_size * self.world_size
        if self.pack:
            units = _packed(self.examples, order, self.block_size)
        else:
            units = []
            chunk = G * 50
            for c in range(0, len(order), chunk):
                part = sorted(order[c : c + chunk], key=lambda i: len(self.examples[i][0]))
                units += [self.examples[i] for i in part]
        batches = [units[i : i + G] for i in range(0, len(units), G)]
        if len(batches) > 1 and len(batches[-1]) < G:
            batches.pop()  # every step sees a full global batch
        if not self.pack:
            rng.shuffle(batches)
        return batches

    def next_batch(self):
        if self._epoch_batches is None:
            self._epoch_batches = self._build_epoch()
        if self.cursor >= len(self._epoch_batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._epoch_batches = self._build_epoch()
        batch = self._epoch_batches[self.cursor]
        self.cursor += 1
        mine = batch[self.rank :: self.world_size]
        if self.pack:
            return pack_rows(mine, self.block_size, self.pad_id)
        return _pad_rows(mine, self.pad_id)

    def batches_per_epoch(self) -> int:
        return len(self._build_epoch())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._epoch_batches = None


def eval_batches(
    examples: list[Example],
    block_size: int,
    batch_size: int,
    pad_id: int,
    pack: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple]:
    """Every example once, in a fixed order (sorted by length when padded); processes split them."""
    if pack:
        rows = _packed(examples, list(range(len(examples))), block_size)[rank::world_size]
        for i in range(0, len(rows), batch_size):
            yield pack_rows(rows[i : i + batch_size], block_size, pad_id)
        return
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))[rank::world_size]
    for i in range(0, len(order), batch_size):
        yield _pad_rows([examples[j] for j in order[i : i + batch_size]], pad_id)


def media_loader(model, base_dir: Path) -> Callable[[dict], tuple[dict, dict]] | None:
    """For a multimodal model, what reads a record's images and audio (paths relative to base_dir)."""
    if not isinstance(model, MultimodalGPT):
        return None
    return functools.partial(
        record_media,
        base_dir=base_dir,
        vision=model.vision.config if model.vision else None,
        audio=model.audio.config if model.audio else None,
    )


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
    return [record["prompt"], record["completion"]]


def new_model(
    records: list[dict],
    model_cfg: ModelConfig,
    tokenizer_spec: str = "char",
    vision: str | None = None,
    audio: str | None = None,
) -> tuple[GPT | MultimodalGPT, Tokenizer]:
    """A randomly initialised model, with encoders as asked, and a tokenizer trained on the text of
    `records` ("char", or "bpe:VOCAB_SIZE"): for training on examples with nothing to start from."""
    texts = [t for r in records for t in record_texts(r)]
    if tokenizer_spec == "char":
        tokenizer = Tokenizer.train_char(texts)
    elif tokenizer_spec.startswith("bpe:") and tokenizer_spec[4:].isdigit():
        tokenizer = Tokenizer.train_bpe(texts, int(tokenizer_spec[4:]))
    else:
        raise OmnigptError(f"--tokenizer {tokenizer_spec!r}: use char or bpe:VOCAB_SIZE")
    cfg = ModelConfig(**{**model_cfg.to_dict(), "vocab_size": tokenizer.vocab_size})
    return add_encoders(GPT(cfg), tokenizer, vision, audio), tokenizer


# -- the entry point ------------------------------------------------------------------------------


def finetune(
    base: str | Path,
    data: str | Path,
    out_dir: str | Path,
    ft_cfg: FinetuneConfig,
    train_cfg: TrainConfig,
    val_data: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    resume_overrides: dict[str, Any] | None = None,
) -> RunResult:
    """Fine-tunes the model at `base` (an omnigpt run/checkpoint or Hugging Face GPT-2 folder) on the
    JSONL examples in `data`, into run folder `out_dir`.

    Validation examples come from `val_data`, or are a seeded random `val_fraction` of `data`. With
    `resume`, the model, data and settings come from the run folder (plus `resume_overrides`).
    """
    out_dir = Path(out_dir)
    if resume:
        if not (out_dir / "latest").is_dir():
            raise OmnigptError(f"{out_dir}: nothing to resume (no latest/ checkpoint)")
        saved = load_json(out_dir / "config.json")
        train_cfg = TrainConfig.from_dict({**saved["train"], **(resume_overrides or {})})
        ft_cfg = FinetuneConfig.from_dict(saved["finetune"])
        base, data, val_data = saved["base"], saved["data"], saved.get("val_data")
    elif (out_dir / "latest").exists() or (out_dir / "best").exists():
        raise OmnigptError(
            f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    records = read_records(data)
    val_records = read_records(val_data) if val_data else None
    dist_info = setup_distributed(train_cfg.device)
    if resume and ft_cfg.method != "lora":
        model, tokenizer = load_model(out_dir / "latest")
    else:
        model, tokenizer = load_model(base)
        merge_lora(model)  # a LoRA run as the base: its adapters become part of the weights
        model = add_encoders(model, tokenizer, ft_cfg.vision, ft_cfg.audio)
    model.train()
    pad_id = tokenizer.token_id(PAD)
    if pad_id is None:
        pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    block_size = model.config.block_size

    if val_records is None:
        order = list(range(len(records)))
        random.Random(train_cfg.seed).shuffle(order)
        n_val = max(1, math.ceil(len(records) * ft_cfg.val_fraction)) if len(records) > 1 else 0
        val_records = [records[i] for i in order[:n_val]] or records
        records = [records[i] for i in order[n_val:]] or records
    loader = media_loader(model, Path(data).parent)
    train_examples, train_stats = tokenize_records(
        tokenizer, records, block_size, ft_cfg.too_long, loader, ft_cfg.skip_bad_media
    )
    val_loader = media_loader(model, Path(val_data or data).parent)
    val_examples, val_stats = tokenize_records(
        tokenizer, val_records, block_size, ft_cfg.too_long, val_loader, ft_cfg.skip_bad_media
    )
    if not val_examples:
        raise OmnigptError(f"no validation example fits the context of {block_size} tokens")

    torch.manual_seed(train_cfg.seed)  # the same initial adapters on every process
    what = prepare_model(model, ft_cfg)
    extra: dict[str, Any] = {"finetune": ft_cfg.to_dict()}
    if ft_cfg.method == "lora":
        extra["base"] = str(Path(base).resolve()) if Path(base).exists() else str(base)
        extra["base_checksum"] = base_checksum(model, list(lora_layers(model)))
        if resume:
            saved_checksum = load_json(out_dir / "latest" / "config.json").get("base_checksum")
            if saved_checksum and not same_base(extra["base_checksum"], saved_checksum):
                raise OmnigptError(
                    f"{out_dir}: its base {base} has changed since the adapters were trained"
                )
            load_adapter_state(model, read_adapter(out_dir / "latest"), str(out_dir / "latest"))

    torch.manual_seed(train_cfg.seed + dist_info.rank)
    batches = ExampleBatches(
        train_examples,
        block_size,
        train_cfg.batch_size,
        pad_id,
        train_cfg.seed,
        ft_cfg.pack,
        dist_info.rank,
        dist_info.world_size,
    )

    if ft_cfg.epochs and not resume:
        per_epoch = batches.batches_per_epoch() / train_cfg.grad_accum
        train_cfg.max_steps = max(1, math.ceil(ft_cfg.epochs * per_epoch))

    def val_batches():
        return eval_batches(
            val_examples,
            block_size,
            train_cfg.batch_size,
            pad_id,
            ft_cfg.pack,
            dist_info.rank,
            dist_info.world_size,
        )

    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(model.describe())
        print(what)
        print(f"train: {train_stats}; validation: {val_stats}")
        if not resume:
            save_json(
                out_dir / "config.json",
                {
                    "model": model.config.to_dict(),
                    "train": train_cfg.to_dict(),
                    "finetune": ft_cfg.to_dict(),
                    "base": extra.get("base", str(base)),
                    "data": str(Path(data).resolve()),
                    "val_data": str(Path(val_data).resolve()) if val_data else None,
                    "tokenizer_fingerprint": tokenizer.fingerprint,
                },
            )
            tokenizer.save(out_dir)
    return fit(
        model,
        tokenizer,
        batches,
        val_batches,
        train_cfg,
        out_dir,
        dist_info,
        resume,
        progress,
        extra_config=extra,
    )
