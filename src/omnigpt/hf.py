"""Hugging Face GPT-2 format: the key map, the config mapping, reading a `transformers` folder, export.

    model, tok = load_hf("downloads/gpt2")          # a `transformers` GPT-2 folder as an omnigpt model
    export_hf(model, tok, "exported/")               # AutoModelForCausalLM / AutoTokenizer load it

Conversion is the key map below plus one loop each way that raises on unknown or missing keys. GPT-2
stores its projections as `Conv1D` (weight shaped in × out), so those four are transposed; the old
attention-mask buffers (`attn.bias`, `attn.masked_bias`) are dropped; a tied `lm_head.weight` is the
token embedding. `transformers` itself is never needed to load or export. To load any model by path
or Hub name (HF folders included), use `omnigpt.load.load_model`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from omnigpt.checkpoint import apply_state, atomic_write_dir, read_safetensors
from omnigpt.config import ModelConfig, load_json
from omnigpt.errors import OmnigptError
from omnigpt.lora import merge_lora
from omnigpt.model import GPT
from omnigpt.tokenizer import EOT, Tokenizer

# omnigpt name → GPT-2 name; "{}" is the block index.
GPT2_KEYS = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "h.{}.ln_1.weight": "transformer.h.{}.ln_1.weight",
    "h.{}.ln_1.bias": "transformer.h.{}.ln_1.bias",
    "h.{}.attn.c_attn.weight": "transformer.h.{}.attn.c_attn.weight",
    "h.{}.attn.c_attn.bias": "transformer.h.{}.attn.c_attn.bias",
    "h.{}.attn.c_proj.weight": "transformer.h.{}.attn.c_proj.weight",
    "h.{}.attn.c_proj.bias": "transformer.h.{}.attn.c_proj.bias",
    "h.{}.ln_2.weight": "transformer.h.{}.ln_2.weight",
    "h.{}.ln_2.bias": "transformer.h.{}.ln_2.bias",
    "h.{}.mlp.c_fc.weight": "transformer.h.{}.mlp.c_fc.weight",
    "h.{}.mlp.c_fc.bias": "transformer.h.{}.mlp.c_fc.bias",
    "h.{}.mlp.c_proj.weight": "transformer.h.{}.mlp.c_proj.weight",
    "h.{}.mlp.c_proj.bias": "transformer.h.{}.mlp.c_proj.bias",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",  # only when the head is not tied
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DROPPED = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation omnigpt's GELU uses


def _patterns(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [
        (re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst)
        for src, dst in table.items()
    ]


TO_OURS = _patterns({hf: ours for ours, hf in GPT2_KEYS.items()})
TO_HF = _patterns(GPT2_KEYS)


def rename(state: dict[str, torch.Tensor], patterns, source: str) -> dict[str, torch.Tensor]:
    """Renames every key through `patterns` and transposes GPT-2's Conv1D weights; unknown keys raise."""
    out = {}
    for key, tensor in state.items():
        if DROPPED.match(key):
            continue
        for pattern, target in patterns:
            m = pattern.match(key)
            if m:
                new = target.format(*m.groups())
                out[new] = tensor.t().contiguous() if key.endswith(CONV1D) else tensor
                break
        else:
            raise OmnigptError(f"{source}: unexpected weight {key!r} (not part of a GPT-2 model)")
    return out


# -- reading a transformers folder ---------------------------------------------------------------------------------------


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    arch = hf.get("model_type")
    if arch != "gpt2":
        raise OmnigptError(
            f"{source}: unsupported architecture {arch!r} (omnigpt loads GPT-2 models)"
        )
    if hf.get("activation_function", "gelu_new") not in GPT2_ACTIVATIONS:
        raise OmnigptError(
            f"{source}: unsupported activation {hf['activation_function']!r} (GPT-2 uses gelu_new)"
        )
    for flag in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if hf.get(flag):
            raise OmnigptError(f"{source}: unsupported GPT-2 option {flag}=true")
    if hf.get("scale_attn_weights") is False:
        raise OmnigptError(f"{source}: unsupported GPT-2 option scale_attn_weights=false")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", 1024),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        d_ff=hf.get("n_inner"),
        pos_encoding="learned",
        mlp="gelu",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or pytorch_model.bin read with weights_only=True (no code from the file runs)."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise OmnigptError(
                f"{path}: corrupt, truncated or unsafe weights file ({str(e).splitlines()[0]})"
            ) from None
        if not isinstance(state, dict):
            raise OmnigptError(f"{path}: not a state dict")
        return state
    if list(folder.glob("*.safetensors.index.json")) or list(folder.glob("pytorch_model-*.bin")):
        raise OmnigptError(f"{folder}: sharded weights are not supported yet")
    raise OmnigptError(f"{folder}: no weights (expected model.safetensors or pytorch_model.bin)")


def load_hf(folder: str | Path) -> tuple[GPT, Tokenizer]:
    """A `transformers` GPT-2 folder as an omnigpt model (eval mode) and its tokenizer."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise OmnigptError(f"{folder}: no config.json (not a Hugging Face model folder)")
    cfg = config_from_hf(load_json(folder / "config.json"), str(folder))
    state = read_hf_weights(folder)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if not any(k.startswith("transformer.") for k in state):  # saved from GPT2Model: no prefix
        state = {(k if k == "lm_head.weight" else "transformer." + k): v for k, v in state.items()}
    ours = rename(state, TO_OURS, str(folder))
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    model = GPT.without_init(cfg)
    apply_state(model, ours, str(folder))
    return model.eval(), Tokenizer.load(folder)


def is_hf_folder(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, OSError):
        return False


# -- export ----------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    eot = tokenizer.eot_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "attn_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path) -> None:
    """Writes a GPT-2 folder for `transformers`; architectures without a GPT-2 equivalent are refused.

    Sinusoidal positions are exported as GPT-2's learned table filled with their fixed values.
    LoRA adapters are merged into their weights first (in place: `model` ends up merged)."""
    cfg = model.config
    reasons = [
        r
        for r, bad in (
            ("rotary positions", cfg.pos_encoding == "rope"),
            ("RMSNorm", cfg.norm == "rmsnorm"),
            ("SwiGLU", cfg.mlp == "swiglu"),
            ("Linear layers without bias", not cfg.bias),
        )
        if bad
    ]
    if reasons:
        raise OmnigptError(f"cannot export to GPT-2 format: GPT-2 has no {', '.join(reasons)}")
    merge_lora(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.pos_encoding == "sinusoidal":
        state["wpe.weight"] = model.pos_table.detach().cpu().clone()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    hf_state = rename(state, TO_HF, "model")
    eot = tokenizer.eot_id

    def write(tmp: Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in hf_state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer), indent=2) + "\n")
        generation = {
            "bos_token_id": eot,
            "eos_token_id": eot,
            "do_sample": True,
            "max_length": cfg.block_size,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
        special = {"eos_token": EOT, "bos_token": EOT, "unk_token": EOT} if eot is not None else {}
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": cfg.block_size,
                    **special,
                },
                indent=2,
            )
            + "\n"
        )

    atomic_write_dir(Path(out_dir), write)
