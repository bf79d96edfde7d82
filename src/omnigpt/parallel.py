"""How the model trains across processes: one full copy per process (DDP) or sharded (FSDP2).

    train_model = parallelize(model, cfg, dist_info, precision)  # what `fit` runs forward/backward on
    with gradient_sync(train_model, last_micro_batch): ...
    grad_norm = clip_gradients(model, cfg.grad_clip)
    print(memory_report(model, optimizers, cfg.strategy, dist_info.world_size))

`ddp` keeps the whole model, its gradients and its optimizer state on every process and averages
gradients after the backward pass. `fsdp` (`torch.distributed.fsdp.fully_shard`) splits every
parameter, gradient and optimizer state across the processes: each Transformer block is gathered just
before it runs and freed after it, and gradients are reduce-scattered, so per-process memory for
them falls to about 1/N. On CUDA with bf16 the sharded parameters are gathered and computed in bf16
while gradients are reduced, and kept, in fp32. Activation checkpointing (either strategy) recomputes
each block's activations in the backward pass instead of keeping them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from omnigpt.config import TrainConfig
from omnigpt.model.attention import Block
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.muon import Muon


def parallelize(model: torch.nn.Module, cfg: TrainConfig, dist_info, precision: str):
    """The module to train, on `dist_info.device`: `model` itself (one process; FSDP, which shards
    it in place, each process moving only its shards to the device), compiled when asked, or
    wrapped in DDP."""
    fsdp = cfg.strategy == "fsdp"
    if dist_info.world_size > 1:
        for part in model.modules():
            if isinstance(part, MultimodalGPT):  # every process uses every weight in every pass
                part.every_part_each_pass = True
    # FSDP compiles block by block: its hooks, which gather and free each block, run between them
    _wrap_blocks(model, compiled=cfg.compile and fsdp, checkpointed=cfg.activation_checkpointing)
    if fsdp:
        if dist_info.world_size > 1:
            shard(model, dist_info.device, dist_info.world_size, precision)
        else:
            model.to(dist_info.device)
        return model
    model.to(dist_info.device)
    train_model = torch.compile(model) if cfg.compile else model
    if dist_info.world_size > 1:
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=ids)
    return train_model


def shard(model: torch.nn.Module, device: torch.device, world_size: int, precision: str) -> None:
    """fully_shard on every Transformer block (decoder and encoders), then on the rest of the model.
    Each call moves that part's shards to `device` (the whole model never is)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by the backward pass: keep them
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _blocks(model: torch.nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Every Transformer block keeps only its input for the backward pass and recomputes the rest.
    The blocks stay where they are (the state dict's names do not change)."""
    _wrap_blocks(model, compiled=False, checkpointed=True)


def _wrap_blocks(model: torch.nn.Module, compiled: bool, checkpointed: bool) -> None:
    """Each block's forward compiled, and/or run under activation checkpointing (which recomputes
    the compiled forward in the backward pass)."""
    if not (compiled or checkpointed):
        return
    for block in _blocks(model):
        forward = type(block).forward.__get__(block)
        if compiled:
            forward = torch.compile(forward)
        if checkpointed:
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        block.forward = forward


def is_fsdp(train_model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(train_model, FSDPModule)


def gradient_sync(train_model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are averaged across processes only when
    `sync` (the last micro-batch of a step); before that they accumulate locally."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(train_model, DistributedDataParallel):
        return train_model.no_sync()
    if is_fsdp(train_model):
        return _fsdp_no_sync(train_model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(train_model):
    train_model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        train_model.set_requires_gradient_sync(True)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scales the gradients down to a total 2-norm of `max_norm` when above it; the norm before.
    Under FSDP every process holds a shard of each gradient: the norm is that of the whole."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if hasattr(norm, "full_tensor"):  # a DTensor: the shards' partial norms, combined
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# -- memory ---------------------------------------------------------------------------------------


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of `p` (all of it, unless FSDP sharded it)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _local_bytes(p: torch.Tensor) -> int:
    return _local(p).numel() * p.element_size()


def memory_per_process(
    model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]
) -> dict[str, int]:
    """Bytes this process holds for the model, before activations: parameters, gradients (trainable
    parameters only) and optimizer state (AdamW: 2 fp32 values per trainable value; Muon: 1)."""
    params, seen = [], set()
    for p in model.parameters():  # a tied weight counts once
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    state = 0
    for opt in optimizers:
        fp32_per_value = 1 if isinstance(opt, Muon) else 2
        for group in opt.param_groups:
            state += sum(fp32_per_value * 4 * _local(p).numel() for p in group["params"])
    return {
        "parameters": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p) for p in params if p.requires_grad),
        "optimizer_state": state,
    }


def memory_report(
    model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], strategy: str, world_size: int
) -> str:
    """`memory_per_process` as the line a run prints at its start."""
    held = {k: v / 1e6 for k, v in memory_per_process(model, optimizers).items()}
    how = "one process" if world_size == 1 else f"{strategy} over {world_size} processes"
    return (
        f"memory per process ({how}): parameters {held['parameters']:,.1f} MB, gradients "
        f"{held['gradients']:,.1f} MB, optimizer state {held['optimizer_state']:,.1f} MB; "
        f"{sum(held.values()):,.1f} MB before activations"
    )
