"""Memory per process and step time of DDP and FSDP, the same model and global batch, two processes.

    python benchmarks/fsdp_memory.py                       # GPT-2 124M shape, 2 CPU processes (gloo)
    python benchmarks/fsdp_memory.py --preset micro --steps 3

Runs itself under torchrun once per strategy. Each process builds the model, wraps it with
`parallel.parallelize` as `fit` does, and trains `--steps` timed steps (after one untimed) with
`train.train_step` on random tokens, AdamW (or `--optimizer muon`), fp32. Reported per process: what `memory_report` counts
(parameters, gradients, optimizer state: the part FSDP shards), and what the operating system saw,
after the C allocator returned its free memory (`malloc_trim`): the resident memory once the model
is built and wrapped, and between steps (weights, optimizer state, DDP's gradient buckets; the
gradients themselves are freed after each step); and the peak over the run (`ru_maxrss`: building
the whole model before sharding, activations, gathered blocks). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.hardware import machine_info
from omnigpt.model import GPT
from omnigpt.parallel import memory_per_process, memory_report, parallelize
from omnigpt.train import build_optimizers, end_distributed, setup_distributed, train_step

# every allocation over 128 kB is its own mapping, returned to the system when freed: the resident
# peak then follows the memory in use, not what glibc's heap kept after a free
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_mb() -> float:
    """Resident memory now, after the C allocator has given back what it holds free."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def worker(args) -> None:
    """One process of a torchrun job: build, wrap, train, report."""
    info = setup_distributed("cpu")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, block_size=args.context)
    model = GPT(cfg)
    train_cfg = TrainConfig(
        batch_size=args.batch // info.world_size,
        strategy=args.strategy,
        precision="fp32",
        activation_checkpointing=args.activation_checkpointing,
        optimizer=args.optimizer,
    )
    train_model = parallelize(model, train_cfg, info, "fp32")
    optimizers = build_optimizers(model, train_cfg, info.device)
    report = memory_report(model, optimizers, args.strategy, info.world_size)
    held = [v / 1e6 for v in memory_per_process(model, optimizers).values()]
    built = rss_mb()
    gen = torch.Generator().manual_seed(info.rank)
    times = []
    for _ in range(args.steps + 1):
        data = torch.randint(
            cfg.vocab_size, (train_cfg.batch_size, cfg.block_size + 1), generator=gen
        )
        start = time.perf_counter()
        stats = train_step(
            model, train_model, optimizers, [(data[:, :-1], data[:, 1:])], train_cfg, "fp32", info
        )
        stats.mean_loss(info)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    between = rss_mb()  # weights and optimizer state (gradients are freed after each step)
    row = torch.tensor([built, between, peak, *held], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(info.world_size)]
    dist.all_gather(rows, row)
    if info.is_main:
        print(report)
        result = {
            "strategy": args.strategy,
            "activation_checkpointing": args.activation_checkpointing,
            "step_s_median": round(sorted(times[1:])[len(times[1:]) // 2], 3),
            "per_process": [
                dict(
                    zip(
                        [
                            "rss_after_build_mb",
                            "rss_between_steps_mb",
                            "peak_rss_mb",
                            "params_mb",
                            "grads_mb",
                            "optimizer_mb",
                        ],
                        [round(v, 1) for v in r.tolist()],
                        strict=True,
                    )
                )
                for r in rows
            ],
        }
        print("RESULT " + json.dumps(result), flush=True)
    end_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], help="(set when run as a worker)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    if "RANK" in os.environ:
        return worker(args)
    results = []
    for strategy, checkpointing in (("ddp", False), ("fsdp", False), ("fsdp", True)):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.processes}",
            __file__,
            "--strategy",
            strategy,
            "--preset",
            args.preset,
            "--context",
            str(args.context),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--optimizer",
            args.optimizer,
        ]
        cmd += ["--activation-checkpointing"] if checkpointing else []
        threads = max(1, (os.cpu_count() or 2) // args.processes)
        out = subprocess.run(
            cmd,
            env={**os.environ, "OMP_NUM_THREADS": str(threads), **MALLOC},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(next(line for line in out.splitlines() if line.startswith("memory per process")))
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
        print(json.dumps(results[-1]))
    summary = {
        "machine": machine_info(),
        "preset": args.preset,
        "context": args.context,
        "global_batch": args.batch,
        "processes": args.processes,
        "optimizer": args.optimizer,
        "runs": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
