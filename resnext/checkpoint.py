"""Checkpoints: reading every supported format safely, key conversion, atomic save, export.

Supported inputs (all read with map_location='cpu' and weights-only unpickling):
  * mmcls 0.x release files: {'meta': {..., 'CLASSES': [...]}, 'state_dict': {'backbone.*',
    'head.fc.*'}}, often in torch's legacy (non-zip) serialization;
  * mmpretrain 1.x / mmengine training checkpoints (classes in meta['dataset_meta']): the
    mmengine and numpy globals their pickles name are inert stand-ins in the weights-only
    unpickler (resnext.unpickling); mmengine is never imported, no foreign callable runs;
  * torchvision and timm ResNeXt state dicts (.pth, .bin, or .safetensors with the safetensors
    package), torchvision-references checkpoints ({'model': ...}), our own train.py files
    (an EMA run's: its EMA weights unless use_ema=False);
  * any of those with `module.` (DDP), `_orig_mod.` (torch.compile) or `net.` prefixes;
  * foreign EMA copies beside the weights (mmcls 0.x `ema_*` keys, mmengine's
    `ema_state_dict`): the main keys are loaded, the copy skipped and named in the format;
  * tensors of any floating dtype (float16/bfloat16 exports, float64): load_weights casts
    them to the model's dtype, so a model built from a file is float32 unless asked otherwise;
  * numpy arrays instead of tensors: numpy's pickle globals are bound to stand-ins that
    rebuild the array from its bytes as a tensor, without numpy.
detect_architecture tells from keys and shapes which model a state dict holds. Anything else
is a CheckpointError naming the file (an exported file is named as such); a pickle that
wants to run code is refused.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .artifacts import artifact_format
from .errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from .hub import download_weights, is_url
from .model import STAGE_BLOCKS, ResNeXt
from .unpickling import NumpyArrayStandIn, load_weights_only

__all__ = ["Checkpoint", "read_checkpoint", "convert_state_dict", "export_openmmlab",
           "save_checkpoint", "Arch", "detect_architecture"]

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")


def _read_raw(path: Path) -> Any:
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir()
                       if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
        example = "best.pth" if "best.pth" in found or not found else found[0]
        listing = (f"; checkpoint files there: {', '.join(found[:20])}"
                   + (f" ... and {len(found) - 20} more" if len(found) > 20 else "")
                   if found else "; it holds no .pth/.pt/.bin/.safetensors file")
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it "
                              f"(e.g. {path / example}){listing}")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; was its "
                              f"download or save interrupted?")
    if exported := artifact_format(path):
        raise CheckpointError(f"{path}: an exported model ({exported}), not weights: predict.py "
                              f"and evaluate.py run it, the rest needs its checkpoint")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors files needs the safetensors "
                                  f"package (pip install safetensors)") from None
        return load_file(str(path), device="cpu")
    return load_weights_only(path)


# --- format detection and conversion ---------------------------------------------------------

_WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")


def _is_weight(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, NumpyArrayStandIn))


def _ema_copies(sd: Mapping[str, Any]) -> list[str]:
    """Keys of mmcls 0.x EMAHook copies (`ema_backbone_conv1_weight` beside
    `backbone.conv1.weight`), or [] unless every `ema_*` key shadows exactly one other key of
    the same shape; mmcv's EMAHook swaps the averages into the main keys before saving."""
    ema = [k for k in sd if _WRAPPER_PREFIX.sub("", k).startswith("ema_")]
    if not ema:
        return []
    flat: dict[str, list[str]] = {}
    for key in sd:
        if key not in ema:
            flat.setdefault(_WRAPPER_PREFIX.sub("", key).replace(".", "_"), []).append(key)
    for key in ema:
        main = flat.get(_WRAPPER_PREFIX.sub("", key)[len("ema_"):], [])
        if (len(main) != 1 or not isinstance(sd[key], torch.Tensor)
                or not isinstance(sd[main[0]], torch.Tensor)
                or sd[key].shape != sd[main[0]].shape):
            return []
    return ema


def _find_state_dict(raw: Any, source: str) -> tuple[Mapping[str, Any], str]:
    """The state dict inside a loaded checkpoint and the format its layout tells."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: expected a dict holding a state dict, "
                              f"got {type(raw).__name__}")
    meta = raw.get("meta") if isinstance(raw.get("meta"), Mapping) else {}
    if raw and all(_is_weight(v) for v in raw.values()):
        return raw, "state dict (torchvision/timm layout)"
    if isinstance(raw.get("model"), Mapping) and not isinstance(raw.get("state_dict"), Mapping):
        return raw["model"], "torchvision references checkpoint"
    if not isinstance(raw.get("state_dict"), Mapping):
        keys = ", ".join(map(str, list(raw)[:20]))
        raise CheckpointError(f"{source}: no state dict found (top-level keys: {keys}); expected a "
                              f"state dict or a dict with 'state_dict' or 'model'")
    if meta.get("exported_by") == "resnext":
        fmt = "OpenMMLab layout (resnext export)"
    elif "CLASSES" in meta:
        fmt = "mmcls 0.x"
    elif "dataset_meta" in meta or "message_hub" in raw:
        fmt = "mmpretrain 1.x"
    elif "classes" in meta:
        fmt = "resnext (train.py)"
    else:
        fmt = "state_dict checkpoint"
    return raw["state_dict"], fmt


def _ours_or_ema(raw: Any, sd: Mapping[str, Any], fmt: str, use_ema: bool,
                 notes: list[str]) -> Mapping[str, Any]:
    """A train.py checkpoint of an EMA run: its 'ema' weights unless use_ema is False (the
    choice goes into `notes`); any other file: `sd`."""
    ours = raw.get("ema") if isinstance(raw, Mapping) and fmt.startswith("resnext") else None
    if not (isinstance(ours, Mapping) and isinstance(ours.get("state_dict"), Mapping)):
        return sd
    notes.append("EMA weights used (for the raw ones: use_ema=False or --raw-weights)" if use_ema
                 else "raw weights used (the file's EMA weights skipped)")
    return ours["state_dict"] if use_ema else sd


def convert_state_dict(raw: Any, source: str = "checkpoint",
                       use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a loaded checkpoint and rename its keys to ours.

    Pure function: unwraps {'state_dict': ...} / {'model': ...}, strips `module.` and
    `_orig_mod.` prefixes (any number) and an InferenceModel's `net.`, maps the OpenMMLab
    layout (`backbone.X` -> `X`, `head.fc.X` -> `fc.X`). torchvision's and timm's keys are
    already ours. A train.py checkpoint of a run with --model-ema holds the EMA's weights
    under 'ema': those are taken unless use_ema is False. A foreign EMA copy is skipped and
    named in the format: mmcls 0.x `ema_<key with _ for .>` entries that shadow the main
    keys, or mmengine's top-level `ema_state_dict`; both EMA hooks swap the averaged weights
    into the main keys before saving, so the main keys are what the run evaluated.

    Args:
        raw: what torch.load returned (or a safetensors dict).
        source: file name for error messages.
        use_ema: take a train.py checkpoint's EMA weights when it has them.
    Returns:
        (state dict with our keys, format description such as 'mmcls 0.x').
    Raises:
        CheckpointError (a ValueError): naming `source`, if no state dict is found, if
            entries are numpy arrays that cannot be tensors, or listing every key that has
            no place in our layout (e.g. mmpretrain `neck.*` or another head's keys).
    """
    sd, fmt = _find_state_dict(raw, source)
    notes: list[str] = []
    sd = _ours_or_ema(raw, sd, fmt, use_ema, notes)
    ema = _ema_copies(sd)
    if ema:
        notes.append(f"EMA copy ({len(ema)} ema_* keys) skipped")
        ema_keys = set(ema)
        sd = {k: v for k, v in sd.items() if k not in ema_keys}
    if sd is not raw and isinstance(raw.get("ema_state_dict"), Mapping):
        notes.append(f"EMA copy (ema_state_dict, {len(raw['ema_state_dict'])} entries) skipped")

    numpy_left = [k for k, v in sd.items() if isinstance(v, NumpyArrayStandIn)]
    if numpy_left:
        dtypes = sorted({sd[k].dtype for k in numpy_left})
        raise CheckpointError(f"{source}: {len(numpy_left)} entries are numpy arrays of dtype "
                              f"{', '.join(dtypes)}, not tensors, and cannot be converted: convert "
                              f"them with torch.from_numpy before saving")
    out: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    wrapped = False
    if sd and all(_WRAPPER_PREFIX.sub("", k).startswith("net.") for k in sd):
        # A saved resnext.InferenceModel: the network sits under `net.`.
        sd = {_WRAPPER_PREFIX.sub("", k)[len("net."):]: v for k, v in sd.items()}
        wrapped = True
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
            raise CheckpointError(f"{source}: two keys map to {name!r} (one is {key!r})")
        out[name] = value
    if unplaced:
        raise CheckpointError(f"{source}: {len(unplaced)} keys have no place in the ResNeXt "
                              f"layout: {', '.join(unplaced)}")
    if openmmlab and fmt.startswith("state"):
        fmt = "OpenMMLab state dict"
    if wrapped:
        fmt += ", wrapper prefixes stripped"
    return out, ", ".join([fmt, *notes])


def _listing(items: list[str], limit: int | None) -> str:
    """'a, b, c' or, past `limit` items, the first ones and '... and N more'."""
    if limit is None or len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} ... and {len(items) - limit} more"


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
        """The file's 'meta' dict (train.py stores model, classes, preprocessing there), or {}."""
        meta = self.raw.get("meta") if isinstance(self.raw, Mapping) else None
        return meta if isinstance(meta, Mapping) else {}


def read_checkpoint(source: str | os.PathLike, progress: bool = True,
                    use_ema: bool = True) -> Checkpoint:
    """Read any supported checkpoint from a path or URL and convert it to our keys.

    Args:
        source: local path, or http(s)/file URL (downloaded once into torch.hub's cache,
            `<hub dir>/checkpoints/`, and hash-checked when the file name carries a SHA-256
            prefix).
        progress: show a download progress bar.
        use_ema: a train.py checkpoint's EMA weights when it has them (convert_state_dict).
    Returns:
        Checkpoint with the converted state dict, class names and detected format.
    Raises:
        CheckpointNotFoundError (a FileNotFoundError): the path does not exist.
        CheckpointError (a ValueError): naming the file, for an empty file, an unrecognised
            layout, a refused pickle (the message never suggests weights_only=False), or a
            directory (the message lists the checkpoint files in it).
        DownloadError (a RuntimeError): a download failed or a hash did not match.
    """
    path = download_weights(source, progress=progress) if is_url(source) else Path(source)
    raw = _read_raw(path)
    state_dict, fmt = convert_state_dict(raw, str(path), use_ema)
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        fmt += " (legacy serialization)"
    return Checkpoint(state_dict, _class_names(raw), fmt, path, raw)


# --- which architecture a file holds --------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """The architecture a state dict holds (see detect_architecture).

    Attributes:
        depth: 50, 101 or 152.
        groups: cardinality (1 for a plain ResNet).
        width_per_group: channels per group of the stage-1 3x3 conv (64 for a ResNet).
        num_classes: classifier outputs (0: the file has no classifier).
        name: factory-style name, e.g. 'resnext101_32x8d', 'resnet50'.
    """
    depth: int
    groups: int
    width_per_group: int
    num_classes: int
    name: str

    def __str__(self) -> str:
        """e.g. 'resnext101_32x8d (1000 classes)'."""
        return f"{self.name} ({_classes_phrase(self.num_classes)})"


def detect_architecture(state_dict: Mapping[str, torch.Tensor] | Checkpoint) -> Arch:
    """Work out from keys and shapes which ResNeXt (or ResNet) a state dict holds.

    Depth comes from the blocks per stage (layer3: 6 -> 50, 23 -> 101; layer2 8 and layer3
    36 -> 152), groups and width from the grouped conv `layer1.0.conv2.weight`, shaped
    (groups * width_per_group, width_per_group, 3, 3), the classes from `fc.weight`. The
    result is then checked key by key against that model built on the meta device.

    Args:
        state_dict: our keys (as convert_state_dict or read_checkpoint give them), or a
            read Checkpoint.
    Returns:
        Arch, e.g. Arch(101, 32, 8, 1000, 'resnext101_32x8d'); a plain ResNet-50 (groups 1,
        width 64) is Arch(50, 1, 64, 1000, 'resnet50').
    Raises:
        CheckpointError (a ValueError): the keys or shapes fit no model that ResNeXt(depth, groups,
            width_per_group, num_classes) builds; the message says what did not fit.
    """
    sd = state_dict.state_dict if isinstance(state_dict, Checkpoint) else state_dict
    blocks = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(found) if found == set(range(len(found))) else -1)
    depth = next((d for d, b in STAGE_BLOCKS.items() if tuple(b) == tuple(blocks)), None)
    if depth is None:
        known = ", ".join(f"{d}: {b}" for d, b in STAGE_BLOCKS.items())
        raise CheckpointError(f"blocks per stage {tuple(blocks)} fit no ResNeXt depth ({known})")
    conv = sd.get("layer1.0.conv2.weight")
    if not isinstance(conv, torch.Tensor) or conv.dim() != 4 or conv.shape[1] < 1 \
            or conv.shape[0] % conv.shape[1]:
        shape = tuple(conv.shape) if isinstance(conv, torch.Tensor) else None
        raise CheckpointError(f"layer1.0.conv2.weight is {shape}, not a (groups * width, width, "
                              f"3, 3) grouped conv")
    width_per_group, groups = conv.shape[1], conv.shape[0] // conv.shape[1]
    fc = sd.get("fc.weight")
    num_classes = fc.shape[0] if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 0
    own, name = _shapes_of(depth, groups, width_per_group, num_classes)
    wrong = [k for k in sd if k not in own or tuple(sd[k].shape) != own[k]]
    wrong += [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if wrong:
        raise CheckpointError(f"{len(wrong)} keys do not fit {name} "
                              f"({_classes_phrase(num_classes)})"
                              f", e.g. {_listing(wrong, 3)}")
    return Arch(depth, groups, width_per_group, num_classes, name)


@functools.lru_cache(maxsize=8)
def _shapes_of(depth: int, groups: int, width_per_group: int,
               num_classes: int) -> tuple[dict[str, tuple[int, ...]], str]:
    """Key -> shape of a ResNeXt built on the meta device (no memory), and its name."""
    with torch.device("meta"):
        model = ResNeXt(depth, groups, width_per_group, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model.arch_name


def _detect_or_none(sd: Mapping[str, torch.Tensor]) -> Arch | None:
    try:
        return detect_architecture(sd)
    except ValueError:
        return None


def _classes_phrase(n: int | None) -> str:
    return "no classifier" if not n else f"{n} classes"


# --- writing ----------------------------------------------------------------------------------

def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` atomically: write a temporary file beside `path`, fsync, rename.

    A crash or kill at any point leaves either the old file or the new one, never a torn one.

    Args:
        obj: what to save (plain types and tensors, to stay weights-only loadable).
        path: the destination; its folder is created if missing.
    Returns:
        `path` as a Path.
    Raises:
        CheckpointWriteError (an OSError): the write failed (no space left, a file-size or
            quota limit, an I/O error); the message names the file, the reason and the free
            space, and the previous file at `path`, if any, is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(f"{path}: cannot write the checkpoint there "
                                   f"({e.strerror or e})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError of its zip writer
        # ("unexpected pos ..."), naming neither the file nor the cause.
        Path(tmp).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (
            f"the write stopped short: no space left or a file-size limit? ({e})")
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = "is unchanged" if path.exists() else "was not created"
        raise CheckpointWriteError(f"{path}: writing the checkpoint failed: {reason}; "
                                   f"{free:,.0f} MiB free there; {path.name} {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_openmmlab(model: nn.Module, path: str | os.PathLike,
                     classes: list[str] | None = None) -> Path:
    """Write `model` in OpenMMLab's layout for mmpretrain (load_from=) or mmdetection.

    Keys become `backbone.<ours>` and `head.fc.<weight|bias>`; meta carries the class names as
    `CLASSES` (mmcls 0.x) and `dataset_meta.classes` (mmpretrain 1.x), and the model's
    `preprocessing` as a plain dict (mmpretrain ignores it; read_checkpoint restores it), so
    the round trip gives the original tensors and preprocessing.

    Args: model (a ResNeXt), path (written atomically), classes (default model.class_names).
    Returns the path written.
    """
    classes = list(classes if classes is not None else getattr(model, "class_names", None) or [])
    state_dict = {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v.detach().cpu()
                  for k, v in model.state_dict().items()}
    meta = {"CLASSES": classes, "dataset_meta": {"classes": classes}, "exported_by": "resnext"}
    preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing.to_dict()
    return save_checkpoint({"meta": meta, "state_dict": state_dict}, path)
