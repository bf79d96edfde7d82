"""Typed configuration: the model's shape, the training run, named presets, JSON round-trip.

cfg = ModelConfig.from_preset("gpt2", vocab_size=50257)
cfg = ModelConfig.from_dict(json.loads(path.read_text()))
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


@dataclass
class ModelConfig:
    """The shape of a decoder-only GPT."""

    vocab_size: int = 50304
    block_size: int = 1024  # longest context, in tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    pos_encoding: PosEncoding = "learned"
    rope_theta: float = 10000.0
    mlp: MLPKind = "gelu"
    d_ff: int | None = (
        None  # hidden width of the MLP; None: 4·n_embd (gelu) or ≈8/3·n_embd (swiglu)
    )
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True  # biases in Linear layers and LayerNorm, as GPT-2
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix
    dropout: float = 0.0

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise OmnigptError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


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


@dataclass
class TrainConfig:
    """How a run trains. Budgets: stop at `max_steps`, or after `max_seconds`, whichever is first."""

    batch_size: int = 16  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_seconds: float | None = None
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3  # peak learning rate (AdamW, and Muon's non-matrix parameters)
    muon_lr: float = 0.02  # peak learning rate of Muon's matrix parameters
    min_lr_ratio: float = 0.1  # cosine decays to lr·min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 200  # steps between evaluations (and checkpoints)
    eval_batches: int = 20  # val batches per evaluation; 0 = the whole val split
    log_interval: int = 10
    seed: int = 1337
    compile: bool = False
    # auto: bf16 autocast where bf16 matmuls are native (CUDA; CPUs with AMX / AVX-512 BF16), else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    lr_scale: dict[str, float] = dataclasses.field(
        default_factory=dict
    )  # {"vision": 0.1}: per part

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def save_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OmnigptError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise OmnigptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
