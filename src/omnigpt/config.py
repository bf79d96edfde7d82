"""Typed configuration: the model's and encoders' shapes, the training run, fine-tuning and LoRA,
decoding options, the server's limits, named presets, JSON round-trip.

    cfg = ModelConfig.from_preset("gpt2", vocab_size=50257)
    cfg = ModelConfig.from_dict(json.loads(path.read_text()))
    train = TrainConfig(max_seconds=600, optimizer="muon")    # TrainConfig.finetuning() to adapt a model

Every field a user sets from the command line carries its help text; `cli.py` derives its flags
from them, so the command line and the Python API share one set of names, defaults and checks.
Unknown keys in a saved config are refused, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omnigpt.errors import OmnigptError

PosEncoding = Literal["learned", "sinusoidal", "rope"]
MLPKind = Literal["gelu", "swiglu"]
NormKind = Literal["layernorm", "rmsnorm"]


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with the help text its command-line flag shows (`cli.py` derives the flags)."""
    if isinstance(default, dict):
        return dataclasses.field(
            default_factory=lambda: dict(default), metadata={"help": help, **metadata}
        )
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelConfig:
    """The shape of a decoder-only GPT."""

    vocab_size: int = 50304
    block_size: int = _option(1024, "context length in tokens")
    n_layer: int = _option(12, "number of Transformer blocks")
    n_head: int = _option(12, "attention heads per block")
    n_embd: int = _option(768, "model width")
    pos_encoding: PosEncoding = _option("learned", "positional encoding")
    rope_theta: float = 10000.0
    mlp: MLPKind = _option("gelu", "feed-forward kind")
    # hidden width of the MLP; None: 4·n_embd (gelu) or ≈8/3·n_embd (swiglu)
    d_ff: int | None = None
    norm: NormKind = _option("layernorm", "normalisation kind")
    norm_eps: float = 1e-5
    bias: bool = True  # biases in Linear layers and LayerNorm, as GPT-2
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix
    dropout: float = _option(0.0, "dropout probability")
    image_positions: bool = _option(
        True, "learned row and column embeddings for image codes (when the model writes images)"
    )
    # the grid of image codes those embeddings cover, and the id of <|image_start|>: set from the
    # tokenizer's image codec when a model is built (`with_image_grid`); 0 for a text model
    image_rows: int = 0
    image_cols: int = 0
    image_start_id: int = 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise OmnigptError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.pos_encoding not in ("learned", "sinusoidal", "rope"):
            raise OmnigptError(f"unknown pos_encoding {self.pos_encoding!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise OmnigptError(f"unknown mlp {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise OmnigptError(f"unknown norm {self.norm!r}")
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise OmnigptError("rotary embedding needs an even head size")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # same parameter count as a 4x GELU MLP, rounded up to 64
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise OmnigptError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**_known_keys(cls, d, "model config"))

    def with_image_grid(self, rows: int, cols: int, start_id: int) -> ModelConfig:
        """This shape for a model writing images of rows × cols codes that start at `start_id`:
        with row and column embeddings for them when `image_positions`."""
        if not self.image_positions:
            rows = cols = start_id = 0
        return dataclasses.replace(self, image_rows=rows, image_cols=cols, image_start_id=start_id)


@dataclass
class EncoderConfig:
    """The Transformer blocks of a modality encoder (bidirectional, GELU MLP, LayerNorm)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise OmnigptError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )

    def block_config(self, positions: int) -> ModelConfig:
        """The blocks' shape, as the decoder's `Block` takes it, for `positions` input positions."""
        return ModelConfig(
            vocab_size=1,
            block_size=positions,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_spec(cls, spec: str):
        """A preset name with optional field overrides: "small", "small,n_layer=6,sample_rate=8000"."""
        name, *items = [part.strip() for part in spec.split(",")]
        if name not in ENCODER_PRESETS:
            raise OmnigptError(
                f"unknown encoder preset {name!r}; choose one of: {', '.join(ENCODER_PRESETS)}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = dict(ENCODER_PRESETS[name])
        for item in items:
            key, _, text = item.partition("=")
            key = key.strip()
            if key not in fields or not text:
                raise OmnigptError(
                    f"{spec!r}: {item!r} is not FIELD=VALUE with FIELD one of: {', '.join(fields)}"
                )
            kind = type(fields[key].default)
            try:
                values[key] = kind(text)
            except ValueError:
                raise OmnigptError(f"{spec!r}: {key} must be {kind.__name__}") from None
        return cls(**values)


# Encoder shapes by name, for `--vision` / `--audio`; any field can be overridden after a comma.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64),
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    "base": dict(n_layer=6, n_head=8, n_embd=256),
}


@dataclass
class VisionConfig(EncoderConfig):
    """A Vision Transformer: images resized to `image_size`², cut into `patch_size`² patches."""

    image_size: int = 64
    patch_size: int = 8
    shuffle: int = 2  # the projector merges shuffle × shuffle neighbouring patches into one token
    # how patches are embedded: "patch", one strided convolution (ViT); "conv", a stack of stride-2
    # 3×3 convolutions (Xiao et al., 2021), which sees shapes and edges with far less data
    stem: str = "patch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stem not in ("patch", "conv"):
            raise OmnigptError(f"stem must be 'patch' or 'conv', not {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise OmnigptError(
                f"a conv stem needs a power-of-two patch_size, not {self.patch_size}"
            )
        if self.image_size % self.patch_size:
            raise OmnigptError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.grid % self.shuffle:
            raise OmnigptError(
                f"the {self.grid}×{self.grid} patch grid does not divide by shuffle {self.shuffle}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # patches per side

    @property
    def tokens(self) -> int:
        """Decoder tokens per image, after the projector's pixel shuffle."""
        return (self.grid // self.shuffle) ** 2

    def encoder_config(self) -> ModelConfig:
        return self.block_config(self.grid**2)


@dataclass
class AudioConfig(EncoderConfig):
    """A Whisper-style audio encoder over log-mel frames.

    Audio is resampled to `sample_rate`; one mel frame every `hop_length` samples (10 ms at 16 kHz);
    the convolutional stem halves the frame rate (20 ms per encoder position), and the projector
    stacks `stack` positions into one decoder token (40 ms per audio token by default).
    """

    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms window at 16 kHz
    hop_length: int = 160  # 10 ms
    n_mels: int = 80
    max_seconds: float = 10.0  # longest clip the position table covers
    stack: int = 2
    ctc: float = 0.0  # weight of an auxiliary CTC loss on the encoder, for transcripts (0: none)
    # SpecAugment, in training only: per clip, two bands of up to `mask_mels` mel channels and two
    # spans of up to `mask_frames` frames are set to the clip's mean (0: no masking)
    mask_mels: int = 0
    mask_frames: int = 0

    @property
    def max_frames(self) -> int:
        """Mel frames in `max_seconds` of audio."""
        return int(self.max_seconds * self.sample_rate) // self.hop_length + 1

    def positions(self, frames: int) -> int:
        """Encoder positions for `frames` mel frames (the stem's second convolution has stride 2)."""
        return (frames + 1) // 2

    def tokens(self, frames: int) -> int:
        """Decoder tokens for `frames` mel frames, after frame stacking."""
        return -(-self.positions(frames) // self.stack)

    def encoder_config(self) -> ModelConfig:
        return self.block_config(self.positions(self.max_frames))


# Tiny presets train on a laptop CPU in minutes; the gpt2* presets are GPT-2's published shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "small": dict(n_layer=8, n_head=8, n_embd=512, block_size=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}


UNLIMITED_STEPS = 10**9  # a step budget that never binds: the time budget decides
DEFAULT_MAX_STEPS = 1000  # the step budget of a run given no budget at all


def parse_lr_scale(text: str) -> dict[str, float]:
    """ "vision=0.1,image_proj=2" → {"vision": 0.1, "image_proj": 2.0}."""
    scales = {}
    for item in filter(None, text.split(",")):
        name, _, factor = item.partition("=")
        try:
            scales[name.strip()] = float(factor)
        except ValueError:
            raise OmnigptError(f"lr_scale: {item!r} is not NAME=FACTOR") from None
    return scales


@dataclass
class TrainConfig:
    """How a run trains. Budgets: stop at `max_steps`, or after `max_seconds`, whichever is first;
    with only `max_seconds` the time decides alone, with neither the run takes 1000 steps."""

    batch_size: int = _option(16, "sequences per micro-batch per process")
    grad_accum: int = _option(1, "micro-batches per optimizer step")
    max_steps: int | None = _option(
        None,
        f"stop after this many optimizer steps (default {DEFAULT_MAX_STEPS}; none with --max-seconds)",
    )
    max_seconds: float | None = _option(
        None, "stop after this much training time (the LR schedule fits it)"
    )
    optimizer: Literal["adamw", "muon"] = _option(
        "adamw", "adamw, or muon (Muon for the blocks' weight matrices, AdamW for the rest)"
    )
    lr: float = _option(1e-3, "peak learning rate (AdamW parameters)")
    muon_lr: float = _option(0.02, "peak learning rate of Muon's matrices")
    min_lr_ratio: float = _option(0.1, "final LR as a fraction of the peak (cosine decay)")
    warmup_steps: int = _option(50, "linear warmup steps")
    weight_decay: float = _option(0.1, "decoupled weight decay (matrices and embeddings only)")
    beta1: float = _option(0.9, "AdamW's first-moment decay")
    beta2: float = _option(0.95, "AdamW's second-moment decay")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: off)")
    eval_interval: int = _option(200, "steps between evaluations and checkpoints")
    eval_batches: int = _option(20, "val batches per evaluation (0: all)")
    log_interval: int = _option(10, "steps between metrics.jsonl records")
    seed: int = _option(1337, "random seed (data order, initialisation)")
    compile: bool = _option(False, "compile the model with torch.compile")
    strategy: Literal["ddp", "fsdp"] = _option(
        "ddp",
        "under torchrun: ddp (a whole copy of the model and its optimizer state per process) or "
        "fsdp (parameters, gradients and optimizer state sharded across the processes)",
    )
    activation_checkpointing: bool = _option(
        False,
        "recompute each block's activations in the backward pass (less memory, ~1/3 more compute)",
    )
    precision: Literal["auto", "fp32", "bf16"] = _option(
        "auto",
        "auto: bf16 autocast where bf16 is native (CUDA; CPUs with AMX or AVX-512 BF16), fp32 "
        "elsewhere; bf16 on other CPUs works but is emulated and slow",
    )
    device: str = _option("auto", "auto, cpu, cuda, cuda:N")
    early_stop_patience: int = _option(0, "stop after N evaluations without improvement (0: never)")
    lr_scale: dict[str, float] = _option(
        {},
        "per-part learning rates: name-prefix=factor pairs, e.g. vision=0.1,image_proj=2",
        parse=parse_lr_scale,
    )

    def __post_init__(self) -> None:
        if self.max_steps is None:
            self.max_steps = UNLIMITED_STEPS if self.max_seconds else DEFAULT_MAX_STEPS
        at_least = {
            "batch_size": 1,
            "grad_accum": 1,
            "max_steps": 1,
            "warmup_steps": 0,
            "eval_interval": 1,
            "eval_batches": 0,
            "log_interval": 1,
            "early_stop_patience": 0,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                _invalid(name, f"must be at least {low}", getattr(self, name))
        for name in ("lr", "muon_lr"):
            if not getattr(self, name) > 0:
                _invalid(name, "must be positive", getattr(self, name))
        if self.max_seconds is not None and not self.max_seconds > 0:
            _invalid("max_seconds", "must be positive", self.max_seconds)
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                _invalid(name, "must not be negative", getattr(self, name))
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                _invalid(name, "must be between 0 and 1", getattr(self, name))
        if self.optimizer not in ("adamw", "muon"):
            _invalid("optimizer", "must be adamw or muon", self.optimizer)
        if self.strategy not in ("ddp", "fsdp"):
            _invalid("strategy", "must be ddp or fsdp", self.strategy)
        if self.precision not in ("auto", "fp32", "bf16"):
            _invalid("precision", "must be auto, fp32 or bf16", self.precision)

    @classmethod
    def finetuning(cls, **overrides: Any) -> TrainConfig:
        """The defaults for adapting a trained model (`FINETUNING_DEFAULTS`), then `overrides`."""
        return cls(**{**FINETUNING_DEFAULTS, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_known_keys(cls, d, "training config"))


# Adapting a trained model: a lower peak LR, a short warmup, the whole validation set at every
# evaluation, and early stopping after 5 evaluations without a new best.
FINETUNING_DEFAULTS: dict[str, Any] = dict(
    lr=3e-4, warmup_steps=20, eval_interval=100, eval_batches=0, early_stop_patience=5
)


def _invalid(name: str, problem: str, value: Any) -> None:
    flag = "--" + name.replace("_", "-")
    raise OmnigptError(f"{name} ({flag}) {problem}, not {value!r}")


def _known_keys(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    """`d`, refused with the names of any keys that are no field of `cls`."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise OmnigptError(f"unknown {what} keys: {', '.join(sorted(unknown))}")
    return dict(d)


DEFAULT_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every Linear in the Transformer blocks


@dataclass
class LoRAConfig:
    """Low-rank adapters: which Linear layers get them, their rank and scale (`lora.py`)."""

    rank: int = _option(8, "LoRA rank")
    alpha: float = _option(16.0, "LoRA scale numerator (the update is scaled by alpha / rank)")
    dropout: float = _option(0.0, "LoRA input dropout")
    targets: tuple[str, ...] = _option(
        DEFAULT_LORA_TARGETS,
        "comma-separated Linear layer names to adapt (c_attn, c_proj, c_fc, attn.c_proj, ...)",
    )

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise OmnigptError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise OmnigptError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass
class FinetuneConfig:
    """What to adapt and how examples become batches (`finetune.py`)."""

    method: Literal["full", "partial", "lora"] = _option(
        "full",
        "full: every weight; partial: only --trainable / --last-blocks; lora: low-rank adapters",
    )
    trainable: tuple[str, ...] = _option(
        (), "partial: comma-separated parameter names, prefixes or globs (e.g. h.5,ln_f,lm_head)"
    )
    last_blocks: int = _option(0, "partial: also train the last N Transformer blocks")
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    pack: bool = _option(
        False, "pack several examples per row (no attention between them) instead of padding"
    )
    too_long: Literal["truncate", "drop"] = _option(
        "truncate", "examples longer than the context: cut their end, or leave them out"
    )
    epochs: float | None = _option(None, "passes over the training examples (sets --max-steps)")
    val_fraction: float = _option(
        0.05, "share of --data held out for validation when no --val-data is given"
    )
    skip_bad_media: bool = _option(
        False,
        "leave out examples whose image or audio file is missing or unreadable (default: stop)",
    )
    vision: str | None = _option(
        None,
        f"attach a new image encoder: {', '.join(ENCODER_PRESETS)}, optionally with overrides "
        "(small,image_size=96,patch_size=8)",
        metavar="SPEC",
    )
    audio: str | None = _option(
        None,
        f"attach a new audio encoder: {', '.join(ENCODER_PRESETS)}, optionally with overrides "
        "(small,sample_rate=8000,n_fft=200,hop_length=80)",
        metavar="SPEC",
    )

    drop_condition: float = _option(
        0.1,
        "share of text→image examples also trained without their prompt, so the model draws "
        "unconditionally too and --cfg guidance works",
    )

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
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
        if not 0 <= self.val_fraction < 1:
            _invalid("val_fraction", "must be in [0, 1)", self.val_fraction)
        if self.epochs is not None and not self.epochs > 0:
            _invalid("epochs", "must be positive", self.epochs)
        if not 0 <= self.drop_condition < 1:
            _invalid("drop_condition", "must be in [0, 1)", self.drop_condition)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "lora"}
        d["trainable"] = list(self.trainable)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        d = _known_keys(cls, d, "fine-tuning config")
        d["lora"] = LoRAConfig(**_known_keys(LoRAConfig, d.get("lora", {}), "LoRA config"))
        return cls(**d)


@dataclass
class ImageTokensConfig:
    """How the images a model writes become tokens (`pixels.ImageCodec`): for prepared image data,
    or a new model trained on text→image examples."""

    image_size: int = _option(32, "pixels per side images are resized to")
    palette: str = _option(
        "16",
        "colours (or patch codes) per image token: a number to fit by k-means on the training images, "
        "a JSON file of [r, g, b] colours, or #rrggbb,#rrggbb,... colours",
    )
    patch: int = _option(
        1, "pixels per side of one image token: 1, a colour per pixel; 2, codes of 2×2 patches, ..."
    )

    def __post_init__(self) -> None:
        if self.image_size < 1:
            _invalid("image_size", "must be at least 1", self.image_size)
        if self.patch < 1 or self.image_size % self.patch:
            _invalid("patch", f"must divide --image-size ({self.image_size})", self.patch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate.py` decodes: length, sampling, stopping. 0 temperature means greedy."""

    max_new_tokens: int = _option(128, "longest answer, in tokens")
    temperature: float = _option(1.0, "sampling temperature (0: greedy)")
    top_k: int | None = _option(None, "sample among the k most likely tokens")
    top_p: float | None = _option(
        None, "sample among the most likely tokens holding this much probability"
    )
    repetition_penalty: float = _option(1.0, "> 1 discourages repeating tokens")
    stop_at_eot: bool = True
    stop_strings: tuple[str, ...] = ()
    num_samples: int = _option(1, "completions per prompt")
    seed: int | None = _option(None, "random seed for sampling")
    token_healing: bool = True  # re-choose the prompt's last token (see Tokenizer.heal)
    ctc_weight: float = _option(
        0.0,
        "joint CTC/attention decoding for a model trained with ctc=WEIGHT in --audio: the CTC "
        "head's share of each token's score, 0 to 1 (0.5 is a good start; 0: the decoder alone)",
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise OmnigptError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise OmnigptError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise OmnigptError("top_k must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OmnigptError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise OmnigptError("repetition_penalty must be > 0")
        if self.num_samples < 1:
            raise OmnigptError("num_samples must be at least 1")
        if not 0 <= self.ctc_weight < 1:
            raise OmnigptError("ctc_weight must be in [0, 1)")


@dataclass
class ServeConfig:
    """How `omnigpt serve` listens and what it accepts (see `server.py`)."""

    host: str = _option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _option(8000, "port to listen on")
    name: str | None = _option(
        None, "the model's name in the API (default: the model folder's name)"
    )
    api_key: str | None = _option(
        None, "require 'Authorization: Bearer KEY' on every /v1 request", metavar="KEY"
    )
    max_running: int = _option(16, "sequences decoded together (the batch); more wait")
    max_waiting: int = _option(64, "requests that may wait; beyond them the answer is 503")
    max_body_mb: float = _option(16.0, "largest request body in MB (413 beyond)")
    max_image_pixels: int = _option(4096 * 4096, "largest image a message may hold, in pixels")

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise OmnigptError("max_running must be at least 1")
        if self.max_waiting < 0:
            raise OmnigptError("max_waiting must be 0 or more")
        if self.max_body_mb <= 0 or self.max_image_pixels <= 0:
            raise OmnigptError("max_body_mb and max_image_pixels must be positive")


def save_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OmnigptError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise OmnigptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
