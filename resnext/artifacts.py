"""Exported files (resnext.export) run where predict.py and evaluate.py run a checkpoint.

`--checkpoint best.int8.torchscript.pt` (or `.onnx`, `.pt2`, `.torchscript.pt`) is recognised
by its content (artifact_format) and run through its format's own loader (load_artifact),
with the class names and preprocessing written inside it. The file fixes its network, dtype
and input size: options that would change them are ignored with a warning (amp, BN folding,
compile, --model) or refused (another crop size). Exported files run on CPU here.

An exported file is a program, not weights: torch.jit.load, torch.export.load and ONNX
Runtime run the graph it holds. Load only files you trust, as with any model program.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ResNeXtWarning
from .transforms import Preprocessing

__all__ = ["artifact_format", "artifact_device", "ArtifactNet"]

_FORMAT_NAMES = {"torchscript": "TorchScript", "exported-program": "ExportedProgram",
                 "onnx": "ONNX"}


def artifact_format(source: str | os.PathLike) -> str | None:
    """Which exported format a local file holds, judged by content (a checkpoint may be named
    anything): 'torchscript' (a zip with code/ and constants.pkl), 'exported-program' (a zip
    with torch.export's archive_format or models/model.json), 'onnx' (the .onnx suffix: ONNX
    protobuf has no magic bytes); None for anything else (a checkpoint, a URL, no such file).
    """
    text = os.fspath(source)
    if "://" in text or not Path(text).is_file():
        return None
    if Path(text).suffix.lower() == ".onnx":
        return "onnx"
    if not zipfile.is_zipfile(text):
        return None
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


def artifact_device(checkpoint: str | os.PathLike | None, device: str | None) -> str | None:
    """The device a script should set up for `checkpoint`: 'cpu' for an exported file (with a
    ResNeXtWarning when `device` asked for another), else `device` unchanged."""
    if checkpoint is None or artifact_format(checkpoint) is None:
        return device
    if device not in (None, "cpu"):
        warnings.warn(f"--device {device} ignored: {checkpoint} is an exported file, and "
                      f"exported files run on CPU here", ResNeXtWarning, stacklevel=2)
    return "cpu"


class ArtifactNet(nn.Module):
    """An exported file as a module: (N, 3, crop, crop) float32 images prepared with
    `preprocessing` -> (N, num_classes) float32 logits, on CPU.

    A file exported without a dynamic batch (ExportedProgram, ONNX) takes one image per call;
    larger batches are run one image at a time. An int8 file runs on the quantized engine it
    was made for (meta['quantization']['backend'], e.g. 'x86'), set as
    torch.backends.quantized.engine.

    Attributes:
        path: the file. format: 'torchscript', 'exported-program' or 'onnx'.
        meta: the JSON stored in the file (resnext.export.export_meta).
        preprocessing, class_names (list or None), num_classes, arch_name: from meta.
        description: e.g. 'int8 TorchScript file (resnext50_32x4d, 2 classes)'.
    Raises:
        CheckpointError (a ValueError): the file has no readable resnext metadata (not written
            by export.py, so its classes and preprocessing are unknown) or its loader refuses
            it; the message names the file.
        ConfigError: an int8 file for a quantized engine this torch build lacks.
        MissingDependencyError: an ONNX file without onnx/onnxruntime installed.
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None):
        super().__init__()
        from .export import load_artifact  # deferred: checkpoint.py imports this module

        self.path, self.format = Path(path), fmt or artifact_format(path)
        try:
            self._run, self.meta = load_artifact(self.path, self.format)
        except Exception as e:  # noqa: BLE001 (re-raised unless the loader refused the file)
            # torch raises RuntimeError/ValueError; ONNX Runtime its own classes
            # (InvalidProtobuf, ...); a missing file or package keeps its own error.
            refused = isinstance(e, (RuntimeError, ValueError, OSError)) or type(
                e).__module__.startswith("onnxruntime")
            if isinstance(e, (FileNotFoundError, ImportError)) or not refused:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: not a readable {_FORMAT_NAMES[self.format]} file "
                                  f"({type(e).__name__}: {first})") from None
        if not self.meta.get("preprocessing") or not self.meta.get("num_classes"):
            raise CheckpointError(f"{path}: a {_FORMAT_NAMES[self.format]} file without "
                                  f"resnext.json metadata (not written by export.py), so its "
                                  f"classes and preprocessing are unknown")
        quantization = self.meta.get("quantization") or None
        if quantization and quantization.get("backend"):
            _use_engine(quantization["backend"], path)
        self.preprocessing = Preprocessing(**self.meta["preprocessing"])
        self.class_names = self.meta.get("class_names") or None
        self.num_classes = int(self.meta["num_classes"])
        self.arch_name = str(self.meta.get("model") or "")
        self.one_per_call = self.format != "torchscript" and not self.meta.get("dynamic_batch")
        dtype = f"{quantization['dtype']} " if quantization else ""
        self.description = (f"{dtype}{_FORMAT_NAMES[self.format]} file ({self.arch_name}, "
                            f"{self.num_classes} classes)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, crop, crop) float32 -> (N, num_classes) float32 logits (CPU tensors).

        Raises:
            ConfigError: images of another size than the file's crop.
        """
        crop = self.preprocessing.crop_size
        if tuple(images.shape[1:]) != (3, crop, crop):
            raise ConfigError(f"{self.path} takes (N, 3, {crop}, {crop}) images, got "
                              f"{tuple(images.shape)}")
        images = images.to("cpu", torch.float32).contiguous()
        if self.one_per_call and len(images) > 1:
            return torch.cat([self._run(image) for image in images.split(1)])
        return self._run(images)


def _use_engine(backend: str, path: str | os.PathLike) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"{path} is int8 for the {backend!r} quantized engine, which this "
                          f"torch build lacks (it has "
                          f"{', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend
