"""Training: one `fit()` loop shared by pretraining, fine-tuning and multimodal training, and
`pretrain()`, next-token prediction on a prepared folder.

    result = pretrain("data/shakespeare", "runs/shake", ModelConfig.from_preset("micro"), TrainConfig())

Every step of `fit` (see `train_step`) draws the micro-batches, runs forward/backward on each (the
loss normalised by the token count of the whole step, across processes), clips, and steps the
optimizers on a warmup + cosine schedule. Every `eval_interval` steps it evaluates and writes
`latest/` (and `best/` on improvement). It stops at `max_steps`, at `max_seconds`, on early stopping,
or on Ctrl-C / SIGTERM (after saving). Under `torchrun` it runs DistributedDataParallel, or FSDP
with `strategy="fsdp"` (see `parallel.py`): gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from omnigpt.checkpoint import (
    gather_weights,
    is_sharded,
    load_checkpoint,
    load_sharded,
    load_trainer_state,
    open_run_folder,
    save_checkpoint,
    save_sharded,
    start_run_folder,
)
from omnigpt.config import UNLIMITED_STEPS, ModelConfig, TrainConfig, load_json, save_json
from omnigpt.data import RandomWindows, load_tokens, sequential_windows
from omnigpt.errors import OmnigptError
from omnigpt.hardware import autocast, pick_device, resolve_precision
from omnigpt.model import GPT
from omnigpt.muon import Muon
from omnigpt.parallel import (
    clip_gradients,
    gradient_sync,
    is_fsdp,
    memory_report,
    parallelize,
)
from omnigpt.tokenizer import IGNORE_INDEX, Tokenizer


class Batches(Protocol):
    """What `fit` draws training batches from: `data.RandomWindows`, `examples.ExampleBatches`."""

    block_size: int

    def next_batch(self) -> tuple: ...  # (x, y) or (x, y, extra model inputs)

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> Dist:
    """Joins the process group when started by torchrun; a plain process is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def end_distributed() -> None:
    """Leaves the process group after a run that finished on every process. Without it the group's
    threads are torn down with the interpreter, which can abort the process (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- optimisation ---------------------------------------------------------------------------------


def build_optimizers(
    model: GPT, cfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the blocks' weight matrices and AdamW for the rest.

    Weight decay applies to matrices and embeddings only, never to biases and norm gains.
    `cfg.lr_scale` ({"vision": 0.1, ...}) multiplies the learning rate of the parameters under those
    name prefixes (the longest matching prefix counts): per-part learning rates.
    """

    def scale(name: str) -> float:
        hits = [p for p in cfg.lr_scale if name == p or name.startswith(p + ".")]
        return cfg.lr_scale[max(hits, key=len)] if hits else 1.0

    seen: set[int] = set()
    groups: dict[tuple[str, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # frozen, or a tied weight already counted
            continue
        seen.add(id(p))
        if (
            cfg.optimizer == "muon"
            and p.ndim == 2
            and ".h." in f".{name}"
            and "lora_" not in name  # low-rank adapters train with AdamW
        ):
            kind = "muon"
        else:
            kind = "decay" if p.ndim >= 2 else "no_decay"
        groups.setdefault((kind, scale(name)), []).append(p)

    def param_groups(kinds: tuple[str, ...], lr: float) -> list[dict]:
        return [
            {
                "params": params,
                "lr": lr * factor,
                "weight_decay": 0.0 if kind == "no_decay" else cfg.weight_decay,
            }
            for (kind, factor), params in groups.items()
            if kind in kinds
        ]

    fused = device.type in ("cuda", "cpu")
    adamw = param_groups(("decay", "no_decay"), cfg.lr) or [{"params": [], "lr": cfg.lr}]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adamw, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    ]
    muon = param_groups(("muon",), cfg.muon_lr)
    if muon:
        optimizers.append(
            Muon(
                muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
            )
        )
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio` as progress goes 0 → 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    model: GPT,
    batches: Iterable[tuple],
    device: torch.device,
    dist_info: Dist | None = None,
    precision: str = "auto",
) -> float:
    """Mean next-token loss over every target token in `batches` (summed across processes)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    if is_fsdp(model) and dist_info is not None and dist_info.world_size > 1:
        batches = _as_many_batches(list(batches), device)
    for batch in batches:
        x, y, extras = _unpack(batch, device)
        with autocast(device, precision):
            logits, _ = model(x, **extras)
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)),
            y.view(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += torch.stack([loss.double(), (y != IGNORE_INDEX).sum().double()])
    if dist_info is not None and dist_info.world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def _as_many_batches(batches: list[tuple], device: torch.device) -> list[tuple]:
    """`batches` made as long as every other process's list with batches that have no targets: a
    sharded model's every forward pass needs all processes."""
    count = torch.tensor([len(batches)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    empty = (torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), IGNORE_INDEX))
    return batches + [empty] * (int(count.item()) - len(batches))


def _unpack(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A batch is (x, y), or (x, y, extras) with extra model inputs (packed positions and masks)."""
    x, y, *rest = batch
    extras = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), extras


# -- one step -------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step saw; tensors stay on the device until a log line reads them."""

    loss_sum: torch.Tensor  # summed token losses of this process
    targets: torch.Tensor  # target tokens of the whole step, all processes
    tokens: int  # tokens processed (padding included) by all processes
    grad_norm: torch.Tensor | None

    def mean_loss(self, dist_info: Dist) -> float:
        """The loss over the global batch, as one process would see it."""
        if dist_info.world_size > 1:
            dist.all_reduce(self.loss_sum)
        return self.loss_sum.item() / max(self.targets.item(), 1)


def train_step(
    model: GPT,
    train_model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    micro: list[tuple],
    cfg: TrainConfig,
    precision: str,
    dist_info: Dist,
) -> StepStats:
    """Forward and backward over the micro-batches, then clip and step the optimizers.

    Each micro-batch's loss is weighted by its share of the target tokens of the whole step (all
    micro-batches, all processes), so accumulation, DDP and FSDP give the gradient of one big batch."""
    device = dist_info.device
    targets = torch.tensor(float(sum((b[1] != IGNORE_INDEX).sum() for b in micro)), device=device)
    if dist_info.world_size > 1:
        dist.all_reduce(targets)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        x, y, extras = _unpack(batch, device)
        with gradient_sync(train_model, i == len(micro) - 1), autocast(device, precision):
            _, loss = train_model(x, y, **extras)
            n = (y != IGNORE_INDEX).sum()
            # DDP and FSDP average gradients over processes, hence × world_size
            scaled = loss * n * dist_info.world_size / targets
        scaled.backward()
        loss_sum += loss.detach().double() * n
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = clip_gradients(model, cfg.grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    tokens = sum(b[0].numel() for b in micro) * dist_info.world_size
    return StepStats(loss_sum, targets, tokens, grad_norm)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands; saved with `latest/` so that a resumed run continues exactly."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training seconds before `since`
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without a new best
    since: float = field(default=0.0, repr=False)  # when this process's clock started

    def start_clock(self) -> None:
        """From now on, time counts as training time."""
        self.since = time.time()

    def seconds(self) -> float:
        """Training seconds so far, earlier processes of the run included."""
        return self.elapsed + time.time() - self.since

    def fraction_done(self, cfg: TrainConfig) -> float:
        """How far through its budget the run is: steps, or time when that is further."""
        done = self.step / cfg.max_steps
        return max(done, self.seconds() / cfg.max_seconds) if cfg.max_seconds else done

    def record_val(self, loss: float) -> bool:
        """Takes a validation loss; whether it is a new best."""
        improved = loss < self.best_val
        self.best_val, self.bad_evals = (
            (loss, 0) if improved else (self.best_val, self.bad_evals + 1)
        )
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.seconds(),
            "best_val": self.best_val,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]


@dataclass
class RunResult:
    run_dir: str
    steps: int
    tokens: int
    seconds: float
    final_val_loss: float | None
    best_val_loss: float | None
    stopped_by: str
    precision: str = "fp32"  # what the run computed in ("auto" resolved)

    def __str__(self) -> str:
        val = f"{self.final_val_loss:.4f}" if self.final_val_loss is not None else "n/a"
        best = f"{self.best_val_loss:.4f}" if self.best_val_loss is not None else "n/a"
        return (
            f"{self.steps} steps, {self.tokens:,} tokens in {self.seconds:.1f}s "
            f"({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, {self.precision}); "
            f"final val loss {val}, best {best} (stopped by {self.stopped_by})"
        )


class RunCheckpoints:
    """A run's `best/` (weights) and `latest/` (weights and everything needed to resume: optimizer
    states, the data loader's position, the RNG and the run's progress).

    With one model copy per process the main process writes both. A sharded run (FSDP) writes
    `latest/` from every process at once (`checkpoint.save_sharded`), and gathers the weights onto
    the main process for `best/`, a single model.safetensors like any other."""

    def __init__(
        self,
        run_dir: Path,
        model: GPT,
        tokenizer: Tokenizer,
        optimizers: list[torch.optim.Optimizer],
        batches: Batches,
        progress: Progress,
        extra_config: dict[str, Any] | None,
        dist_info: Dist,
        sharded: bool,
    ):
        self.run_dir, self.model, self.tokenizer = run_dir, model, tokenizer
        self.optimizers, self.batches, self.progress = optimizers, batches, progress
        self.extra_config, self.dist_info, self.sharded = extra_config, dist_info, sharded

    def resume(self) -> None:
        """Everything as `latest/` left it, whatever the number of processes that wrote it."""
        latest = self.run_dir / "latest"
        state = load_trainer_state(latest)
        if is_sharded(latest):
            load_sharded(latest, self.model, self.optimizers)
        else:
            if self.sharded:
                raise OmnigptError(
                    f"{latest}: written with one model copy per process (strategy ddp), not "
                    "sharded; it resumes with strategy ddp"
                )
            for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
        self.batches.load_state_dict(state["loader"])
        rngs = state.get("torch_rngs", [])  # one per process, when the process count is the same
        mine = len(rngs) == self.dist_info.world_size
        torch.set_rng_state(rngs[self.dist_info.rank] if mine else state["torch_rng"])
        self.progress.load_state_dict(state)

    def save(self, folder: str) -> None:
        """Writes `folder` ("best" or "latest"); every process calls this together."""
        info, model, tokenizer = self.dist_info, self.model, self.tokenizer
        if folder == "best":
            weights = gather_weights(model) if self.sharded else None
            if info.is_main:
                save_checkpoint(
                    self.run_dir / folder, model, tokenizer, None, self.extra_config, weights
                )
            return
        rngs = [torch.get_rng_state()]
        if info.world_size > 1:
            rngs = [torch.empty_like(rngs[0], device=info.device) for _ in range(info.world_size)]
            dist.all_gather(rngs, torch.get_rng_state().to(info.device))
            rngs = [r.cpu() for r in rngs]
        state = {"loader": self.batches.state_dict(), "torch_rng": rngs[0], "torch_rngs": rngs}
        self._write_latest(state | self.progress.state_dict(), info.is_main)

    def save_interrupted(self, loader_state: dict, rng: torch.Tensor) -> bool:
        """After Ctrl-C / SIGTERM: `latest/` as of the last completed step (`loader_state` and `rng`
        rewind the interrupted one), written by the main process alone, since the others may be
        anywhere in a step. A sharded run cannot save without every process: it keeps its last
        `latest/` (False)."""
        if self.sharded and self.dist_info.world_size > 1:
            return False
        if self.dist_info.is_main:
            state = {"loader": loader_state, "torch_rng": rng, **self.progress.state_dict()}
            self._write_latest(state, is_main=True)
        return True

    def _write_latest(self, state: dict[str, Any], is_main: bool) -> None:
        """`latest/` with `state` (loader, RNG, progress) and the optimizers' states: sharded, by
        every process; or whole, by the main process."""
        folder, model, tokenizer = self.run_dir / "latest", self.model, self.tokenizer
        if self.sharded:
            save_sharded(
                folder, model, self.optimizers, tokenizer, state, self.extra_config, is_main
            )
        elif is_main:
            state["optimizers"] = [opt.state_dict() for opt in self.optimizers]
            save_checkpoint(folder, model, tokenizer, state, self.extra_config)


class RunLog:
    """The run's record: metrics.jsonl lines, the progress bar and printed evaluations (main process
    only), and the training throughput since the last log line."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, progress: Progress, main: bool, bar: bool):
        self.run_dir, self.cfg, self.progress, self.main = run_dir, cfg, progress, main
        self.file = open(run_dir / "metrics.jsonl", "a") if main else None
        self.bar = tqdm(
            total=None if cfg.max_steps >= UNLIMITED_STEPS else cfg.max_steps,
            initial=progress.step,
            unit="step",
            disable=not (main and bar),
            dynamic_ncols=True,
        )
        self.restart_window()

    def restart_window(self) -> None:
        """Tokens/s counts training only: evaluations and saves restart the window."""
        self.window_start, self.window_tokens = time.time(), 0

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def step(self, stats: StepStats, lr: float, dist_info: Dist) -> None:
        p, cfg = self.progress, self.cfg
        self.window_tokens += stats.tokens
        if p.step % cfg.log_interval == 0 or p.step == 1:
            loss = stats.mean_loss(dist_info)
            tps = self.window_tokens / max(time.time() - self.window_start, 1e-9)
            self.restart_window()
            grad_norm = None if stats.grad_norm is None else round(stats.grad_norm.item(), 4)
            self.write(
                {
                    "step": p.step,
                    "loss": round(loss, 5),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": p.tokens,
                    "tokens_per_s": round(tps),
                    "elapsed": round(p.seconds(), 2),
                }
            )
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if cfg.max_seconds:
                self.bar.set_description(f"{max(cfg.max_seconds - p.seconds(), 0):.0f}s left")
        self.bar.update(1)

    def val(self, loss: float, final: bool = False) -> None:
        ppl = math.exp(loss)
        record = {"step": self.progress.step, "val_loss": round(loss, 5), "val_ppl": round(ppl, 3)}
        self.write({**record, "final": True} if final else record)
        if not final and self.main:  # printed with or without the bar
            self.bar.write(f"step {self.progress.step}: val loss {loss:.4f} (perplexity {ppl:.2f})")

    def announce(self, precision: str, device: torch.device) -> None:
        if not self.bar.disable:
            auto = self.cfg.precision == "auto"
            self.bar.write(
                f"precision: {precision}" + (f" (auto on this {device.type})" if auto else "")
            )

    def close(self, result: RunResult | None = None) -> None:
        """Closes the log; at the end of a run also writes summary.json and the loss curve."""
        self.bar.close()
        if self.file is None:
            return
        self.file.close()
        self.file = None
        if result is not None:
            save_json(self.run_dir / "summary.json", result.__dict__)
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def resolve_run_precision(precision: str, dist_info: Dist) -> str:
    """ "auto" resolved for this machine; under DDP every process takes rank 0's answer (a measured
    probe may differ between processes)."""
    precision = resolve_precision(precision, dist_info.device)
    if dist_info.world_size > 1:
        bf16 = torch.tensor([int(precision == "bf16")], device=dist_info.device)
        dist.broadcast(bf16, src=0)
        precision = "bf16" if bf16.item() else "fp32"
    return precision


# -- the loop -------------------------------------------------------------------------------------


def fit(
    model: GPT,
    tokenizer: Tokenizer,
    train_batches: Batches,
    val: Callable[[], Iterable[tuple]],
    cfg: TrainConfig,
    run_dir: str | Path,
    dist_info: Dist,
    resume: bool = False,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> RunResult:
    """Trains `model` in place; writes checkpoints, metrics.jsonl, loss.png and summary.json to run_dir.

    `train_batches` has `next_batch()` → (x, y) or (x, y, extras), and `state_dict()` /
    `load_state_dict()` for resuming. `val()` returns this process's validation batches (for a
    token array: `functools.partial(data.sequential_windows, tokens, block_size, batch_size)`).
    """
    run_dir, device = Path(run_dir), dist_info.device
    precision = resolve_run_precision(cfg.precision, dist_info)
    # on the device; FSDP shards `model` in place
    train_model = parallelize(model, cfg, dist_info, precision)
    optimizers = build_optimizers(model, cfg, device)
    state = Progress()
    sharded = cfg.strategy == "fsdp"
    checkpoints = RunCheckpoints(
        run_dir,
        model,
        tokenizer,
        optimizers,
        train_batches,
        state,
        extra_config,
        dist_info,
        sharded,
    )
    if resume:
        checkpoints.resume()

    if dist_info.is_main:
        print(memory_report(model, optimizers, cfg.strategy, dist_info.world_size))
    log = RunLog(run_dir, cfg, state, dist_info.is_main, progress)
    log.announce(precision, device)
    model.train()
    stopped_by = "max_steps"
    loader_state, rng = train_batches.state_dict(), torch.get_rng_state()
    state.start_clock()
    try:
        while state.step < cfg.max_steps:
            if cfg.max_seconds is not None and state.seconds() >= cfg.max_seconds:
                stopped_by = "max_seconds"
                break
            factor = lr_factor(state.step, state.fraction_done(cfg), cfg)
            set_lr(optimizers, factor)
            # where this step starts, for a Ctrl-C during it
            loader_state, rng = train_batches.state_dict(), torch.get_rng_state()
            micro = [train_batches.next_batch() for _ in range(cfg.grad_accum)]
            stats = train_step(model, train_model, optimizers, micro, cfg, precision, dist_info)
            state.step, state.tokens = state.step + 1, state.tokens + stats.tokens
            log.step(stats, factor * cfg.lr, dist_info)
            if state.step % cfg.eval_interval == 0 and state.step < cfg.max_steps:
                val_loss = evaluate_loss(model, val(), device, dist_info, precision)
                improved = state.record_val(val_loss)
                log.val(val_loss)
                checkpoints.save("latest")
                if improved:
                    checkpoints.save("best")
                log.restart_window()
                if cfg.early_stop_patience and state.bad_evals >= cfg.early_stop_patience:
                    stopped_by = "early_stopping"
                    break
    except KeyboardInterrupt:
        # the state as of the last completed step: loader and RNG rewound to this step's start
        log.close()
        if not checkpoints.save_interrupted(loader_state, rng) and dist_info.is_main:
            print(f"a sharded run resumes from its last checkpoint ({run_dir / 'latest'})")
        raise
    log.bar.close()
    seconds = state.seconds()  # training time, the final evaluation excluded
    val_loss = evaluate_loss(model, val(), device, dist_info, precision)
    if val_loss < state.best_val:  # a new best, but no evaluation counted for early stopping
        state.best_val = val_loss
        checkpoints.save("best")
    checkpoints.save("latest")
    log.val(val_loss, final=True)
    steps, tokens, best = state.step, state.tokens, state.best_val
    result = RunResult(str(run_dir), steps, tokens, seconds, val_loss, best, stopped_by, precision)
    log.close(result)
    return result


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -- pretraining from a prepared folder ------------------------------------------------------------


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows rounded up for faster matmuls; the extra rows are never targets."""
    return -(-n // multiple) * multiple


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    model_cfg: ModelConfig | None,
    train_cfg: TrainConfig,
    resume: bool = False,
    init_from: str | Path | None = None,
    progress: bool = True,
    resume_overrides: dict[str, Any] | None = None,
) -> RunResult:
    """Next-token pretraining on a folder made by `omnigpt prepare`, into run folder `out_dir`.

    With `resume`, the model and training settings come from the run folder, except the entries of
    `resume_overrides` (typically larger budgets: `max_steps`, `max_seconds`); `train_cfg` is unused.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    saved = open_run_folder(out_dir, resume)
    if saved is not None:
        train_cfg = TrainConfig.from_dict({**saved["train"], **(resume_overrides or {})})
        model, tokenizer = load_checkpoint(out_dir / "latest")
        data_dir = Path(saved.get("data", data_dir))
    else:
        tokenizer = Tokenizer.load(data_dir)
        model = _initial_model(tokenizer, model_cfg, train_cfg.seed, init_from, data_dir)
    dist_info = setup_distributed(train_cfg.device)
    meta = load_json(data_dir / "meta.json") if (data_dir / "meta.json").exists() else {}
    if meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise OmnigptError(f"tokenizer of {data_dir} does not match the model's tokenizer")
    train_tokens = load_tokens(data_dir / "train.bin")
    val_tokens = (
        load_tokens(data_dir / "val.bin") if (data_dir / "val.bin").stat().st_size else train_tokens
    )
    block, batch = model.config.block_size, train_cfg.batch_size
    rank, world = dist_info.rank, dist_info.world_size
    torch.manual_seed(train_cfg.seed + rank)  # dropout differs per process
    batches = RandomWindows(train_tokens, block, batch, train_cfg.seed, rank, world)
    val = functools.partial(
        sequential_windows, val_tokens, block, batch, train_cfg.eval_batches, rank, world
    )
    if dist_info.is_main:
        if saved is None:
            config = {"model": model.config.to_dict(), "train": train_cfg.to_dict()}
            start_run_folder(out_dir, {**config, "data": str(data_dir)}, tokenizer)
        print(model.describe())
        print(
            f"training on {len(train_tokens):,} tokens from {data_dir}, validating on {len(val_tokens):,}; "
            f"run folder {out_dir}"
        )
    return fit(model, tokenizer, batches, val, train_cfg, out_dir, dist_info, resume, progress)


def _initial_model(
    tokenizer: Tokenizer,
    model_cfg: ModelConfig | None,
    seed: int,
    init_from: str | Path | None,
    data_dir: Path,
) -> GPT:
    """A new run's model: the weights of `init_from` (same tokenizer), or random ones, the same on
    every process."""
    if init_from is not None:
        model, ckpt_tokenizer = load_checkpoint(init_from)
        reason = tokenizer.differs_from(ckpt_tokenizer)
        if reason:
            raise OmnigptError(f"{init_from} does not fit the data in {data_dir}: {reason}")
        return model
    if model_cfg is None:
        raise OmnigptError("a new run needs a model config (or init_from)")
    model_cfg = model_cfg.with_image_grid(*tokenizer.image_grid())
    model_cfg.vocab_size = padded_vocab(tokenizer.vocab_size)
    torch.manual_seed(seed)
    return GPT(model_cfg)
