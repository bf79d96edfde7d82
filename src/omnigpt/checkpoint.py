"""Saving and loading checkpoints: weights in safetensors, config and tokenizer as files, resume state.

A checkpoint is a folder that stands on its own:

    model.safetensors     weights (the tied LM head is stored once, as the token embedding)
    config.json           {"model": ModelConfig, "tokenizer_fingerprint": ..., ...}
    tokenizer.json
    image_tokens.json     for a model that writes images: how its image codes map to pixels
    trainer_state.pt      optimizer, schedule position, RNG and data-loader state (resumable ones only)
    shards/               a sharded run's `latest/`: weights and optimizer state, written by every
                          process in parallel (torch.distributed.checkpoint), instead of the two above

A sharded checkpoint is loaded as a whole by a single process too (`load_checkpoint`), and a run
resumes from one on any number of processes: each reads the parts of the shards it now holds.

A LoRA fine-tuning checkpoint holds `adapter.safetensors` (the adapters alone) instead of the
weights; its config names the base model (`"base"`) and a checksum of the base weights it fits.

A training run keeps two: `RUN/latest` and `RUN/best`, beside `RUN/config.json` (the model, training
and data settings `--resume` rebuilds the run from) and the tokenizer. Every write goes to a
temporary folder that is then swapped in by renames, so a kill mid-save leaves the previous
checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
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


SHARDS = "shards"


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Calls write(tmp_folder), then swaps tmp_folder in for `final` with renames.

    At every instant either `final` or `.final.old` holds a complete checkpoint; `resolve` looks at both.
    """
    tmp = fresh_tmp_dir(final)
    write(tmp)
    swap_in(tmp, final)


def fresh_tmp_dir(final: Path) -> Path:
    """The empty folder a new version of `final` is written to before `swap_in`."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, final: Path) -> None:
    """Makes the fully written `tmp` the new `final` by renames (the previous one survives a kill)."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
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
    return (folder / WEIGHTS).is_file() or (folder / ADAPTER).is_file() or is_sharded(folder)


def is_sharded(folder: Path) -> bool:
    """A sharded run's `latest/`: weights and optimizer state in `shards/`."""
    folder = Path(folder)
    return (folder / SHARDS / ".metadata").is_file() and not (folder / WEIGHTS).is_file()


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER).is_file() and not (folder / WEIGHTS).is_file()


def save_checkpoint(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes the checkpoint folder; `weights` (the model's whole state dict, gathered from the
    shards of a sharded model) stands in for `model.state_dict()`."""
    lora = has_lora(model)
    if lora:
        names = set(adapter_state(model))
        source = (
            {k: v for k, v in weights.items() if k in names} if weights else adapter_state(model)
        )
    else:
        source = model.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    if _tied(model):
        state.pop(_decoder_prefix(model) + "lm_head.weight", None)
    config = {
        **checkpoint_config(model, tokenizer),
        **(extra_config or {}),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / (ADAPTER if lora else WEIGHTS)), metadata={"format": "pt"})
        save_json(tmp / CONFIG, config)
        tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)

    atomic_write_dir(Path(folder), write)


def checkpoint_config(model: GPT, tokenizer: Tokenizer) -> dict[str, Any]:
    """What config.json says about the model and its tokenizer."""
    return {
        "model": model.config.to_dict(),
        **({"quantization": quantization_of(model)} if quantization_of(model) else {}),
        **({"media": model.media_config()} if isinstance(model, MultimodalGPT) else {}),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        **({"image_codec": tokenizer.images.fingerprint} if tokenizer.images else {}),
    }


# -- sharded checkpoints (every process writes its part) -------------------------------------------
# Names in the shards are the model's own parameter names (FSDP's wrapping does not show), and the
# optimizers' states are keyed by those names too, so shards written by N processes load into M.


@contextlib.contextmanager
def _alone_is_meant():
    """torch.distributed.checkpoint warns when one process saves or loads alone: here it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sharding_options(model: GPT):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (a LoRA run's base) are not training state: they come from the base model,
    # and are not expected back when loading
    everything = all(p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=everything)


def save_sharded(
    folder: str | Path,
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any],
    extra_config: dict[str, Any] | None,
    is_main: bool,
) -> None:
    """Every process calls this together: each writes its shards of the weights and optimizer
    states into a fresh folder, then the main process adds the rest and swaps it in (as
    `atomic_write_dir`: a kill at any point leaves the previous checkpoint whole)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    together = dist.is_initialized()
    tmp = folder.with_name(f".{folder.name}.tmp")
    if is_main:
        tmp = fresh_tmp_dir(folder)
    if together:
        dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizers, options=_sharding_options(model))
    state = {"model": model_state, "optimizers": optim_state}
    with _alone_is_meant():
        dcp.save(state, checkpoint_id=tmp / SHARDS, no_dist=not together)
    if is_main:
        save_json(tmp / CONFIG, {**checkpoint_config(model, tokenizer), **(extra_config or {})})
        tokenizer.save(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        swap_in(tmp, folder)
    if together:
        dist.barrier()


def load_sharded(
    folder: str | Path, model: GPT, optimizers: list[torch.optim.Optimizer] | None = None
) -> None:
    """Reads a sharded checkpoint into `model` (sharded or whole) and `optimizers`: every process
    takes the parts it holds, whatever number of processes wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options, shards = _sharding_options(model), Path(folder) / SHARDS
    alone = not torch.distributed.is_initialized()
    try:
        if optimizers is None:
            state = {"model": get_model_state_dict(model, options=options)}
            with _alone_is_meant():
                dcp.load(state, checkpoint_id=shards, no_dist=alone)
            set_model_state_dict(model, state["model"], options=options)
            return
        model_state, optim_state = get_state_dict(model, optimizers, options=options)
        state = {"model": model_state, "optimizers": optim_state}
        with _alone_is_meant():
            dcp.load(state, checkpoint_id=shards, no_dist=alone)
        set_state_dict(
            model,
            optimizers,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizers"],
            options=options,
        )
    except (RuntimeError, ValueError, KeyError) as e:
        raise OmnigptError(f"{shards}: does not fit this model and its training ({e})") from None


def gather_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, on the CPU of the main process (an empty dict on
    the others); every process calls this together."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


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
    if is_sharded(folder):
        if config.get("base"):
            raise OmnigptError(
                f"{folder}: the training state of a LoRA run (adapters only); load the run's best/"
            )
        load_sharded(folder, model)
    else:
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
        latest, old = run_dir / "latest", run_dir / ".latest.old"
        if not latest.exists() and is_checkpoint(old):  # killed between the two renames of a save
            os.replace(old, latest)
        if not latest.is_dir():
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
