"""What the machine computes fast: the device and precision `auto` picks, and a description of it.

    resolve_precision("auto", torch.device("cpu"))  # "bf16" with AMX (or where a probe finds it faster)
    with autocast(device, "auto"): ...              # bf16 autocast only where bf16 is native
    machine_info()                                  # CPU model, capability, cores, torch: for benchmarks

bf16 halves memory traffic and, where the hardware multiplies bf16 natively (CUDA GPUs from Ampere on,
x86 CPUs with AMX or AVX-512 BF16), runs matmuls several times faster than fp32. A CPU without those
instructions (AVX2 only, e.g. AMD Zen 3) emulates bf16 matmuls about 100× slower than fp32, so there
`auto` means fp32, and an explicit `bf16` still works but says once, on stderr, that it will be slow.
On x86 the decision follows what the CPU reports: AMX settles it; where the report is ambiguous
(AVX-512 BF16 without AMX, other architectures) a short measured probe (milliseconds) decides.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import time

import torch

PRECISIONS = ("auto", "fp32", "bf16")
PROBE_SIZE = 256  # the probe multiplies PROBE_SIZE² matrices: ~34 MFLOP, milliseconds when native
PROBE_MARGIN = 0.8  # bf16 counts as native when its matmul takes under 0.8× the fp32 time

_warned: set[str] = set()


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name as torch spells it."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_capability() -> str:
    """The vector instruction set ATen dispatches to on this CPU: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_bf16_instructions() -> bool | None:
    """What the CPU reports: True for AMX, False without AVX-512 BF16 (or where ATen does not run
    AVX-512 kernels), None where the report leaves it open (AVX-512 BF16 alone, other architectures)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    if not cpu_capability().startswith("AVX512"):
        return False
    if torch.cpu._is_amx_tile_supported():
        return True
    return None if torch.cpu._is_avx512_bf16_supported() else False


def _matmul_seconds(dtype: torch.dtype, n: int = PROBE_SIZE, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first-call dispatch and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def bf16_matmul_is_faster() -> bool:
    """The measured probe: a bf16 matmul on the CPU beats the fp32 one by a clear margin. It runs on
    one thread: a multi-threaded matmul this small stalls for milliseconds whenever the other cores
    are busy, which would swamp the comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _matmul_seconds(torch.bfloat16) < PROBE_MARGIN * _matmul_seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matmuls natively and faster than fp32 (decided once per process)."""
    reported = cpu_has_bf16_instructions()
    return reported if reported is not None else bf16_matmul_is_faster()


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matmuls are native, and faster than fp32, on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_native()
    return False  # MPS and others: fp32 until measured


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to compute in: "auto" → "bf16" where bf16 is native on `device`, else "fp32";
    "fp32" and "bf16" as given.

    An explicit "bf16" on a CPU that emulates it is honoured, with one warning on stderr per process.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_native():
        _warn_once(
            "bf16-emulated",
            f"omnigpt: warning: bf16 on this CPU ({cpu_capability()}, no AMX or AVX-512 BF16) is "
            "emulated, and its matmuls run about 100x slower than fp32; --precision auto or fp32 "
            "is the fast choice here.",
        )
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where `precision` resolves to bf16 on `device`; no autocast (fp32) otherwise."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_dtype(device: torch.device) -> torch.dtype:
    """The dtype for work that tolerates bf16's precision (Muon's orthogonalisation): bf16 where it
    is native on `device`, fp32 elsewhere."""
    return torch.bfloat16 if bf16_native(device) else torch.float32


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The machine a figure was measured on, for benchmark records."""
    info = {
        "cpu": cpu_model(),
        "capability": cpu_capability(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "bf16_native_cpu": cpu_bf16_native(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
