"""Exported files (resnext.export) run where predict.py and evaluate.py run a checkpoint.

`--checkpoint best.int8.torchscript.pt` (or `.onnx`, `.pt2`, `.torchscript.pt`) is recognised
by its content (artifact_format) and run through its format's own loader (load_artifact),
with the class names and preprocessing written inside it. The file fixes its network, dtype
and input size: options that would change them are ignored with a warning (amp, BN folding,
compile, --model) or refused (another crop size). Exported files run on CPU here. A URL is
downloaded into torch.hub's cache and judged by the downloaded file (exported_file).

An exported file is a program, not weights: torch.jit.load, torch.export.load and ONNX
Runtime run the graph it holds. Load only files you trust, as with any model program.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ResNeXtWarning
from .hub import download_weights, is_url
from .quantize import cpu_has_vnni
from .transforms import Preprocessing

__all__ = ["artifact_format", "exported_file", "artifact_device", "ArtifactNet"]

_FORMAT_NAMES = {"torchscript": "TorchScript", "exported-program": "ExportedProgram",
                 "onnx": "ONNX"}


def artifact_format(source: str | os.PathLike) -> str | None:
    """Which exported format a local file holds, judged by content (a file may be named
    anything): 'torchscript' (a zip with code/ and constants.pkl), 'exported-program' (a zip
    with torch.export's archive_format or models/model.json), 'onnx' (not a zip, and either
    the .onnx suffix or the opening of an ONNX ModelProto: ONNX has no magic bytes); None for
    anything else (a checkpoint, a URL, no such file).
    """
    text = os.fspath(source)
    if "://" in text or not Path(text).is_file():
        return None
    if not zipfile.is_zipfile(text):
        return "onnx" if Path(text).suffix.lower() == ".onnx" or _looks_like_onnx(text) else None
    try:
        with zipfile.ZipFile(text) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None  # the checkpoint reader reports the file
    parts = {part for name in names for part in name.split("/")[1:2]}
    if "constants.pkl" in parts and "code" in parts:
        return "torchscript"
    if "archive_format" in parts or any(n.endswith("/models/model.json") for n in names):
        return "exported-program"
    return None


def _looks_like_onnx(path: str) -> bool:
    """A ModelProto opens with field 1, ir_version (tag 0x08, a small varint), then field 2,
    producer_name (tag 0x12, a short length, ASCII: 'pytorch' for torch.onnx). A pickle opens
    with 0x80, a safetensors header with its length, a zip with 'PK'."""
    if path.lower().endswith(".safetensors"):
        return False
    with open(path, "rb") as f:
        head = f.read(68)
    return (len(head) > 4 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] == 0x12
            and 0 < head[3] <= 64 and head[4:4 + head[3]].isascii()
            and len(head) >= 4 + head[3])


def exported_file(source: str | os.PathLike | None) -> tuple[Path, str] | None:
    """(local path, format) when `source` is an exported file, else None. A URL is downloaded
    into torch.hub's cache first (resnext.hub.download_weights, as a checkpoint URL would be)
    and judged by the cached file's content.

    Raises:
        DownloadError: a URL that cannot be fetched or fails its hash check.
    """
    if source is None:
        return None
    path = download_weights(os.fspath(source)) if is_url(os.fspath(source)) else Path(source)
    fmt = artifact_format(path)
    return (path, fmt) if fmt else None


def artifact_device(checkpoint: str | os.PathLike | None, device: str | None,
                    announce: bool = True) -> str | None:
    """The device a script should set up for `checkpoint`: 'cpu' for an exported file (with a
    ResNeXtWarning when `device` names another and `announce`: rank 0 only under torchrun),
    else `device` unchanged.

    Raises:
        ConfigError: a device string torch does not know (as for a checkpoint).
    """
    if exported_file(checkpoint) is None:
        return device
    try:
        kind = torch.device(device).type if device is not None else "cpu"
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r}: {e}") from None
    if kind != "cpu" and announce:
        warnings.warn(f"--device {device} ignored: {checkpoint} is an exported file, and "
                      f"exported files run on CPU here", ResNeXtWarning, stacklevel=2)
    return "cpu"


class ArtifactNet(nn.Module):
    """An exported file as a module: (N, 3, crop, crop) float32 images prepared with
    `preprocessing` -> (N, num_classes) float32 logits, on CPU.

    A file exported without a dynamic batch (ExportedProgram, ONNX) takes one image per call;
    larger batches are run one image at a time. An int8 file runs on the quantized engine it
    was made for (meta['quantization']['backend'], 'x86'), set as
    torch.backends.quantized.engine; one with 8-bit activations on a CPU without AVX512-VNNI
    is run with a ResNeXtWarning (fbgemm's kernels there may overflow; resnext.quantize).

    Attributes:
        path: the file. format: 'torchscript', 'exported-program' or 'onnx'.
        meta: the JSON stored in the file (resnext.export.export_meta).
        preprocessing, class_names (list or None), num_classes, arch_name: from meta.
        description: e.g. 'int8 TorchScript file (resnext50_32x4d, 2 classes)'.
    Raises:
        CheckpointError (a ValueError), naming the file: its loader refuses it; it has no
            resnext.json (not written by export.py, so its classes and preprocessing are
            unknown) or a malformed one; it has no classifier (num_classes 0).
        ConfigError: an int8 file for a quantized engine this torch build lacks.
        MissingDependencyError: an ONNX file without onnx/onnxruntime installed.
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None):
        super().__init__()
        from .export import load_artifact  # deferred: checkpoint.py imports this module

        self.path, self.format = Path(path), fmt or artifact_format(path)
        kind = _FORMAT_NAMES[self.format]
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not {_an(kind)} file")
        try:
            self._run, self.meta = load_artifact(self.path, self.format)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: its resnext.json is not JSON ({e})") from None
        except (FileNotFoundError, ImportError):
            raise  # a missing file or package (MissingDependencyError) says so itself
        except Exception as e:  # noqa: BLE001 (the format's own loader refused the file)
            # torch raises RuntimeError, ValueError, KeyError, ... for a damaged archive, ONNX
            # Runtime its own classes (InvalidProtobuf, ...): whichever, the file is at fault.
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{path}: not a readable {kind} file "
                                  f"({type(e).__name__}{': ' + first if first else ''})") from None
        if not isinstance(self.meta, dict):
            raise CheckpointError(f"{path}: its resnext.json is malformed (a "
                                  f"{type(self.meta).__name__}, not an object)")
        if not self.meta:
            raise CheckpointError(f"{path}: {_an(kind)} file without resnext.json metadata (not "
                                  f"written by export.py), so its classes and preprocessing "
                                  f"are unknown")
        self._read_meta(kind)
        self.one_per_call = self.format != "torchscript" and not self.meta.get("dynamic_batch")

    def _read_meta(self, kind: str) -> None:
        """preprocessing, class_names, num_classes, arch_name and description from meta."""
        meta = self.meta
        try:
            self.preprocessing = Preprocessing(**meta["preprocessing"])
            self.num_classes = int(meta["num_classes"] or 0)
            names = meta.get("class_names")
            self.class_names = [str(n) for n in names] if names else None
            quantization = dict(meta.get("quantization") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: its resnext.json is malformed "
                                  f"({type(e).__name__}: {e})") from None
        if self.num_classes < 1:
            raise CheckpointError(f"{self.path}: exported without a classifier (num_classes "
                                  f"{meta['num_classes']}): predict.py and evaluate.py need "
                                  f"class scores")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise CheckpointError(f"{self.path}: its resnext.json names "
                                  f"{len(self.class_names)} classes for a "
                                  f"{self.num_classes}-class head")
        if quantization.get("backend"):
            _use_engine(quantization, self.path)
        self.arch_name = str(meta.get("model") or "")
        dtype = f"{quantization.get('dtype', 'quantized')} " if quantization else ""
        self.description = (f"{dtype}{kind} file ({self.arch_name or 'unnamed model'}, "
                            f"{self.num_classes} classes)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, crop, crop) float32 -> (N, num_classes) float32 logits (CPU tensors).

        Raises:
            ConfigError: images of another size than the file's crop.
            CheckpointError: the file gives something else than (N, num_classes) logits.
        """
        crop = self.preprocessing.crop_size
        if tuple(images.shape[1:]) != (3, crop, crop):
            raise ConfigError(f"{self.path} takes (N, 3, {crop}, {crop}) images, got "
                              f"{tuple(images.shape)}")
        images = images.to("cpu", torch.float32).contiguous()
        if self.one_per_call and len(images) > 1:
            logits = torch.cat([self._run(image) for image in images.split(1)])
        else:
            logits = self._run(images)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(images),
                                                                            self.num_classes):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise CheckpointError(f"{self.path} gives {got} for {len(images)} images, not "
                                  f"({len(images)}, {self.num_classes}) logits as its "
                                  f"resnext.json says")
        return logits


def _an(kind: str) -> str:
    return f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind}"  # an ONNX, an ExportedProgram


def _use_engine(quantization: dict, path: Path) -> None:
    """Select the file's quantized engine; warn when its 8-bit activations meet a CPU
    without VNNI."""
    backend = quantization["backend"]
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"{path} is int8 for the {backend!r} quantized engine, which this "
                          f"torch build lacks (it has "
                          f"{', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend
    if quantization.get("activation_bits") == 8 and not cpu_has_vnni():
        warnings.warn(f"{path} has 8-bit int8 activations, made for a CPU with AVX512-VNNI; "
                      f"this one has none, where fbgemm's kernels may overflow and answer "
                      f"wrongly: export it again with --activation-bits 7 for this CPU",
                      ResNeXtWarning, stacklevel=3)
