"""Run-time settings every script shares: device, mixed precision, torch.compile, workers.

The amp choice is resolved to a torch.dtype once (resolve_amp) and passed around as such.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
from typing import Callable, NoReturn

import torch
from torch import nn

__all__ = ["default_device", "resolve_amp", "amp_name", "autocast", "compile_available",
           "maybe_compile", "available_cpus", "default_workers", "positive_int",
           "non_negative_int", "HelpFormatter", "add_common_args", "select_kernels", "run_cli"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None means CUDA when available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX on this x86 CPU (Linux /proc/cpuinfo); else bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a --amp value, decided once.

    'auto' picks by measurement per device class:
      * CUDA with fp16 tensor cores (compute capability 7.0, Volta, and newer): float16 (with
        a GradScaler in training). On an H200, resnext50_32x4d trains at 4,446 images/s in
        fp16 vs 3,675 in bf16 (channels_last, batch 256): cuDNN's grouped convolutions are
        faster in fp16; Volta and Turing have no bf16 anyway.
      * older CUDA GPUs: None (fp32). They have no tensor cores; consumer Pascal (6.1) runs
        fp16 arithmetic at 1/64 of its fp32 rate (NVIDIA's GP104 specifications). The P100
        (6.0) has fast fp16, but nobody measured it here, so it gets fp32 too.
      * CPU with AVX512-BF16 or AMX: bfloat16 (1.5-3.9x fp32 inference on a 2-core EPYC,
        benchmarks/results_cpu.json). Other CPUs: None (fp32), since bf16 is emulated there.

    Args:
        amp: None (fp32), 'auto', 'bf16', 'fp16', or already a dtype.
        device: where the model runs.
    Returns:
        torch.bfloat16, torch.float16 or None (fp32).
    Raises:
        ValueError: an unknown value.
    """
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp == "auto":
        if device.type == "cuda":
            return torch.float16 if _cuda_has_tensor_cores(device) else None
        return torch.bfloat16 if device.type == "cpu" and _cpu_has_fast_bf16() else None
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or None, got {amp!r}")
    return _AMP_DTYPES[amp]


def _cuda_has_tensor_cores(device: torch.device) -> bool:
    try:
        return torch.cuda.get_device_capability(device) >= (7, 0)
    except (RuntimeError, AssertionError):  # no usable GPU: moving the model will say so
        return True


def amp_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32', for logs."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for a block.

    Args:
        device: where the block runs (its type selects CPU or CUDA autocast).
        dtype: torch.bfloat16 / torch.float16 (resolve_amp's result), or None for fp32.
    Returns:
        torch.autocast(device.type, dtype), or a no-op context for None.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can run here: Inductor needs a C++ compiler (and Triton on
    CUDA). Returns (ok, reason when not)."""
    if not shutil.which(os.environ.get("CXX", "c++")) and not shutil.which("g++"):
        return False, "no C++ compiler found"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    return True, ""


def select_kernels(deterministic: bool) -> None:
    """How this process picks GPU kernels, for train.py and evaluate.py alike.

    deterministic: the same kernels every run (torch's deterministic algorithms, cuDNN's
    autotuner off, cuBLAS's workspace set as its docs require), so runs are bitwise
    repeatable and slower; else cuDNN's autotuner times the candidates once per input shape
    and keeps the fastest (one crop size per run, so it pays off).
    """
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def maybe_compile(model: nn.Module, device: torch.device, announce: bool = True,
                  **compile_kwargs) -> nn.Module:
    """torch.compile where it can run, else the model unchanged.

    Args:
        model: the module to compile.
        device: where it runs (CUDA also needs Triton).
        announce: print why compilation was skipped.
        **compile_kwargs: forwarded to torch.compile (e.g. mode='reduce-overhead').
    Returns:
        The compiled module (compiled lazily, on its first calls) or `model` itself.
    """
    ok, why = compile_available(device)
    if ok:
        return torch.compile(model, **compile_kwargs)
    if announce:
        print(f"--compile ignored: {why}; running eager")
    return model


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(processes_per_node: int | None = None, cap: int = 16) -> int:
    """Data-loading workers per process, never more than the CPUs, so that torch's "more
    workers than CPUs" warning never fires: e.g. 1 on 2 CPUs, 15 on 16 CPUs, 11 per GPU
    process on 96 CPUs with 8 GPUs.

    Args:
        processes_per_node: processes sharing this node's CPUs; default torchrun's
            LOCAL_WORLD_SIZE, else 1.
        cap: the most workers per process.
    Returns:
        CPUs per process less one (for the process itself), clamped to 1..cap.
    """
    if processes_per_node is None:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(cap, available_cpus() // max(1, processes_per_node) - 1))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or less is an argument error, not a traceback)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where the help already says what the default
    is, or the default is None or False (nothing to say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_common_args(parser: argparse.ArgumentParser, batch_size: int = 32,
                    training: bool = False) -> None:
    """The flags train.py, evaluate.py and predict.py share, with one meaning and default:
    --model, --batch-size (images per process), --workers (default_workers()), --img-size,
    --device, --amp, --channels-last/--no-channels-last (on), --compile, --verbose,
    --max-image-pixels.

    Args:
        parser: the script's parser, extended in place.
        batch_size: the script's default images per process (32, the recipe's; predict 16).
        training: train.py's wording for --model and --img-size (no checkpoint decides them).
    """
    p = parser
    p.add_argument("--model", default=None, help="factory or seed name (resnext50_32x4d, "
                   "resnext50-32x4d_8xb32_in1k, ...); default: " + (
                       "resnext50_32x4d" if training else
                       "the checkpoint's own, else resnext50_32x4d"))
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="images per process")
    p.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help=f"data-loading processes per process (default: this node's CPUs per "
                        f"process less one, 1 to 16: here {default_workers()})")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="crop size in pixels; evaluation resizes to img-size/0.875 first. "
                        "Default: " + ("224" if training else
                                       "the size stored with the weights, else 224"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; default cuda when "
                   "available")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16"], default=None,
                   help="autocast dtype; default fp32 (the reference numbers). auto: fp16 on "
                        "GPUs with tensor cores (Volta and newer; measured faster on H200), "
                        "bf16 on CPUs with AVX512-BF16/AMX, else fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (same results to float rounding, faster)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (needs a C++ compiler; pays off on long runs)")
    p.add_argument("--verbose", action="store_true",
                   help="when weights do not fit the model, list every key (default: the "
                        "architecture the file holds and the first keys)")
    p.add_argument("--max-image-pixels", type=non_negative_int, default=None,
                   help="refuse images with more pixels than this (decompression-bomb guard); "
                        "0 = no limit; default Pillow's 89,478,485")


def run_cli(prog: str, main: Callable[[argparse.Namespace], object],
            args: argparse.Namespace) -> NoReturn:
    """Run predict.py's or evaluate.py's main and exit the way command-line tools do.

    Exit status: main's return value when it is an int, else 0; 2 with one line
    "prog: error: ..." on stderr for ValueError, RuntimeError or FileNotFoundError (bad
    input, named by the message; ImageReadError is a ValueError); 141, silently, when the
    reader of stdout left (`predict.py ... | head`), as other Unix tools end.
    """
    try:
        status = main(args)
    except BrokenPipeError:
        # Point stdout at devnull so that Python's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)
