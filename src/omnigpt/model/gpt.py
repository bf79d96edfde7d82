"""The decoder-only GPT: embeddings, a stack of Transformer blocks, a final norm and the LM head.

    model = GPT(ModelConfig.from_preset("micro", vocab_size=tok.vocab_size))
    _, loss = model(tokens, targets)               # training: mean loss over targets (no logits)
    logits, _ = model(tokens)                      # (B, T) ids → (B, T, V)
    logits, _ = model(embeddings=x)                # ready-made input embeddings (B, T, C)
    caches = model.make_caches(B, max_len)         # incremental decoding
    logits, _ = model(tokens, caches=caches, start_pos=p)

Positions default to 0..T-1 after `start_pos`; a batch of left-padded prompts passes its own
`positions` (B, T) and a boolean `attn_mask` (B, 1, T, start_pos + T), True where attention is allowed.

A model that writes images (`config.image_rows` > 0) also adds a learned row and column embedding to
each image code: the k-th token after `<|image_start|>` sits at row k // cols, column k % cols. The
places are found in `tokens`; a decoding step that feeds one code passes its `image_index` (B, 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import ModelConfig
from omnigpt.model.attention import Block, KVCache, make_norm, rope_tables, sinusoidal_table
from omnigpt.tokenizer import IGNORE_INDEX


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.image_rows:  # 2-D positions of image codes, on top of the sequence positions
            self.wrow = nn.Embedding(cfg.image_rows, cfg.n_embd)
            self.wcol = nn.Embedding(cfg.image_cols, cfg.n_embd)
        self.make_position_tables()
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down so the residual stream's variance stays put with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def make_position_tables(self, device=None) -> None:
        """(Re)computes the fixed sinusoidal or rotary tables: buffers that are computed, never saved."""
        cfg = self.config
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer(
                "pos_table",
                sinusoidal_table(cfg.block_size, cfg.n_embd).to(device),
                persistent=False,
            )
        elif cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.head_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @classmethod
    def without_init(cls, cfg: ModelConfig) -> GPT:
        """A model whose weights are left uninitialised, to load a checkpoint into (no time spent on
        random initialisation, 1.6 s for GPT-2 124M)."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        if cfg.tie_embeddings:  # to_empty gives every module its own tensor
            model.lm_head.weight = model.wte.weight
        model.make_position_tables(device="cpu")
        return model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- size ------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N for the matmuls plus 12·L·C·T for attention scores."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def describe(self) -> str:
        cfg = self.config
        return (
            f"GPT {cfg.n_layer} layers × {cfg.n_head} heads × {cfg.n_embd} wide, context {cfg.block_size}, "
            f"vocab {cfg.vocab_size}: {self.num_params() / 1e6:.2f}M parameters, "
            f"{self.flops_per_token() / 1e6:.1f} MFLOPs per token (training)"
        )

    # -- forward ---------------------------------------------------------------------------------

    def image_positions(self, index: torch.Tensor) -> torch.Tensor:
        """Row + column embeddings (B, T, C) of image places `index` (B, T); 0 where it is -1."""
        cols = self.config.image_cols
        at = index.clamp(min=0)
        position = self.wrow(at // cols) + self.wcol(at % cols)
        return position * (index >= 0)[..., None].to(position.dtype)

    def make_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        cfg = self.config
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        return [KVCache(batch, cfg.n_head, max_len, cfg.head_size, device, dtype) for _ in self.h]

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        embeddings: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int = 0,
        last_only: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) — or (B, 1, V) with `last_only` — without targets; with targets, (None,
        mean cross-entropy over the targets that are not IGNORE_INDEX)."""
        cfg = self.config
        x = self.wte(tokens) if embeddings is None else embeddings  # (B, T, C)
        if cfg.image_rows:
            if image_index is None and tokens is not None:
                image_index = image_code_index(tokens, cfg)
            if image_index is not None:
                x = x + self.image_positions(image_index)
        B, T, _ = x.shape
        if positions is None:
            if start_pos + T > cfg.block_size:
                raise ValueError(
                    f"sequence of {start_pos + T} tokens exceeds the context of {cfg.block_size}"
                )
            positions = torch.arange(start_pos, start_pos + T, device=x.device)[None]  # (1, T)

        rope = None
        if cfg.pos_encoding == "learned":
            x = x + self.wpe(positions)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions]
        else:
            # (B|1, 1, T, hs) each
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        x = self.drop(x)

        for i, block in enumerate(self.h):
            x = block(x, rope, attn_mask, caches[i] if caches is not None else None, start_pos)
        x = self.ln_f(x)

        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        # training: the LM head and softmax run only where there is a target (a fine-tuning batch's
        # prompt and padding are skipped); no logits are returned
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(x[keep])  # (N, V)
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return None, loss / keep.sum().clamp(min=1)


def image_code_index(tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Each token's place (B, T) in the image it is a code of: k for the k-th token after the last
    `<|image_start|>` (k < rows · cols), -1 for every other token."""
    at = torch.arange(tokens.size(-1), device=tokens.device).expand_as(tokens)
    last_start = torch.where(tokens == cfg.image_start_id, at, -1).cummax(-1).values
    k = at - last_start - 1
    inside = (last_start >= 0) & (k >= 0) & (k < cfg.image_rows * cfg.image_cols)
    return torch.where(inside, k, -1)
