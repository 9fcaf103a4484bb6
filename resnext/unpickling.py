"""Weights-only unpickling of checkpoints written by frameworks we do not import.

torch.load(weights_only=True) refuses every global outside tensors and plain data. mmpretrain
1.x files also pickle mmengine and numpy objects (HistoryBuffer, numpy arrays and scalars,
builtins.getattr of a bound method), and some exporters write numpy arrays as weights. Those
names are bound here to inert stand-ins inside the weights-only unpickler: mmengine and numpy
are never imported, no foreign callable ever runs, and numpy arrays are rebuilt as tensors from
their pickled bytes. Anything else is still refused.
"""
from __future__ import annotations

import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["load_weights_only", "NumpyArrayStandIn"]


# --- weights-only unpickling with inert stand-ins -------------------------------------------

class _Inert:
    """Stand-in for a foreign object (mmengine HistoryBuffer, argparse Namespace, ...) met
    while unpickling: built from anything, keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return "<foreign object skipped>"


def _inert_call(*args, **kwargs) -> _Inert:
    """Stand-in for foreign callables (builtins.getattr of a pickled bound method)."""
    return _Inert()


# numpy arrays without numpy. An array pickles (protocol 2, torch.save's) as
#   _reconstruct(ndarray, (0,), b'b') then BUILD (version, shape, dtype, fortran, raw bytes),
# a dtype as dtype('f4', False, True) then BUILD (version, byte order, ...), a numpy scalar as
# scalar(dtype, raw bytes). The stand-ins below keep those plain values and rebuild a tensor
# from the bytes with torch.frombuffer; nothing of numpy is imported or called.
_NUMPY_TO_TORCH = {
    "f2": torch.float16, "f4": torch.float32, "f8": torch.float64,
    "i1": torch.int8, "i2": torch.int16, "i4": torch.int32, "i8": torch.int64,
    "u1": torch.uint8, "u2": torch.uint16, "u4": torch.uint32, "u8": torch.uint64,
    "b1": torch.bool, "c8": torch.complex64, "c16": torch.complex128,
}


class _NumpyDtype:
    """Stand-in for numpy.dtype: keeps the type code ('f4') and byte order ('<', '>')."""

    def __init__(self, code: Any = "", align: Any = False, copy: Any = False):
        self.code = code if isinstance(code, str) else "?"
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5:
            self.code = "?"
            return
        if state[1] in ("<", ">", "=", "|"):
            self.byteorder = state[1]
        if state[2] is not None or state[3] is not None:  # sub-array or structured dtype
            self.code = "structured"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _NUMPY_TO_TORCH.get(self.code)

    def __repr__(self) -> str:
        return f"<numpy dtype {self.code}>"


def _tensor_from_numpy_bytes(raw: Any, dtype: Any, shape: Any,
                             fortran: Any = False) -> torch.Tensor | None:
    """A tensor from a pickled numpy array's raw bytes, or None when it cannot be one
    (object, string or structured dtype, inconsistent sizes)."""
    if not isinstance(dtype, _NumpyDtype) or dtype.torch_dtype is None:
        return None
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple):
        return None
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        return None
    torch_dtype = dtype.torch_dtype
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    numel = 1
    for n in shape:
        numel *= n
    if numel * itemsize != len(raw):
        return None
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    stored = {"<": "little", ">": "big"}.get(dtype.byteorder, sys.byteorder)
    if itemsize > 1 and stored != sys.byteorder:
        flat = flat.view(-1, itemsize).flip(1).reshape(-1)
    values = flat.view(torch_dtype)
    if fortran is True and len(shape) > 1:  # column-major bytes: build transposed, turn back
        return values.reshape(shape[::-1]).permute(*reversed(range(len(shape)))).contiguous()
    return values.reshape(shape)


class NumpyArrayStandIn:
    """Stand-in for numpy.ndarray: rebuilds the array as a tensor from its pickled bytes
    (`tensor`); an array that cannot be a tensor (object/str dtype) keeps None there."""

    def __init__(self, *args, **kwargs):
        self.tensor: torch.Tensor | None = None
        self.dtype = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:  # (version, shape, dtype, fortran, raw)
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            return
        shape, dtype, fortran, raw = state
        self.dtype = dtype.code if isinstance(dtype, _NumpyDtype) else "?"
        self.tensor = _tensor_from_numpy_bytes(raw, dtype, shape, fortran)

    def __repr__(self) -> str:
        return f"<numpy array of dtype {self.dtype}, not converted>"


def _numpy_reconstruct(*args, **kwargs) -> NumpyArrayStandIn:
    """Stand-in for numpy's multiarray._reconstruct: an empty array that BUILD fills."""
    return NumpyArrayStandIn()


def _numpy_scalar(dtype: Any = None, raw: Any = None, *args) -> Any:
    """Stand-in for numpy's multiarray.scalar: the Python number, else an inert object."""
    value = _tensor_from_numpy_bytes(raw, dtype, ())
    return value.item() if value is not None else _Inert()


def _empty_bytes(*args) -> Any:
    """Stand-in for builtins.bytes, which protocol 2 calls with no argument for b'' (the
    data of an empty array); any argument (bytes(n) would allocate n bytes) gives nothing."""
    return _Inert() if args else b""


def _numpy_arrays_to_tensors(obj: Any, seen: set[int] | None = None) -> Any:
    """Replace every converted numpy stand-in inside dicts, lists and tuples by its tensor."""
    if isinstance(obj, NumpyArrayStandIn):
        return obj.tensor if obj.tensor is not None else obj
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _numpy_arrays_to_tensors(value, seen)
    elif isinstance(obj, list):
        obj[:] = [_numpy_arrays_to_tensors(v, seen) for v in obj]
    else:
        obj = tuple(_numpy_arrays_to_tensors(v, seen) for v in obj)
    return obj


_FOREIGN_CLASSES = ["mmengine.logging.history_buffer.HistoryBuffer", "argparse.Namespace"]
_STAND_INS = (
    [(_Inert, n) for n in _FOREIGN_CLASSES]
    + [(_inert_call, "builtins.getattr"), (_empty_bytes, "builtins.bytes")]
    + [(NumpyArrayStandIn, "numpy.ndarray"), (_NumpyDtype, "numpy.dtype")]
    + [(_numpy_reconstruct, f"numpy.{m}.multiarray._reconstruct") for m in ("core", "_core")]
    + [(_numpy_scalar, f"numpy.{m}.multiarray.scalar") for m in ("core", "_core")]
)


def _reason(message: str) -> str:
    """The unpickler's reason from torch's error text, without its advice: torch suggests
    weights_only=False or allowlisting the global, exactly what must not be done with an
    untrusted file."""
    text = message.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = [s for s in sentences
            if not re.search(r"weights_only|please use|if you trust|trusted source|"
                             r"safe_globals", s, re.IGNORECASE)]
    return " ".join(kept) or "it names objects outside the weights-only allowlist"


def load_weights_only(path: Path) -> Any:
    """torch.load with map_location='cpu' and weights_only=True, stand-ins registered.

    Raises:
        CheckpointError (a ValueError): naming `path`, if it is not a torch file or its
            pickle names a global outside torch's weights-only allowlist and our stand-ins
            (it never runs).
    """
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            # Zip-format files are memory-mapped: tensors are read lazily from the page cache
            # instead of copied up front (torch's legacy format cannot be mapped).
            raw = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
        return _numpy_arrays_to_tensors(raw)
    except pickle.UnpicklingError as e:
        detail = _reason(str(e))
        if re.search(r"global|reduce|build|new object", detail, re.IGNORECASE):
            raise CheckpointError(f"{path}: refused to load: its pickle asks for code beyond "
                                  f"tensors and plain data ({detail}); nothing from it was "
                                  f"run") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, EOF...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{_reason(str(e))})") from None
