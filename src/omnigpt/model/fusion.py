"""Fusion: projectors that map encoder features to the decoder's width, and the splice that puts
them at the placeholder tokens of the text.

    image_tokens = Projector(128, 256, reduce=4)(pixel_shuffle(features, 2))   # (B, 16, 256)
    embeds = splice(model.wte(tokens), tokens, IMAGE_ID, image_tokens.flatten(0, 1))

Each image or clip is written in the text as as many placeholder ids as it has tokens (see
`VisionConfig.tokens`, `AudioConfig.tokens`); `splice` fills them, in order of appearance, row by row.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.errors import OmnigptError


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
