"""The pieces a Transformer block is made of: norms, positional encodings, attention, KV cache.

Attention runs on `torch.nn.functional.scaled_dot_product_attention`, which picks flash or
memory-efficient kernels on GPU. The same module serves causal decoders and bidirectional encoders.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The original Transformer's fixed encoding: sin on even features, cos on odd. (n_positions, dim)"""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


def rope_tables(
    n_positions: int, head_size: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotary embedding, laid out for `rotate_half`: (n_positions, head_size) each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (i, i + hs/2) of x (B, nh, T, hs) by position-dependent angles (B|1, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated to `max_len`."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_size: int, device, dtype):
        shape = (batch, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, nh, T, hs) at positions start..start+T; returns all keys/values so far."""
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RowCache:
    """A view of a layer's KVCache for one forward pass in which each row of the batch (the first
    n rows of the cache) writes its T new tokens at its own positions `at`..`at`+T-1 (`at`: (n,)),
    and attends over the first `end` positions (the caller's mask says which of them are its own)."""

    def __init__(self, cache: KVCache, at: torch.Tensor, end: int):
        self.cache, self.at, self.end = cache, at, end

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        n, T = k.size(0), k.size(2)
        rows = torch.arange(n, device=k.device)[:, None]  # (n, 1)
        where = self.at[:, None] + torch.arange(T, device=k.device)  # (n, T)
        self.cache.k[rows, :, where] = k.transpose(1, 2)  # (n, T, nh, hs)
        self.cache.v[rows, :, where] = v.transpose(1, 2)
        return self.cache.k[:n, :, : self.end], self.cache.v[:n, :, : self.end]


def row_mask(starts: torch.Tensor, at: torch.Tensor, T: int, end: int) -> torch.Tensor:
    """(n, 1, T, end): new token t of row i sees cache positions starts[i] .. at[i] + t (its own
    prompt and what it made so far, causally), and nothing of the padding before starts[i]."""
    keys = torch.arange(end, device=at.device)[None, None]  # (1, 1, end)
    last = at[:, None, None] + torch.arange(T, device=at.device)[None, :, None]  # (n, T, 1)
    return ((keys >= starts[:, None, None]) & (keys <= last))[:, None]


def attention(
    q, k, v, mask: torch.Tensor | None, is_causal: bool, dropout_p: float
) -> torch.Tensor:
    """scaled_dot_product_attention; under CPU bf16 autocast it runs in fp32, which CPU kernels do
    several times faster than bf16 (unlike matmuls, which AMX speeds up)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(
                q.float(),
                k.float(),
                v.float(),
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=dropout_p,
            )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal for the decoder or bidirectional for encoders."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = causal
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v together
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, nh, start_pos + T, hs)

        is_causal = False
        if mask is None and self.causal and T > 1:
            if k.size(2) == T:
                is_causal = True
            else:  # a chunk appended to a cache: query i sees keys up to start_pos + i
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(start_pos)
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, is_causal, dropout)  # (B, nh, T, hs)
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Feed-forward layer: GELU (GPT-2) or SwiGLU (gate and up projections fused in one matmul)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.hidden_size
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = SelfAttention(cfg, causal=causal)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, mask=None, cache=None, start_pos=0):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, start_pos)
        return x + self.mlp(self.ln_2(x))
