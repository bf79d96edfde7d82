"""Training: one `fit()` loop shared by pretraining, fine-tuning and, later, multimodal training.

    result = pretrain("data/shakespeare", "runs/shake", ModelConfig.from_preset("micro"), TrainConfig())

`fit` does, in order, every step: draw the micro-batches, forward/backward each (loss normalised by
the token count of the whole step, across processes), clip, step the optimizers on a warmup + cosine
schedule; every `eval_interval` steps it evaluates and writes `latest/` (and `best/` on improvement).
It stops at `max_steps`, at `max_seconds`, on early stopping, or on Ctrl-C / SIGTERM (after saving).
Under `torchrun` it runs DistributedDataParallel: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from omnigpt.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from omnigpt.config import UNLIMITED_STEPS, ModelConfig, TrainConfig, load_json, save_json
from omnigpt.data import RandomWindows, load_tokens, sequential_windows
from omnigpt.errors import OmnigptError
from omnigpt.hardware import autocast, resolve_precision
from omnigpt.model import GPT, IGNORE_INDEX
from omnigpt.muon import Muon
from omnigpt.tokenizer import Tokenizer


class Batches(Protocol):
    """What `fit` draws training batches from: `RandomWindows`, `finetune.ExampleBatches`."""

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


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


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
    batches,
    device: torch.device,
    dist_info: Dist | None = None,
    precision: str = "auto",
) -> float:
    """Mean next-token loss over every target token in `batches` (summed across processes)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
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


def _unpack(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A batch is (x, y), or (x, y, extras) with extra model inputs (packed positions and masks)."""
    x, y, *rest = batch
    extras = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), extras


# -- the loop -------------------------------------------------------------------------------------


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


def fit(
    model: GPT,
    tokenizer: Tokenizer,
    train_batches: Batches,
    val,
    cfg: TrainConfig,
    run_dir: str | Path,
    dist_info: Dist,
    resume: bool = False,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> RunResult:
    """Trains `model` in place; writes checkpoints, metrics.jsonl, loss.png and summary.json to run_dir.

    `train_batches` has `next_batch()` → (x, y) or (x, y, extras), and `state_dict()` /
    `load_state_dict()` for resuming. `val` is a token array (evaluated in windows of the block size)
    or a function returning an iterable of validation batches.
    """
    run_dir = Path(run_dir)
    device = dist_info.device
    model.to(device)
    precision = resolve_precision(cfg.precision, device)  # "auto" → what this machine runs fastest
    if dist_info.world_size > 1:  # every process computes as rank 0 decided (a probe may differ)
        bf16 = torch.tensor([int(precision == "bf16")], device=device)
        dist.broadcast(bf16, src=0)
        precision = "bf16" if bf16.item() else "fp32"
    optimizers = build_optimizers(model, cfg, device)
    step, tokens_seen, elapsed_before, best_val, bad_evals = 0, 0, 0.0, math.inf, 0
    if resume:
        state = load_trainer_state(run_dir / "latest")
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        train_batches.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        best_val, bad_evals = state["best_val"], state["bad_evals"]

    train_model = torch.compile(model) if cfg.compile else model
    if dist_info.world_size > 1:
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    log_file = open(run_dir / "metrics.jsonl", "a") if dist_info.is_main else None

    def log(record: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def run_eval() -> float:
        if callable(val):
            batches = val()
        else:
            batches = sequential_windows(
                val,
                train_batches.block_size,
                cfg.batch_size,
                cfg.eval_batches,
                dist_info.rank,
                dist_info.world_size,
            )
        return evaluate_loss(model, batches, device, dist_info, precision)

    def save(
        folder: str, loader_state: dict | None = None, rng_state: torch.Tensor | None = None
    ) -> None:
        """Writes best/ (weights) or latest/ (weights and everything needed to resume)."""
        if not dist_info.is_main:
            return
        trainer_state = None
        if folder == "latest":
            trainer_state = {
                "optimizers": [opt.state_dict() for opt in optimizers],
                "loader": loader_state if loader_state is not None else train_batches.state_dict(),
                "torch_rng": rng_state if rng_state is not None else torch.get_rng_state(),
                "step": step,
                "tokens": tokens_seen,
                "elapsed": elapsed_before + (time.time() - t0),
                "best_val": best_val,
                "bad_evals": bad_evals,
            }
        save_checkpoint(run_dir / folder, model, tokenizer, trainer_state, extra_config)

    t0 = time.time()
    window_t, window_tokens = time.time(), 0
    val_loss: float | None = None
    stopped_by = "max_steps"
    bar = tqdm(
        total=None if cfg.max_steps >= UNLIMITED_STEPS else cfg.max_steps,
        initial=step,
        unit="step",
        disable=not (progress and dist_info.is_main),
        dynamic_ncols=True,
    )
    if progress and dist_info.is_main:
        auto = f" ({cfg.precision} on this {device.type})" if cfg.precision == "auto" else ""
        print(f"precision: {precision}{auto}")
    model.train()
    loader_state, rng_state = train_batches.state_dict(), torch.get_rng_state()
    try:
        while step < cfg.max_steps:
            elapsed = elapsed_before + time.time() - t0
            if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                stopped_by = "max_seconds"
                break
            progress_frac = step / cfg.max_steps
            if cfg.max_seconds:
                progress_frac = max(progress_frac, elapsed / cfg.max_seconds)
            factor = lr_factor(step, progress_frac, cfg)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor

            # Normalise by the tokens of the whole step (all micro-batches, all processes), so that
            # accumulation and DDP give the same gradient as one big batch.
            # where this step starts, for a Ctrl-C during it
            loader_state, rng_state = train_batches.state_dict(), torch.get_rng_state()
            micro = [train_batches.next_batch() for _ in range(cfg.grad_accum)]
            n_tokens = torch.tensor(
                float(sum((b[1] != IGNORE_INDEX).sum() for b in micro)), device=device
            )
            # tokens processed (padding included) by all processes in this step
            step_tokens = sum(b[0].numel() for b in micro) * dist_info.world_size
            if dist_info.world_size > 1:
                dist.all_reduce(n_tokens)
            # read only when logging, so no step waits for the GPU
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, batch in enumerate(micro):
                x, y, extras = _unpack(batch, device)
                sync = i == len(micro) - 1 or dist_info.world_size == 1
                with (
                    contextlib.nullcontext() if sync else train_model.no_sync(),
                    autocast(device, precision),
                ):
                    _, loss = train_model(x, y, **extras)
                    n = (y != IGNORE_INDEX).sum()
                    # DDP averages gradients over processes, hence × world_size
                    scaled = loss * n * dist_info.world_size / n_tokens
                scaled.backward()
                loss_sum += loss.detach().double() * n
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            window_tokens += step_tokens
            if step % cfg.log_interval == 0 or step == 1:
                # the loss over the global batch, as one process would see it
                if dist_info.world_size > 1:
                    dist.all_reduce(loss_sum)
                train_loss = loss_sum.item() / max(n_tokens.item(), 1)
                now = time.time()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                log(
                    {
                        "step": step,
                        "loss": round(train_loss, 5),
                        "lr": factor * cfg.lr,
                        "grad_norm": None if grad_norm is None else round(grad_norm.item(), 4),
                        "tokens": tokens_seen,
                        "tokens_per_s": round(tps),
                        "elapsed": round(elapsed_before + now - t0, 2),
                    }
                )
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                if cfg.max_seconds:
                    bar.set_description(
                        f"{max(cfg.max_seconds - (elapsed_before + now - t0), 0):.0f}s left"
                    )
            bar.update(1)

            if step % cfg.eval_interval == 0 and step < cfg.max_steps:
                val_loss = run_eval()
                improved = val_loss < best_val
                best_val, bad_evals = (val_loss, 0) if improved else (best_val, bad_evals + 1)
                log(
                    {
                        "step": step,
                        "val_loss": round(val_loss, 5),
                        "val_ppl": round(math.exp(val_loss), 3),
                    }
                )
                if dist_info.is_main:
                    bar.write(
                        f"step {step}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})"
                    )
                save("latest")
                if improved:
                    save("best")
                window_t, window_tokens = time.time(), 0  # tokens/s measures training only
                if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                    stopped_by = "early_stopping"
                    break
    except KeyboardInterrupt:
        # Save the state as of the last completed step: loader and RNG rewound to the interrupted
        # step's start.
        bar.close()
        save("latest", loader_state, rng_state)
        if log_file is not None:
            log_file.close()
        raise
    bar.close()
    seconds = elapsed_before + time.time() - t0  # training time, final evaluation excluded

    val_loss = run_eval()
    if val_loss < best_val:
        best_val = val_loss
        save("best")
    save("latest")
    log(
        {
            "step": step,
            "val_loss": round(val_loss, 5),
            "val_ppl": round(math.exp(val_loss), 3),
            "final": True,
        }
    )
    result = RunResult(
        str(run_dir), step, tokens_seen, seconds, val_loss, best_val, stopped_by, precision
    )
    if dist_info.is_main:
        log_file.close()
        save_json(run_dir / "summary.json", result.__dict__)
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
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
    if resume:
        if not (out_dir / "latest").is_dir():
            raise OmnigptError(f"{out_dir}: nothing to resume (no latest/ checkpoint)")
        saved = load_json(out_dir / "config.json")
        train_cfg = TrainConfig.from_dict({**saved["train"], **(resume_overrides or {})})
        model, tokenizer = load_checkpoint(out_dir / "latest")
        data_dir = Path(saved.get("data", data_dir))
    dist_info = setup_distributed(train_cfg.device)
    if not resume:
        if (out_dir / "latest").exists() or (out_dir / "best").exists():
            raise OmnigptError(
                f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out"
            )
        tokenizer = Tokenizer.load(data_dir)
        if init_from is not None:
            model, ckpt_tokenizer = load_checkpoint(init_from)
            if ckpt_tokenizer.fingerprint != tokenizer.fingerprint:
                raise OmnigptError(
                    f"{init_from} was trained with another tokenizer than {data_dir}"
                )
        else:
            assert model_cfg is not None
            model_cfg.vocab_size = padded_vocab(tokenizer.vocab_size)
            torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
            model = GPT(model_cfg)
    meta = load_json(data_dir / "meta.json") if (data_dir / "meta.json").exists() else {}
    if meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise OmnigptError(f"tokenizer of {data_dir} does not match the model's tokenizer")
    train_tokens = load_tokens(data_dir / "train.bin")
    val_tokens = (
        load_tokens(data_dir / "val.bin") if (data_dir / "val.bin").stat().st_size else train_tokens
    )
    block_size = model.config.block_size
    torch.manual_seed(train_cfg.seed + dist_info.rank)  # dropout differs per process
    batches = RandomWindows(
        train_tokens,
        block_size,
        train_cfg.batch_size,
        train_cfg.seed,
        dist_info.rank,
        dist_info.world_size,
    )
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(model.describe())
        print(
            f"training on {len(train_tokens):,} tokens from {data_dir}, validating on {len(val_tokens):,}; "
            f"run folder {out_dir}"
        )
        if not resume:
            save_json(
                out_dir / "config.json",
                {
                    "model": model.config.to_dict(),
                    "train": train_cfg.to_dict(),
                    "data": str(data_dir),
                    "tokenizer_fingerprint": tokenizer.fingerprint,
                },
            )
            tokenizer.save(out_dir)
    return fit(
        model, tokenizer, batches, val_tokens, train_cfg, out_dir, dist_info, resume, progress
    )
