"""Fusion: projectors that map encoder features to the decoder's width, the splice that puts them
at the placeholder tokens of the text, and `MultimodalGPT`, the decoder with its encoders.

    image_tokens = Projector(128, 256, reduce=4)(pixel_shuffle(features, 2))   # (B, 16, 256)
    embeds = splice(model.wte(tokens), tokens, IMAGE_ID, image_tokens.flatten(0, 1))

Each image or clip is written in the text as as many placeholder ids as it has tokens (see
`VisionConfig.tokens`, `AudioConfig.tokens`); `splice` fills them, in order of appearance, row by row.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import AudioConfig, VisionConfig
from omnigpt.errors import OmnigptError
from omnigpt.model.audio import AudioEncoder
from omnigpt.model.gpt import GPT, image_code_index
from omnigpt.model.vision import VisionEncoder


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Merges each factor × factor square of patches into one token: (B, g², C) → (B, (g/f)², C·f²)."""
    B, N, C = x.shape
    g = int(N**0.5)
    x = x.view(B, g // factor, factor, g // factor, factor, C)  # (B, gy, fy, gx, fx, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gy, gx, fy, fx, C)
    return x.reshape(B, (g // factor) ** 2, factor * factor * C)


def stack_frames(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Concatenates each run of `factor` positions (zero-padding the end): (B, T, C) → (B, ⌈T/f⌉, C·f)."""
    B, T, C = x.shape
    x = F.pad(x, (0, 0, 0, (-T) % factor))
    return x.reshape(B, -1, factor * C)


class Projector(nn.Module):
    """A two-layer MLP from reduced encoder features (in_dim · reduce) to the decoder width."""

    def __init__(self, in_dim: int, out_dim: int, reduce: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(in_dim * reduce, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        nn.init.normal_(self.fc2.weight, std=0.02)  # outputs on the scale of token embeddings
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def splice(
    embeds: torch.Tensor, tokens: torch.Tensor, placeholder_id: int, media: torch.Tensor
) -> torch.Tensor:
    """Token embeddings (B, T, C) with the positions where `tokens` == placeholder_id replaced, in
    row-major order, by the rows of `media` (N, C). Raises unless there are exactly N placeholders."""
    where = tokens == placeholder_id
    n = int(where.sum())
    if n != media.size(0):
        raise OmnigptError(
            f"{n} placeholder tokens in the text but {media.size(0)} media embeddings to put there"
        )
    if n == 0:
        return embeds
    out = embeds.clone()
    out[where] = media.to(out.dtype)
    return out


class MultimodalGPT(nn.Module):
    """A GPT that reads images and audio: each modality's encoder and projector feed embeddings into
    the decoder at that modality's placeholder tokens.

        model = MultimodalGPT(gpt, VisionConfig(), AudioConfig(), image_id=2, audio_id=3)
        logits, loss = model(tokens, targets, images=images, mel=mel, frames=frames)

    `images` (N, 3, S, S) are the images of the whole batch in order of appearance; `mel`
    (M, n_mels, T) and `frames` (M,) the clips. A text-only call (decoding with the KV cache after a
    prompt's media were read) costs what the plain GPT costs.
    """

    # set when processes train together (DDP, FSDP): each of them must use every weight in every
    # training pass, whatever media its own batch holds (see `_idle_parts`)
    every_part_each_pass = False

    def __init__(
        self,
        gpt: GPT,
        vision: VisionConfig | None,
        audio: AudioConfig | None,
        image_id: int,
        audio_id: int,
    ):
        super().__init__()
        self.gpt = gpt
        self.image_id, self.audio_id = image_id, audio_id
        width = gpt.config.n_embd
        self.vision = VisionEncoder(vision) if vision else None
        self.image_proj = Projector(vision.n_embd, width, vision.shuffle**2) if vision else None
        self.audio = AudioEncoder(audio) if audio else None
        self.audio_proj = Projector(audio.n_embd, width, audio.stack) if audio else None
        # hybrid CTC/attention (Kim et al., 2017): a CTC head on the encoder, in training only,
        # teaches it where each transcript token sounds, so the decoder learns to find them fast
        self.audio_ctc = (
            nn.Linear(audio.n_embd, gpt.config.vocab_size) if audio and audio.ctc else None
        )

    def media_config(self) -> dict:
        """What a checkpoint records to rebuild the encoders (see `from_media_config`)."""
        return {
            "vision": self.vision.config.to_dict() if self.vision else None,
            "audio": self.audio.config.to_dict() if self.audio else None,
            "image_id": self.image_id,
            "audio_id": self.audio_id,
        }

    @classmethod
    def from_media_config(cls, gpt: GPT, d: dict) -> MultimodalGPT:
        vision = VisionConfig(**d["vision"]) if d.get("vision") else None
        audio = AudioConfig(**d["audio"]) if d.get("audio") else None
        return cls(gpt, vision, audio, d["image_id"], d["audio_id"])

    # the decoder's interface, for generation
    @property
    def config(self):
        return self.gpt.config

    @property
    def wte(self) -> nn.Embedding:
        return self.gpt.wte

    def make_caches(self, *args, **kwargs):
        return self.gpt.make_caches(*args, **kwargs)

    def describe(self) -> str:
        parts = [self.gpt.describe()]
        for name, encoder in (("image", self.vision), ("audio", self.audio)):
            if encoder is not None:
                c = encoder.config
                n = sum(p.numel() for p in encoder.parameters())
                parts.append(
                    f"{name} encoder {c.n_layer} layers × {c.n_embd} wide: {n / 1e6:.2f}M parameters"
                )
        return "; ".join(parts)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder-width tokens (N · VisionConfig.tokens, C) of images (N, 3, S, S)."""
        if self.vision is None:
            raise OmnigptError("this model has no image encoder")
        features = pixel_shuffle(self.vision(images), self.vision.config.shuffle)
        return self.image_proj(features).flatten(0, 1)

    def audio_tokens(self, mel: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Decoder-width tokens of clips (M, n_mels, T) with lengths `frames` (M,): each clip's own
        AudioConfig.tokens(frames) rows, concatenated."""
        return self._audio_tokens(self._audio_features(mel, frames), frames)

    def _audio_features(self, mel: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if self.audio is None:
            raise OmnigptError("this model has no audio encoder")
        return self.audio(mel, frames)  # (M, T', C)

    def _audio_tokens(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        cfg = self.audio.config
        tokens = self.audio_proj(stack_frames(features, cfg.stack))  # (M, T'', C)
        return torch.cat([t[: cfg.tokens(int(n))] for t, n in zip(tokens, frames, strict=True)])

    def ctc_loss(
        self,
        features: torch.Tensor,
        frames: torch.Tensor,
        targets: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """CTC loss of encoder features (M, T', C) against each clip's transcript token ids
        (`targets`, concatenated; `lengths` (M,)). The blank is the audio placeholder id, which
        never occurs in text."""
        return F.ctc_loss(
            self._ctc_log_probs(features).transpose(0, 1),  # (T', M, V)
            targets,
            self.audio.config.positions(frames),
            lengths,
            blank=self.audio_id,
            zero_infinity=True,
        )

    def ctc_log_probs(self, mel: torch.Tensor, frames: torch.Tensor) -> list[torch.Tensor]:
        """The CTC head's per-position log-probabilities of each clip (M, n_mels, T): a list of
        (positions, V), cut to each clip's length (for joint CTC/attention decoding)."""
        if self.audio_ctc is None:
            raise OmnigptError("this model has no CTC head: train it with ctc=WEIGHT in --audio")
        log_probs = self._ctc_log_probs(self._audio_features(mel, frames))
        lengths = self.audio.config.positions(frames).tolist()
        return [lp[:n] for lp, n in zip(log_probs, lengths, strict=True)]

    def _ctc_log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(M, T', V) in float32 (also under autocast) from encoder features (M, T', C)."""
        return self.audio_ctc(features).float().log_softmax(-1)

    def embed(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None = None,
        mel: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, C) with every image and clip spliced in at its placeholders.

        Without media, placeholders keep their plain token embedding (a decode step never brings
        new media); with media, their count must match the placeholders exactly."""
        return self._embed(tokens, images, mel, frames)[0]

    def _embed(self, tokens, images, mel, frames) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings, and the audio encoder's features (for the CTC loss) when there are clips."""
        x = self.gpt.wte(tokens)
        features = None
        if images is not None:
            x = splice(x, tokens, self.image_id, self.image_tokens(images))
        if mel is not None:
            frames = _lengths(mel, frames)
            features = self._audio_features(mel, frames)
            x = splice(x, tokens, self.audio_id, self._audio_tokens(features, frames))
        return x, features

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        mel: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        ctc_targets: torch.Tensor | None = None,
        ctc_lengths: torch.Tensor | None = None,
        **decoder_kwargs,
    ):
        """As GPT.forward, with the media of the batch; `decoder_kwargs` are GPT.forward's
        (positions, attn_mask, caches, start_pos, last_only). In training, given the clips'
        transcripts (`ctc_targets`, `ctc_lengths`) and AudioConfig.ctc > 0, the loss adds that
        weight times the encoder's CTC loss."""
        x, features = self._embed(tokens, images, mel, frames)
        if self.training and self.every_part_each_pass:
            x = x + self._idle_parts(x, images is None, features, ctc_targets is None)
        if self.gpt.config.image_rows and decoder_kwargs.get("image_index") is None:
            decoder_kwargs["image_index"] = image_code_index(tokens, self.gpt.config)
        logits, loss = self.gpt(embeddings=x, targets=targets, **decoder_kwargs)
        if (
            self.audio_ctc is not None
            and self.training
            and loss is not None
            and features is not None
            and ctc_targets is not None
        ):
            ctc = self.ctc_loss(features, _lengths(mel, frames), ctc_targets, ctc_lengths)
            loss = loss + self.audio.config.ctc * ctc
        return logits, loss

    def _idle_parts(self, x, no_images: bool, features, no_ctc: bool) -> torch.Tensor:
        """Zero, computed from every encoder, projector and head this batch leaves out, run on a
        blank input: their gradients are then zero instead of missing, as processes that average
        (DDP) or reduce-scatter (FSDP) gradients together need. (An optimizer then steps them too,
        where one process alone would skip them for a step without their media.)"""
        zero, ctc_used = x.new_zeros(()), features is not None and not no_ctc
        if no_images and self.vision is not None:
            size = self.vision.config.image_size
            zero = zero + self.image_tokens(x.new_zeros(1, 3, size, size)).sum()
        if features is None and self.audio is not None:
            n = 2 * self.audio.config.stack  # a clip of one decoder token
            frames = torch.tensor([n], device=x.device)
            features = self._audio_features(x.new_zeros(1, self.audio.config.n_mels, n), frames)
            zero = zero + self._audio_tokens(features, frames).sum()
        if self.audio_ctc is not None and not ctc_used:
            zero = zero + self.audio_ctc(features).sum()
        return 0.0 * zero


def _lengths(mel: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """Each clip's frame count: `frames`, or all of `mel`'s when not given."""
    if frames is not None:
        return frames
    return torch.full((mel.size(0),), mel.size(-1), device=mel.device)


def attach_encoders(
    model: GPT | MultimodalGPT,
    vision: VisionConfig | None,
    audio: AudioConfig | None,
    image_id: int,
    audio_id: int,
) -> MultimodalGPT:
    """`model` with new, randomly initialised encoders and projectors for the modalities given: a
    text GPT becomes a MultimodalGPT; a MultimodalGPT gains the modalities it lacks (adding one it
    already has is refused, as that would throw its trained encoder away)."""
    if not isinstance(model, MultimodalGPT):
        return MultimodalGPT(model, vision, audio, image_id, audio_id).to(model.wte.weight.device)
    if (vision and model.vision) or (audio and model.audio):
        raise OmnigptError("the model already has an encoder for that modality")
    grown = MultimodalGPT(model.gpt, vision, audio, model.image_id, model.audio_id)
    for part in ("vision", "image_proj", "audio", "audio_proj", "audio_ctc"):  # the trained parts
        if getattr(model, part) is not None:
            setattr(grown, part, getattr(model, part))
    return grown.to(model.gpt.wte.weight.device)
