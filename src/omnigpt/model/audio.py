"""The audio encoder, as Whisper's: log-mel frames → two convolutions (then a norm, which puts their
output on the scale of the positions) → sinusoidal positions → bidirectional Transformer blocks (the
decoder's `Block` with causal=False) → LayerNorm.

    encoder = AudioEncoder(AudioConfig())
    features = encoder(mel, frames)   # (B, n_mels, T) and true lengths (B,) → (B, ceil(T/2), n_embd)

The second convolution has stride 2, so one encoder position covers two mel frames (20 ms at the
default 10 ms hop). Padded frames of shorter clips in a batch are hidden from attention. In training,
`mask_mels` / `mask_frames` turn on SpecAugment's frequency and time masks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import AudioConfig
from omnigpt.model.attention import Block, make_norm, sinusoidal_table


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        block_cfg = cfg.encoder_config()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_embd, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_embd, cfg.n_embd, kernel_size=3, stride=2, padding=1)
        self.stem_norm = make_norm(block_cfg)
        self.register_buffer(
            "pos_table", sinusoidal_table(block_cfg.block_size, cfg.n_embd), persistent=False
        )
        self.blocks = nn.ModuleList([Block(block_cfg, causal=False) for _ in range(cfg.n_layer)])
        self.norm = make_norm(block_cfg)

    def forward(self, mel: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, ceil(T/2), n_embd) of log-mel frames (B, n_mels, T); `frames` (B,) gives each
        clip's true length when the batch is padded."""
        if self.training and (self.config.mask_mels or self.config.mask_frames):
            mel = spec_augment(mel, frames, self.config.mask_mels, self.config.mask_frames)
        x = F.gelu(self.conv1(mel))  # (B, C, T)
        if frames is not None:  # zero past each clip's end, as the convolution's own padding is
            x = x * (torch.arange(x.size(-1), device=x.device)[None] < frames[:, None])[:, None]
        x = self.stem_norm(F.gelu(self.conv2(x)).transpose(1, 2))  # (B, T', C)
        T = x.size(1)
        if T > self.pos_table.size(0):
            raise ValueError(
                f"{mel.size(-1)} mel frames exceed the encoder's {self.config.max_seconds:g} s"
            )
        x = x + self.pos_table[:T]
        mask = None
        if frames is not None:
            positions = self.config.positions(frames)  # per clip
            valid = torch.arange(T, device=x.device)[None] < positions[:, None]
            mask = valid[:, None, None, :]  # (B, 1, 1, T'): every position sees the valid ones
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x)


def spec_augment(
    mel: torch.Tensor, frames: torch.Tensor | None, max_mels: int, max_frames: int, n_masks: int = 2
) -> torch.Tensor:
    """SpecAugment's masks (Park et al., 2019) on log-mel clips (B, n_mels, T): in each clip,
    `n_masks` bands of 0..max_mels channels and `n_masks` spans of 0..max_frames frames (within the
    clip's true length) are set to the clip's mean. Each mask's width and start are uniform."""
    B, n_mels, T = mel.shape
    lengths = torch.full((B,), T, device=mel.device) if frames is None else frames.to(mel.device)
    valid = torch.arange(T, device=mel.device)[None] < lengths[:, None]  # (B, T)
    mean = (mel * valid[:, None]).sum((1, 2)) / (lengths * n_mels)  # (B,)
    masked = torch.zeros_like(mel, dtype=torch.bool)

    def spans(size: torch.Tensor, extent: int, width: int) -> torch.Tensor:  # (B, extent) bool
        w = (torch.rand(B, n_masks, device=mel.device) * (width + 1)).floor()
        start = (
            torch.rand(B, n_masks, device=mel.device) * (size[:, None] - w + 1).clamp(min=1)
        ).floor()
        idx = torch.arange(extent, device=mel.device)[None, None]
        return ((idx >= start[..., None]) & (idx < (start + w)[..., None])).any(1)

    if max_mels:
        masked |= spans(torch.full((B,), n_mels, device=mel.device), n_mels, max_mels)[:, :, None]
    if max_frames:
        masked |= spans(lengths, T, max_frames)[:, None, :]
    masked &= valid[:, None]  # padding stays as it was
    return torch.where(masked, mean[:, None, None].to(mel.dtype), mel)
