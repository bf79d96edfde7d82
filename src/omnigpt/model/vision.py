"""The image encoder: a Vision Transformer over fixed-size patches, reusing the decoder's blocks.

    encoder = VisionEncoder(VisionConfig())
    features = encoder(images)        # (B, 3, 64, 64) in [-1, 1] → (B, 64 patches, 128)

Patches are embedded by one strided convolution (`stem="patch"`), or by a small stack of stride-2
3×3 convolutions (`stem="conv"`, "Early convolutions help transformers see better", Xiao et al.,
2021), get a learned position embedding, then pass through bidirectional Transformer blocks (the
decoder's `Block` with causal=False) and a final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from omnigpt.config import VisionConfig
from omnigpt.model.attention import Block, make_norm


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """log2(patch_size) stride-2 3×3 convolutions with GELU, widening to n_embd, then a 1×1
    convolution: one n_embd vector per patch_size² patch, as the single strided convolution gives."""
    stages = cfg.patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    channels = 3
    for i in range(stages):
        out = max(cfg.n_embd >> (stages - 1 - i), 8)  # n_embd/4, /2, /1 for 8-pixel patches
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, cfg.n_embd, 1))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        block_cfg = cfg.encoder_config()
        if cfg.stem == "conv":
            self.patch_embed = conv_stem(cfg)
        else:
            self.patch_embed = nn.Conv2d(
                3, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size
            )
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2, cfg.n_embd) * 0.02)
        self.blocks = nn.ModuleList([Block(block_cfg, causal=False) for _ in range(cfg.n_layer)])
        self.norm = make_norm(block_cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, grid², n_embd), row-major over the patch grid."""
        x = self.patch_embed(images)  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid², C)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
