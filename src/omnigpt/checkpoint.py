"""Saving and loading checkpoints: weights in safetensors, config and tokenizer as files, resume state.

A checkpoint is a folder that stands on its own:

    model.safetensors     weights (the tied LM head is stored once, as the token embedding)
    config.json           {"model": ModelConfig, "tokenizer_fingerprint": ..., ...}
    tokenizer.json
    image_tokens.json     for a model that writes images: how its image codes map to pixels
    trainer_state.pt      optimizer, schedule position, RNG and data-loader state (resumable ones only)

A LoRA fine-tuning checkpoint holds `adapter.safetensors` (the adapters alone) instead of the
weights; its config names the base model (`"base"`) and a checksum of the base weights it fits.

A training run keeps two: `RUN/latest` and `RUN/best`, beside `RUN/config.json` (the model, training
and data settings `--resume` rebuilds the run from) and the tokenizer. Every write goes to a
temporary folder that is then swapped in by renames, so a kill mid-save leaves the previous
checkpoint loadable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omnigpt.config import ModelConfig, load_json, save_json
from omnigpt.errors import OmnigptError
from omnigpt.lora import adapter_state, has_lora
from omnigpt.model import GPT
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.pixels import CODEC_FILE
from omnigpt.quantize import quantization_of, quantize_int8
from omnigpt.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Calls write(tmp_folder), then swaps tmp_folder in for `final` with renames.

    At every instant either `final` or `.final.old` holds a complete checkpoint; `resolve` looks at both.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """The checkpoint folder meant by `path`: a checkpoint itself, or a run folder (best, else latest)."""
    path = Path(path)
    for candidate in (path, path / "best", path / "latest"):
        if is_checkpoint(candidate):
            return candidate
        old = candidate.with_name(f".{candidate.name}.old")  # a save was interrupted mid-swap
        if not candidate.exists() and is_checkpoint(old):
            return old
    if not path.exists():
        raise OmnigptError(f"{path}: no such checkpoint or run folder")
    raise OmnigptError(
        f"{path}: no checkpoint here (expected {WEIGHTS}, or best/ or latest/ inside)"
    )


def is_checkpoint(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() or (folder / ADAPTER).is_file()


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER).is_file() and not (folder / WEIGHTS).is_file()


def save_checkpoint(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    lora = has_lora(model)
    source = adapter_state(model) if lora else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    if _tied(model):
        state.pop(_decoder_prefix(model) + "lm_head.weight", None)
    config = {
        "model": model.config.to_dict(),
        **({"quantization": quantization_of(model)} if quantization_of(model) else {}),
        **({"media": model.media_config()} if isinstance(model, MultimodalGPT) else {}),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        **({"image_codec": tokenizer.images.fingerprint} if tokenizer.images else {}),
        **(extra_config or {}),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / (ADAPTER if lora else WEIGHTS)), metadata={"format": "pt"})
        save_json(tmp / CONFIG, config)
        tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)

    atomic_write_dir(Path(folder), write)


def load_checkpoint(
    path: str | Path, tokenizer_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint; a different tokenizer is refused."""
    folder = resolve(path)
    if is_adapter(folder):
        raise OmnigptError(
            f"{folder}: a LoRA adapter checkpoint; load it with omnigpt.load.load_model (base + "
            "adapters), or merge it first with `omnigpt convert --merge-lora`"
        )
    config = load_json(folder / CONFIG)
    if "model" not in config:
        raise OmnigptError(
            f"{folder / CONFIG}: not an omnigpt checkpoint config (no 'model' entry)"
        )
    model_cfg = ModelConfig.from_dict(config["model"])
    tokenizer = Tokenizer.load(tokenizer_path or folder)
    expected = config.get("tokenizer_fingerprint")
    if tokenizer_path is not None and expected and tokenizer.fingerprint != expected:
        raise OmnigptError(
            f"tokenizer {tokenizer_path} does not match checkpoint {folder} (it was trained with another)"
        )
    codec = tokenizer.images.fingerprint if tokenizer.images else None
    if codec != config.get("image_codec"):
        raise OmnigptError(
            f"{folder}: its {CODEC_FILE} is {'missing' if codec is None else 'not the one'} "
            "the model was trained with; image codes would map to the wrong colours"
        )
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise OmnigptError(
            f"tokenizer has {tokenizer.vocab_size} tokens but checkpoint {folder} has only {model_cfg.vocab_size}"
        )
    model = GPT.without_init(model_cfg)
    if "media" in config:  # a multimodal model: the decoder with its encoders and projectors
        model = MultimodalGPT.from_media_config(model, config["media"])
    if config.get("quantization"):  # saved after `quantize`: the int8 layers, to load into
        quantize_int8(model, empty=True)
    load_weights(model, folder / WEIGHTS)
    return model.to(device).eval(), tokenizer


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise OmnigptError(f"{path}: corrupt or truncated weights file ({e})") from None


def load_weights(model: GPT, weights_path: Path) -> None:
    apply_state(model, read_safetensors(weights_path), str(weights_path))


def read_adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(folder) / ADAPTER)


def apply_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads omnigpt-named weights into `model`, refusing missing, unexpected or misshapen ones."""
    prefix = _decoder_prefix(model)
    if _tied(model) and prefix + "wte.weight" in state:
        state.setdefault(prefix + "lm_head.weight", state[prefix + "wte.weight"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OmnigptError(
            f"{source}: weights do not fit the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise OmnigptError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, config expects {tuple(expected[name].shape)}"
            )
    # assign: the loaded tensors become the parameters (no second copy of every weight)
    tied = _tied(model)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    if tied:
        decoder = model.gpt if isinstance(model, MultimodalGPT) else model
        decoder.lm_head.weight = decoder.wte.weight


def _tied(model) -> bool:
    """Whether the LM head is the token embedding (not when an int8 copy replaced it)."""
    return model.config.tie_embeddings and quantization_of(model) is None


def _decoder_prefix(model) -> str:
    """Where the decoder's weights sit in the state dict: "gpt." inside a multimodal model."""
    return "gpt." if isinstance(model, MultimodalGPT) else ""


# -- run folders ---------------------------------------------------------------------------------


def open_run_folder(run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """A resumed run's saved config.json (refused when there is no latest/ to resume from); None
    for a new run (refused when the folder already holds one, so no run is ever overwritten)."""
    if resume:
        if not (run_dir / "latest").is_dir():
            raise OmnigptError(f"{run_dir}: nothing to resume (no latest/ checkpoint)")
        return load_json(run_dir / CONFIG)
    if (run_dir / "latest").exists() or (run_dir / "best").exists():
        raise OmnigptError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    return None


def start_run_folder(run_dir: Path, config: dict[str, Any], tokenizer: Tokenizer) -> None:
    """Creates a new run's folder with its config.json (what `--resume` rebuilds the run from) and
    tokenizer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(run_dir / CONFIG, {**config, "tokenizer_fingerprint": tokenizer.fingerprint})
    tokenizer.save(run_dir)


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise OmnigptError(f"{folder}: no resumable state ({TRAINER_STATE} missing)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OmnigptError(f"{path}: corrupt or truncated trainer state ({e})") from None
