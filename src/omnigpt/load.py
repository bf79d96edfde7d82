"""Loading any model: a path or a name in, a ready model (eval mode) and its tokenizer out.

    model, tok = load_model("runs/mine")             # an omnigpt run folder (best/, else latest/)
    model, tok = load_model("runs/mine/latest")      # ... or one checkpoint folder
    model, tok = load_model("runs/lora")             # a LoRA run: its base model with the adapters
    model, tok = load_model("downloads/gpt2")        # a Hugging Face GPT-2 folder
    model, tok = load_model("gpt2")                  # a Hub name, from the local Hugging Face cache
    model, tok = load_model("runs/mine", quantization="int8")   # int8 weights for inference
    import_hf("gpt2", "checkpoints/gpt2")            # the same, saved as an omnigpt checkpoint
    merge_lora_run("runs/lora", "checkpoints/tuned") # base + adapters as one plain checkpoint

The formats sit behind it: `checkpoint` (omnigpt's own folders), `hf` (GPT-2 folders), `lora`
(adapters on a base, checked against the base's weights).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from omnigpt.checkpoint import (
    CONFIG,
    WEIGHTS,
    is_adapter,
    load_checkpoint,
    read_adapter,
    resolve,
    save_checkpoint,
)
from omnigpt.config import LoRAConfig, load_json
from omnigpt.errors import OmnigptError
from omnigpt.hf import is_hf_folder, load_hf
from omnigpt.lora import add_lora, base_checksum, load_adapter_state, merge_lora, same_base
from omnigpt.model import GPT
from omnigpt.quantize import quantize
from omnigpt.tokenizer import Tokenizer


def resolve_hub_name(name: str) -> Path:
    """A Hub repository name as a local snapshot folder, from the HF cache (HF_HOME, HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OmnigptError(
            f"{name}: no such folder (install huggingface_hub to load Hub names)"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    # read at call time: huggingface_hub reads these variables once, when first imported
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    cache = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    patterns = [
        "config.json",
        "*.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ]
    try:
        return Path(
            snapshot_download(
                name, allow_patterns=patterns, local_files_only=offline, cache_dir=cache
            )
        )
    except Exception:
        try:
            return Path(
                snapshot_download(
                    name, allow_patterns=patterns, local_files_only=True, cache_dir=cache
                )
            )
        except Exception:
            raise OmnigptError(
                f"{name}: no such folder, nor a model in the local Hugging Face cache "
                "(and it could not be downloaded)"
            ) from None


def load_model(
    path_or_name: str | Path,
    device: str | torch.device = "cpu",
    tokenizer_path: str | Path | None = None,
    quantization: str | None = None,
) -> tuple[GPT, Tokenizer]:
    """An omnigpt run or checkpoint folder, a Hugging Face GPT-2 folder, or a cached Hub name.

    A LoRA checkpoint loads its base model (named in its config) with the adapters applied.
    `quantization` ("int8") transforms the loaded model for inference (`quantize.py`; LoRA
    adapters are merged into the weights first).
    """
    model, tokenizer = _load(path_or_name, device, tokenizer_path)
    if quantization is not None:
        merge_lora(model)
        model = quantize(model, quantization).to(device)
    return model, tokenizer


def _load(path_or_name, device, tokenizer_path) -> tuple[GPT, Tokenizer]:
    path = Path(path_or_name)
    looks_like_hub_name = re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", str(path_or_name))
    if not path.exists() and looks_like_hub_name:
        path = resolve_hub_name(str(path_or_name))
    if is_hf_folder(path):
        model, tokenizer = load_hf(path)
        if tokenizer_path is not None:
            tokenizer = Tokenizer.load(tokenizer_path)
        return model.to(device), tokenizer
    if path.exists() and is_adapter(resolve(path)):
        return load_adapter_checkpoint(resolve(path), device)
    return load_checkpoint(path, tokenizer_path, device)


def load_adapter_checkpoint(
    folder: Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer]:
    """The base model named in a LoRA checkpoint's config, wrapped with the saved adapters.

    Refuses an adapter whose base has changed shape, tokenizer or weights since training.
    """
    config = load_json(folder / CONFIG)
    if "base" not in config or "finetune" not in config:
        raise OmnigptError(f"{folder}: adapter checkpoint without its base model in {CONFIG}")
    base = config["base"]
    try:
        model, tokenizer = load_model(base)
    except OmnigptError as e:
        raise OmnigptError(f"{folder}: cannot load its base model {base} ({e})") from None
    if tokenizer.fingerprint != config.get("tokenizer_fingerprint", tokenizer.fingerprint):
        raise OmnigptError(f"{folder}: adapter was trained with another tokenizer than base {base}")
    merge_lora(model)  # the base may itself be a LoRA run
    names = add_lora(model, LoRAConfig(**config["finetune"]["lora"]))
    expected = config.get("base_checksum")
    if expected is not None:
        if not same_base(base_checksum(model, names), expected):
            raise OmnigptError(
                f"{folder}: adapter does not match base {base} (its weights differ from the ones "
                "the adapter was trained on)"
            )
    load_adapter_state(model, read_adapter(folder), str(folder))
    return model.to(device).eval(), tokenizer


def import_hf(source: str | Path, out_dir: str | Path) -> Path:
    """Converts a Hugging Face GPT-2 folder (or cached Hub name) into an omnigpt checkpoint folder."""
    model, tokenizer = load_model(source)
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).exists() or (out_dir / CONFIG).exists():
        raise OmnigptError(f"{out_dir} already holds a checkpoint; choose another --out")
    save_checkpoint(out_dir, model, tokenizer, extra_config={"converted_from": str(source)})
    return out_dir


def merge_lora_run(source: str | Path, out_dir: str | Path) -> Path:
    """A LoRA run or checkpoint written as one plain checkpoint: the base with its adapters merged
    into the weights (W + scale·BA), loadable without the base."""
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).exists():
        raise OmnigptError(f"{out_dir} already holds a model; choose another --out")
    model, tokenizer = load_model(source)
    if not merge_lora(model):
        raise OmnigptError(f"{source}: no LoRA adapters to merge")
    save_checkpoint(out_dir, model, tokenizer)
    return out_dir
