"""Run-time settings every script shares: device, mixed precision, torch.compile, workers.

The amp choice is resolved to a torch.dtype once (resolve_amp) and passed around as such.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError, ResNeXtWarning

__all__ = ["default_device", "resolve_amp", "amp_name", "autocast", "compile_available",
           "maybe_compile", "available_cpus", "default_workers", "select_kernels",
           "shared_memory_free", "fit_loader_to_shared_memory", "quiet_torch"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device that this process can use; None means CUDA when available,
    else CPU.

    Raises:
        ConfigError (a ValueError): a malformed device string, or a CUDA device when torch
            sees no GPU (or fewer than its index needs).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"--device {device}: torch {torch.__version__} ({build}) sees "
                              f"{count} CUDA GPU(s); use --device cpu")
    return dev


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

    'auto' picks per device class (the measurements behind it: docs/performance.md):
      * CUDA with fp16 tensor cores (compute capability 7.0, Volta, and newer): float16 (with
        a GradScaler in training); cuDNN's grouped convolutions are faster in fp16 than in
        bf16, and Volta and Turing have no bf16 anyway.
      * older CUDA GPUs: None (fp32). They have no tensor cores; consumer Pascal (6.1) runs
        fp16 arithmetic at 1/64 of its fp32 rate (NVIDIA's GP104 specifications). The P100
        (6.0) has fast fp16 but is unmeasured, so it gets fp32 too.
      * CPU with AVX512-BF16 or AMX: bfloat16. Other CPUs: None (fp32), since bf16 is
        emulated there.

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
        raise ConfigError(f"amp must be 'auto', 'bf16', 'fp16' or None, got {amp!r}")
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
        announce: warn (ResNeXtWarning) why compilation was skipped.
        **compile_kwargs: forwarded to torch.compile (e.g. mode='reduce-overhead').
    Returns:
        The compiled module (compiled lazily, on its first calls) or `model` itself.
    """
    ok, why = compile_available(device)
    if ok:
        return torch.compile(model, **compile_kwargs)
    if announce:
        warnings.warn(f"--compile ignored: {why}; running eager", ResNeXtWarning,
                      stacklevel=2)
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


def shared_memory_free() -> int | None:
    """Free bytes in /dev/shm, where DataLoader workers hand their batches to the main process
    (Linux); None where there is no such folder."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def fit_loader_to_shared_memory(workers: int, prefetch: int, batch_bytes: int,
                                free: int | None = None) -> tuple[int, int, str | None]:
    """Loader workers and prefetch that fit the shared memory there is.

    Each worker keeps up to `prefetch` batches in /dev/shm until the main process takes them;
    when that does not fit (Docker's default /dev/shm is 64 MB), the workers fail or, worse,
    the main process waits for a batch that never comes. This asks for less instead: fewer
    batches in flight, then fewer workers, then none (decoding in the main process).

    Args:
        workers: the asked number of loader processes.
        prefetch: batches each worker keeps in flight (DataLoader's prefetch_factor).
        batch_bytes: bytes of one batch of samples as the workers send them.
        free: free shared memory in bytes; default shared_memory_free().
    Returns:
        (workers, prefetch, note): unchanged with note None when it fits or nothing is known;
        else what fits and a one-line note of the cause and the fix.
    """
    free = shared_memory_free() if free is None else free
    per_batch = int(batch_bytes * 1.5) + 1  # headroom: labels, a batch being collated
    if workers == 0 or free is None or workers * prefetch * per_batch <= free:
        return workers, prefetch, None
    new_prefetch = max(1, min(prefetch, free // (workers * per_batch)))
    new_workers = workers if workers * new_prefetch * per_batch <= free else min(
        workers, free // per_batch)
    chosen = (f"{new_workers} workers x {new_prefetch} batches" if new_workers else
              "no loader workers (decoding in the main process)")
    note = (f"shared memory (/dev/shm, {free / 2**20:.0f} MB free) is too small for "
            f"{workers} workers x {prefetch} batches of {batch_bytes / 2**20:.1f} MB: using "
            f"{chosen}; a larger /dev/shm (docker run --shm-size=2g) or --workers changes it")
    return new_workers, new_prefetch, note


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Hide what torch 2.14 says on every call of the export and int8 paths: torch.jit.* and
    the TorchScript-based ONNX exporter are deprecated (FutureWarning/DeprecationWarning), so
    is torch.ao.quantization, and its x86 observers warn once each about reduce_range. The
    deprecations are documented in docs/export.md instead of repeated on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*reduce_range will be deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions")
        # Tracing an int8 model reads its fixed input scale as a Python float: a constant.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                message="Converting a tensor to a Python float")
        # torch.export.save of CPU weights (ours are): the note is about weights elsewhere.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        yield
