"""Checkpoints: reading every supported format safely, key conversion, atomic save, export.

Supported inputs (all read with map_location='cpu' and weights-only unpickling):
  * mmcls 0.x release files: {'meta': {..., 'CLASSES': [...]}, 'state_dict': {'backbone.*',
    'head.fc.*'}}, often in torch's legacy (non-zip) serialization;
  * mmpretrain 1.x / mmengine training checkpoints: classes in meta['dataset_meta'], plus
    message_hub / optimizer / param_schedulers whose pickle names mmengine and numpy globals.
    Those names are bound to inert stand-ins (_Inert) inside the weights-only unpickler, so the
    state dict and class names are read while mmengine is never imported and no foreign
    callable (not even builtins.getattr) ever runs;
  * torchvision and timm ResNeXt state dicts (.pth, .bin, or .safetensors with the safetensors
    package), torchvision-references checkpoints ({'model': ...}), our own train.py files;
  * any of those with one or more `module.` (DDP) or `_orig_mod.` (torch.compile) prefixes.
Anything else is a ValueError naming the file; a pickle that wants to run code is refused.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from .data import imagenet_class_names

__all__ = [
    "Checkpoint", "LoadReport", "read_checkpoint", "convert_state_dict", "load_weights",
    "download_weights", "export_openmmlab", "save_checkpoint",
]

# torch.hub's convention: '<name>-<first hex digits of sha256>.<ext>'.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")


# --- weights-only unpickling with inert stand-ins -------------------------------------------

class _Inert:
    """Stand-in for a foreign object (mmengine HistoryBuffer, numpy array/dtype/scalar, ...)
    met while unpickling: built from anything, keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return "<foreign object skipped>"


def _inert_call(*args, **kwargs) -> _Inert:
    """Stand-in for foreign callables (numpy's _reconstruct/scalar, builtins.getattr)."""
    return _Inert()


_FOREIGN_CLASSES = [
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy.ndarray", "numpy.dtype", "argparse.Namespace",
]
_FOREIGN_CALLABLES = [
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "builtins.getattr",
]
_STAND_INS = ([(_Inert, n) for n in _FOREIGN_CLASSES]
              + [(_inert_call, n) for n in _FOREIGN_CALLABLES])


def _torch_load(path: Path) -> Any:
    """torch.load with map_location='cpu' and weights_only=True, stand-ins registered.

    Raises:
        ValueError: naming `path`, if it is not a torch file or its pickle names a global
            outside torch's weights-only allowlist and our stand-ins (it never runs).
    """
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            # Zip-format files are memory-mapped: tensors are read lazily from the page cache
            # instead of copied up front (torch's legacy format cannot be mapped).
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's message wraps the unpickler's reason in advice to use weights_only=False,
        # which is exactly what must not be done with an untrusted file: keep the reason only.
        detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        detail = " ".join(detail.split()).split(" Please use")[0]
        if re.search(r"global|reduce|build|new object", detail, re.IGNORECASE):
            raise ValueError(f"{path}: refused to load: its pickle asks for code beyond tensors "
                             f"and plain data ({detail}); nothing from it was run") from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, EOF...)
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{e})") from None


def _read_raw(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors files needs the safetensors "
                             f"package (pip install safetensors)") from None
        return load_file(str(path), device="cpu")
    return _torch_load(path)


# --- format detection and conversion ---------------------------------------------------------

_WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")


def convert_state_dict(raw: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a loaded checkpoint and rename its keys to ours.

    Pure function: unwraps {'state_dict': ...} / {'model': ...}, strips `module.` and
    `_orig_mod.` prefixes (any number), maps the OpenMMLab layout (`backbone.X` -> `X`,
    `head.fc.X` -> `fc.X`). torchvision's and timm's keys are already ours.

    Args:
        raw: what torch.load returned (or a safetensors dict).
        source: file name for error messages.
    Returns:
        (state dict with our keys, format description such as 'mmcls 0.x').
    Raises:
        ValueError: naming `source`, if no state dict is found, or listing every key that has
            no place in our layout (e.g. mmpretrain `neck.*` or another head's keys).
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a dict holding a state dict, "
                         f"got {type(raw).__name__}")
    meta = raw.get("meta") if isinstance(raw.get("meta"), Mapping) else {}
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        sd, fmt = raw, "state dict (torchvision/timm layout)"
    elif isinstance(raw.get("state_dict"), Mapping):
        sd = raw["state_dict"]
        if meta.get("exported_by") == "resnext":
            fmt = "OpenMMLab layout (resnext export)"
        elif "CLASSES" in meta:
            fmt = "mmcls 0.x"
        elif "dataset_meta" in meta or "message_hub" in raw:
            fmt = "mmpretrain 1.x"
        elif "classes" in meta:
            fmt = "resnext (train.py / export)"
        else:
            fmt = "state_dict checkpoint"
    elif isinstance(raw.get("model"), Mapping):
        sd, fmt = raw["model"], "torchvision references checkpoint"
    else:
        keys = ", ".join(map(str, list(raw)[:20]))
        raise ValueError(f"{source}: no state dict found (top-level keys: {keys}); expected a "
                         f"state dict or a dict with 'state_dict' or 'model'")

    out: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    wrapped = False
    openmmlab = any(re.sub(_WRAPPER_PREFIX, "", k).startswith(("backbone.", "head."))
                    for k in sd)
    for key, value in sd.items():
        name = _WRAPPER_PREFIX.sub("", key)
        wrapped |= name != key
        if openmmlab:
            if name.startswith("backbone."):
                name = name[len("backbone."):]
            elif name.startswith("head.fc."):
                name = "fc." + name[len("head.fc."):]
            else:
                unplaced.append(key)
                continue
        if not isinstance(value, torch.Tensor):
            unplaced.append(key)
            continue
        if name in out:
            raise ValueError(f"{source}: two keys map to {name!r} (one is {key!r})")
        out[name] = value
    if unplaced:
        raise ValueError(f"{source}: {len(unplaced)} keys have no place in the ResNeXt "
                         f"layout: {', '.join(unplaced)}")
    if openmmlab and fmt.startswith("state"):
        fmt = "OpenMMLab state dict"
    if wrapped:
        fmt += ", wrapper prefixes stripped"
    return out, fmt


def _class_names(raw: Any) -> list[str] | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("meta"), Mapping):
        return None
    meta = raw["meta"]
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), Mapping) else {}
    for names in (meta.get("classes"), dataset_meta.get("classes"), meta.get("CLASSES")):
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return list(names)
    return None


@dataclass
class Checkpoint:
    """A checkpoint read and converted to our keys.

    Attributes:
        state_dict: our keys -> CPU tensors.
        classes: class names stored in the file (None when it has none).
        format: detected format, e.g. 'mmcls 0.x (legacy serialization)'.
        path: the local file read (the cached download for a URL).
        raw: the whole loaded object (optimizer state etc. for train.py's resume).
    """
    state_dict: dict[str, torch.Tensor]
    classes: list[str] | None
    format: str
    path: Path
    raw: Any = None

    @property
    def meta(self) -> Mapping[str, Any]:
        """The file's 'meta' dict (train.py stores model, classes, img_size there), or {}."""
        meta = self.raw.get("meta") if isinstance(self.raw, Mapping) else None
        return meta if isinstance(meta, Mapping) else {}


def _is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and urlparse(source).scheme in ("http", "https", "file")


def read_checkpoint(source: str | os.PathLike, progress: bool = True) -> Checkpoint:
    """Read any supported checkpoint from a path or URL and convert it to our keys.

    Args:
        source: local path, or http(s)/file URL (downloaded once into torch.hub's cache,
            `<hub dir>/checkpoints/`, and hash-checked when the file name carries a SHA-256
            prefix).
        progress: show a download progress bar.
    Returns:
        Checkpoint with the converted state dict, class names and detected format.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: naming the file, for an unrecognised layout or a refused pickle.
        RuntimeError: a download failed or a hash did not match.
    """
    path = download_weights(source, progress=progress) if _is_url(source) else Path(source)
    raw = _read_raw(path)
    state_dict, fmt = convert_state_dict(raw, str(path))
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        fmt += " (legacy serialization)"
    return Checkpoint(state_dict, _class_names(raw), fmt, path, raw)


# --- loading into a model --------------------------------------------------------------------

@dataclass
class LoadReport:
    """What load_weights did: the format read, tensors loaded, keys skipped (reset head)."""
    format: str
    path: Path
    loaded: int
    skipped: list[str]
    classes: list[str] | None

    def __str__(self) -> str:
        msg = f"loaded {self.loaded} tensors from {self.path} ({self.format})"
        return msg + (f"; skipped {', '.join(self.skipped)} (reset_head)" if self.skipped else "")


def _fc_out(sd: Mapping[str, torch.Tensor]) -> int | None:
    return sd["fc.weight"].shape[0] if "fc.weight" in sd else None


def load_weights(model: nn.Module, source: str | os.PathLike | Checkpoint,
                 reset_head: bool = False, progress: bool = True) -> LoadReport:
    """Load a checkpoint into `model` strictly and attach its class names.

    Every key must match in name and shape; only missing `num_batches_tracked` buffers are
    tolerated (older files lack them). With reset_head=True the classifier (`fc.*`) is not
    loaded and keeps its fresh initialisation, for fine-tuning on other classes.

    Args:
        model: a ResNeXt (or any module with our keys).
        source: path, URL, or an already read Checkpoint.
        reset_head: skip the classifier instead of failing when its size differs.
        progress: show a download progress bar.
    Returns:
        LoadReport; also sets `model.class_names` (the file's names, else the ImageNet-1k
        names for a 1000-class head, else None).
    Raises:
        ValueError: listing every missing, unexpected and wrongly shaped key, or explaining a
            classifier size mismatch without reset_head; plus read_checkpoint's errors.
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source, progress)
    sd = dict(ckpt.state_dict)
    own = model.state_dict()
    skipped: list[str] = []
    if reset_head:
        skipped = sorted(k for k in sd if k.startswith("fc."))
        for k in skipped:
            del sd[k]
        own = {k: v for k, v in own.items() if not k.startswith("fc.")}
    elif _fc_out(sd) != _fc_out(own) and _fc_out(sd) is not None and _fc_out(own) is not None:
        raise ValueError(f"{ckpt.path}: its classifier has {_fc_out(sd)} classes, the model "
                         f"{_fc_out(own)}; pass reset_head=True to keep the new head "
                         f"(fine-tuning) and load everything else")
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{ckpt.path} ({ckpt.format}) does not fit the model "
                 f"({type(model).__name__} {getattr(model, 'depth', '')}"
                 f" {getattr(model, 'groups', '')}x{getattr(model, 'width_per_group', '')}d):"]
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong)):
            if keys:
                parts.append(f"  {label} ({len(keys)}): {', '.join(keys)}")
        raise ValueError("\n".join(parts))
    on_meta = any(t.is_meta for t in own.values())
    # A model built on the meta device (resnext.pretrained) takes the file's tensors as they
    # are (assign), so the weights are never held twice; it then materialises what is left.
    result = model.load_state_dict(sd, strict=False, assign=on_meta)
    assert all(k in skipped or k.endswith("num_batches_tracked") for k in result.missing_keys)
    model.weights_source = str(ckpt.path)  # ResNeXt.init_weights() leaves loaded weights alone
    classes = None if reset_head else ckpt.classes
    num_classes = _fc_out(model.state_dict())
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        classes = None  # names that do not match the head would mislabel predictions
    if classes is None and num_classes == 1000 and not reset_head:
        classes = imagenet_class_names()
    model.class_names = classes
    return LoadReport(ckpt.format, ckpt.path, len(sd), skipped, classes)


# --- download ---------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(url: str, progress: bool = True) -> Path:
    """Download `url` once into `<torch.hub dir>/checkpoints/` and return the local path.

    When the file name carries a SHA-256 prefix ('...-56066e27.pth', torch.hub's convention)
    it is checked after download and again on every use of the cached file. torch.hub's
    downloader writes to a temporary file and renames it, so an interrupted download leaves
    no partial file behind. `file://` URLs are read in place.

    Raises:
        RuntimeError: the download failed (the message names the URL and how to pass a local
            file instead), or the hash does not match.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    filename = os.path.basename(parsed.path)
    if not filename:
        raise ValueError(f"{url}: the URL names no file")
    match = _HASH_IN_NAME.search(filename)
    expected = match.group(1) if match else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=expected,
                                           progress=progress)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RuntimeError(
                f"could not download {url} ({reason}). Without network, fetch that file "
                f"elsewhere and pass its path: pretrained='/path/to/{filename}' in Python, "
                f"--checkpoint /path/to/{filename} for predict.py/evaluate.py") from None
        except RuntimeError as e:  # torch.hub's hash check; it has removed the partial file
            raise RuntimeError(f"{url}: downloaded file failed its SHA-256 check: {e}") from None
    elif expected is not None:
        digest = _sha256(cached)
        if not digest.startswith(expected):
            raise RuntimeError(f"cached file {cached} has SHA-256 {digest[:16]}..., which does "
                               f"not start with {expected} as its name says; delete it to "
                               f"download again")
    return cached


# --- writing ----------------------------------------------------------------------------------

def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` atomically: write a temporary file beside `path`, fsync, rename.

    A crash or kill at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_openmmlab(model: nn.Module, path: str | os.PathLike,
                     classes: list[str] | None = None) -> Path:
    """Write `model` in OpenMMLab's layout for mmpretrain (load_from=) or mmdetection.

    Keys become `backbone.<ours>` and `head.fc.<weight|bias>`; meta carries the class names as
    both `CLASSES` (mmcls 0.x) and `dataset_meta.classes` (mmpretrain 1.x). Reading the file
    back with read_checkpoint gives exactly the original tensors.

    Args:
        model: a ResNeXt.
        path: output file (written atomically).
        classes: class names; default model.class_names.
    Returns:
        The path written.
    """
    classes = list(classes if classes is not None else getattr(model, "class_names", None) or [])
    state_dict = {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v.detach().cpu()
                  for k, v in model.state_dict().items()}
    meta = {"CLASSES": classes, "dataset_meta": {"classes": classes}, "exported_by": "resnext"}
    return save_checkpoint({"meta": meta, "state_dict": state_dict}, path)
