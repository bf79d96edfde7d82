"""Muon: SGD-momentum whose update for each weight matrix is orthogonalised by Newton–Schulz.

    opt = Muon(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opt = Muon(matrices, lr=0.02, ns_dtype=torch.float32)   # orthogonalise in fp32

The same update as `torch.optim.Muon` (Nesterov momentum, the quintic iteration with Keller Jordan's
coefficients, decoupled weight decay, the same learning-rate adjustments and state), with two
differences that make it fast on every machine:
- the iteration runs in `ns_dtype`: bf16 where bf16 matmuls are native (the default picks it by
  device, see `omnigpt.hardware.matmul_dtype`), fp32 elsewhere; `torch.optim.Muon` always casts to
  bf16, which CPUs without AMX / AVX-512 BF16 emulate about 100× slower than fp32;
- matrices of the same shape are orthogonalised together, as one batched matmul per iteration.
Its state dict is interchangeable with `torch.optim.Muon`'s (one `momentum_buffer` per matrix).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from omnigpt.hardware import matmul_dtype

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # maximise the slope at zero (Keller Jordan)
NS_STEPS = 5
EPS = 1e-7


def orthogonalise(
    g: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = EPS,
) -> torch.Tensor:
    """≈ U·S'·Vᵀ for G = U·S·Vᵀ, S' ≈ 1 (between 0.5 and 1.5): Newton–Schulz on (..., A, B) matrices,
    computed in `dtype`, returned in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype).reshape(-1, *g.shape[-2:])  # (n, A, B)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: its Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT  # (n, A, A)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·X·Xᵀ + c·(X·Xᵀ)²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + poly·X
    return (x.mT if tall else x).reshape(g.shape)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate for a matrix of `shape`: "original" × √max(1, A/B) (Keller Jordan), or
    "match_rms_adamw" × 0.2·√max(A, B) (Moonshot), so that AdamW's lr and weight decay carry over."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(
        f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', not {adjust_lr_fn!r}"
    )


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (the blocks' weight matrices); biases, norms and embeddings belong to
    AdamW. `ns_dtype` None picks bf16 where the parameters' device multiplies it natively, else fp32."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("Muon's lr, momentum and weight_decay must be ≥ 0")
        adjusted_lr(1.0, adjust_lr_fn, torch.Size((1, 1)))  # rejects an unknown adjustment now
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon takes 2-D parameters only, not one of shape {tuple(p.shape)}"
                    )
        self.ns_dtype = ns_dtype

    def orthogonalisation_dtype(self, device: torch.device) -> torch.dtype:
        """`ns_dtype` if given, else bf16 where `device` multiplies it natively, else fp32."""
        return self.ns_dtype if self.ns_dtype is not None else matmul_dtype(device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])

            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[(tuple(p.shape), p.device, p.dtype)].append(i)
            for (shape, device, dtype), idx in by_shape.items():
                stacked = torch.stack([updates[i] for i in idx])  # (n, A, B)
                ortho = orthogonalise(
                    stacked,
                    self.orthogonalisation_dtype(device),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                )
                lr = adjusted_lr(group["lr"], group["adjust_lr_fn"], torch.Size(shape))
                torch._foreach_add_(
                    [params[i] for i in idx], list(ortho.to(dtype).unbind(0)), alpha=-lr
                )
        return loss
