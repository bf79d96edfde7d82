"""int8 weights for inference: a transform applied to a loaded model, never part of the model code.

    model, tok = load_model("runs/mine")
    quantize_int8(model)        # the decoder's Linear layers and its LM head now hold int8 weights
    save_checkpoint("runs/mine-int8", model, tok)   # loads back as int8 (config: "quantization")

Each weight matrix is stored as int8 with one scale per output channel (symmetric, max |w| → 127).
On CPU a layer runs PyTorch's own dynamic-quantized kernel (`quantized::linear_dynamic`, fbgemm /
oneDNN): each row of activations is quantized to int8 on the fly, by its own peak, and multiplied in
integers, on AVX2 and AVX-512 alike; at batch 1 a token reads a quarter of the bytes fp32 reads, and
a row's result is the same in any batch. Elsewhere (CUDA, or bf16 activations) the weights are
dequantized into the matmul, weight-only (under `torch.compile` the two can fuse). The embedding
stays in full precision (a token reads one row of it); a tied LM head gets its own int8 copy.
Encoders of a multimodal model stay as they are: they run once per prompt.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnigpt.errors import OmnigptError
from omnigpt.hardware import bf16_native
from omnigpt.lora import LoRALinear

QUANTIZATIONS = ("int8", "bf16")


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (out, in) and fp32 per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # the CPU kernel's prepacked weight, made on first use

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        layer = cls(weight.size(1), weight.size(0), bias is not None)
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        layer.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.scale = scale
        layer.bias = None if bias is None else bias.detach().float().clone()
        return layer

    def dequantized(self) -> torch.Tensor:
        """The weights as fp32 (out, in)."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            y = self._cpu_int8(x.reshape(-1, self.in_features))
            return y.reshape(*x.shape[:-1], self.out_features)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _cpu_int8(self, rows: torch.Tensor) -> torch.Tensor:
        """The int8 kernel quantizes its whole input with one range; each row is first scaled to a
        peak of 1 and a last row holding +1 and -1 fixes the range at [-1, 1], so every row is
        quantized by its own peak, exactly as it would be alone (integer sums are exact: a row's
        result does not depend on the rest of the batch)."""
        peak = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)
        y = torch.ops.quantized.linear_dynamic(
            torch.cat([rows / peak, _fence(self.in_features)]), self._prepacked(), _REDUCE_RANGE
        )[:-1]
        return y * peak if self.bias is None else torch.addcmul(self.bias, y, peak)

    def _prepacked(self):
        if self._packed is None:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # packing takes a quantized tensor, a deprecated type
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scale.double(), zeros, 0
                )
            self._packed = torch.ops.quantized.linear_prepack(q, None)  # bias: added after
        return self._packed

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: pack again
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# x86's kernels multiply 8-bit activations with 7 bits of range, so that no sum saturates (AVX2)
_REDUCE_RANGE = torch.backends.quantized.engine in ("fbgemm", "x86")


@functools.cache
def _fence(width: int) -> torch.Tensor:
    """(1, width): +1, then zeros, then -1."""
    fence = torch.zeros(1, width)
    fence[0, 0], fence[0, -1] = 1.0, -1.0
    return fence


def quantize(model, kind: str | None):
    """`model` with its weights as `kind` says: "int8" (`quantize_int8`), "bf16" (the decoder in
    bf16, where the device runs bf16 natively: CUDA, AMX / AVX-512-BF16 CPUs; refused elsewhere,
    where it would be many times slower), None: unchanged."""
    if kind is None:
        return model
    if kind not in QUANTIZATIONS:
        raise OmnigptError(
            f"unknown quantization {kind!r} (choose from {', '.join(QUANTIZATIONS)})"
        )
    if kind == "int8":
        return quantize_int8(model)
    decoder = getattr(model, "gpt", model)
    device = decoder.wte.weight.device
    if not bf16_native(device):
        raise OmnigptError(
            f"bf16 weights need a device that computes in bf16 natively; this {device.type} does "
            "not (use int8, or fp32)"
        )
    decoder.to(torch.bfloat16)
    return model


def quantize_int8(model, empty: bool = False):
    """Replaces the decoder's Linear layers and LM head of `model` (a GPT or MultimodalGPT) with
    Int8Linear, in place; returns it. With `empty`, only the structure (to load int8 weights into).
    LoRA adapters must be merged first."""
    decoder = getattr(model, "gpt", model)
    if getattr(decoder, "quantization", None) == "int8":
        return model
    for module in decoder.h.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                raise OmnigptError("merge the LoRA adapters before quantizing (merge_lora)")
            if isinstance(child, nn.Linear):
                setattr(module, name, _int8(child, empty))
    decoder.lm_head = _int8(decoder.lm_head, empty)
    decoder.quantization = "int8"
    return model


def _int8(linear: nn.Linear, empty: bool) -> Int8Linear:
    if empty:
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)
    return Int8Linear.from_weight(linear.weight, linear.bias)


def quantization_of(model) -> str | None:
    """ "int8" for a model `quantize_int8` transformed, else None."""
    return getattr(getattr(model, "gpt", model), "quantization", None)


def weights_of(model) -> str:
    """What the decoder's weights are: "int8", "bf16", "fp32", ..."""
    decoder = getattr(model, "gpt", model)
    return quantization_of(model) or str(decoder.wte.weight.dtype).removeprefix("torch.").replace(
        "float32", "fp32"
    ).replace("bfloat16", "bf16")
