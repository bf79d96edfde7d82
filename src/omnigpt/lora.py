"""LoRA: low-rank adapters on a model's Linear layers (Hu et al., 2021), for any `nn.Module`.

    names = add_lora(model, LoRAConfig(rank=8, alpha=16, targets=("c_attn", "c_proj", "c_fc")))
    ...train: only lora_A / lora_B have requires_grad...
    merge_lora(model)                       # W ← W + (alpha/rank)·B·A; plain Linear layers again

A wrapped layer computes `x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ`. B starts at zero, so a freshly added
adapter leaves the model's outputs unchanged. The wrapped layer keeps its `weight` and `bias` names,
so the base model's checkpoint keys are untouched and adapters save on their own (`adapter_state`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.config import LoRAConfig as LoRAConfig  # its home is config.py
from omnigpt.errors import OmnigptError


class LoRALinear(nn.Linear):
    """A Linear layer with a trainable low-rank update; `weight`/`bias` are the base layer's."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)  # adopt the base parameters instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = cfg.scale
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(
            torch.empty(cfg.rank, self.in_features, device=device, dtype=dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, cfg.rank, device=device, dtype=dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def delta(self) -> torch.Tensor:
        """The update this adapter adds to `weight`: scale · B · A."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return y + self.scale * update


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wraps every targeted Linear in `model` with an adapter and freezes everything else.

    Returns the wrapped layers' names; raises when a target matches no Linear layer.
    """
    wanted = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
        if _matches(name, cfg.targets)
    ]
    for t in cfg.targets:
        if not any(_matches(name, (t,)) for name, _ in wanted):
            linears = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise OmnigptError(
                f"LoRA target {t!r} matches no Linear layer (layers: {', '.join(linears)})"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in wanted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, cfg))
    return [name for name, _ in wanted]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone: `<layer>.lora_A` and `<layer>.lora_B` for every wrapped layer."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def base_checksum(model: nn.Module, names: list[str]) -> list[float]:
    """Sum and sum of squares of the named layers' base weights: enough to tell one base from another
    of the same shape, without hashing every byte."""
    s, sq = 0.0, 0.0
    for name in sorted(names):
        w = model.get_submodule(name).weight.detach().double()
        s += w.sum().item()
        sq += (w * w).sum().item()
    return [s, sq]


def same_base(a: list[float], b: list[float]) -> bool:
    """Whether two `base_checksum` values describe the same weights (up to float round-off)."""
    return all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-3) for x, y in zip(a, b, strict=True))


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies saved adapter weights into a model that `add_lora` wrapped with the same config."""
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OmnigptError(
            f"{source}: adapter does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise OmnigptError(
                f"{source}: adapter {key} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[key].shape)}: it was trained on another base"
            )
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Folds every adapter into its base weight (W ← W + scale·B·A) and puts plain Linear layers back.

    Returns the number of layers merged; on a model without adapters it changes nothing.
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        plain = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
        plain.weight = layer.weight
        plain.bias = layer.bias
        plain.weight.add_(layer.delta().to(plain.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return len(layers)
