"""Checkpoints: reading every supported format safely, key conversion, atomic save, export.

Supported inputs (all read with map_location='cpu' and weights-only unpickling):
  * mmcls 0.x release files: {'meta': {..., 'CLASSES': [...]}, 'state_dict': {'backbone.*',
    'head.fc.*'}}, often in torch's legacy (non-zip) serialization;
  * mmpretrain 1.x / mmengine training checkpoints: classes in meta['dataset_meta'], plus
    message_hub / optimizer / param_schedulers whose pickle names mmengine and numpy globals.
    Those names are bound to inert stand-ins inside the weights-only unpickler
    (resnext.unpickling), so the state dict and class names are read while mmengine is never
    imported and no foreign callable (not even builtins.getattr) ever runs;
  * torchvision and timm ResNeXt state dicts (.pth, .bin, or .safetensors with the safetensors
    package), torchvision-references checkpoints ({'model': ...}), our own train.py files;
  * any of those with one or more `module.` (DDP) or `_orig_mod.` (torch.compile) prefixes;
  * any of those with an EMA copy beside the weights (mmcls 0.x `ema_*` keys, mmengine's
    `ema_state_dict`): the main keys are loaded, the copy skipped and named in the format;
  * tensors of any floating dtype (float16/bfloat16 exports, float64): load_weights casts
    them to the model's dtype, so a model built from a file is float32 unless asked otherwise;
  * numpy arrays instead of tensors (`{k: ndarray}` exporters): numpy's pickle globals are
    bound to stand-ins that rebuild the array from its bytes as a tensor, without numpy.
detect_architecture tells from keys and shapes which model a state dict holds, so a file of
another architecture is named in one line and get_model(pretrained=file) can build it.
Anything else is a ValueError naming the file; a pickle that wants to run code is refused.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import urllib.error
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from .data import imagenet_class_names
from .unpickling import NumpyArrayStandIn, load_weights_only
from .model import STAGE_BLOCKS, ResNeXt

__all__ = [
    "Checkpoint", "LoadReport", "read_checkpoint", "convert_state_dict", "load_weights",
    "download_weights", "export_openmmlab", "save_checkpoint", "Arch", "detect_architecture",
]

# torch.hub's convention: '<name>-<first hex digits of sha256>.<ext>'.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")


def _read_raw(path: Path) -> Any:
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir()
                       if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
        example = "best.pth" if "best.pth" in found or not found else found[0]
        listing = (f"; checkpoint files there: {', '.join(found[:20])}"
                   + (f" ... and {len(found) - 20} more" if len(found) > 20 else "")
                   if found else "; it holds no .pth/.pt/.bin/.safetensors file")
        raise ValueError(f"{path} is a directory; pass the checkpoint file inside it "
                         f"(e.g. {path / example}){listing}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors files needs the safetensors "
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
        raise ValueError(f"{source}: expected a dict holding a state dict, "
                         f"got {type(raw).__name__}")
    meta = raw.get("meta") if isinstance(raw.get("meta"), Mapping) else {}
    if raw and all(_is_weight(v) for v in raw.values()):
        return raw, "state dict (torchvision/timm layout)"
    if isinstance(raw.get("model"), Mapping) and not isinstance(raw.get("state_dict"), Mapping):
        return raw["model"], "torchvision references checkpoint"
    if not isinstance(raw.get("state_dict"), Mapping):
        keys = ", ".join(map(str, list(raw)[:20]))
        raise ValueError(f"{source}: no state dict found (top-level keys: {keys}); expected a "
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


def convert_state_dict(raw: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a loaded checkpoint and rename its keys to ours.

    Pure function: unwraps {'state_dict': ...} / {'model': ...}, strips `module.` and
    `_orig_mod.` prefixes (any number), maps the OpenMMLab layout (`backbone.X` -> `X`,
    `head.fc.X` -> `fc.X`). torchvision's and timm's keys are already ours. An EMA copy is
    skipped and named in the format: mmcls 0.x `ema_<key with _ for .>` entries that shadow
    the main keys, or mmengine's top-level `ema_state_dict`; both EMA hooks swap the averaged
    weights into the main keys before saving, so the main keys are what the run evaluated.

    Args:
        raw: what torch.load returned (or a safetensors dict).
        source: file name for error messages.
    Returns:
        (state dict with our keys, format description such as 'mmcls 0.x').
    Raises:
        ValueError: naming `source`, if no state dict is found, if entries are numpy arrays
            that cannot be tensors, or listing every key that has no place in our layout
            (e.g. mmpretrain `neck.*` or another head's keys).
    """
    sd, fmt = _find_state_dict(raw, source)
    notes: list[str] = []
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
        raise ValueError(f"{source}: {len(numpy_left)} entries are numpy arrays of dtype "
                         f"{', '.join(dtypes)}, not tensors, and cannot be converted: convert "
                         f"them with torch.from_numpy before saving")
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
        ValueError: naming the file, for an unrecognised layout, a refused pickle (the
            message never suggests weights_only=False), or a directory (the message lists
            the checkpoint files in it).
        RuntimeError: a download failed or a hash did not match.
    """
    path = download_weights(source, progress=progress) if _is_url(source) else Path(source)
    raw = _read_raw(path)
    state_dict, fmt = convert_state_dict(raw, str(path))
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
        ValueError: the keys or shapes fit no model that ResNeXt(depth, groups,
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
        raise ValueError(f"blocks per stage {tuple(blocks)} fit no ResNeXt depth ({known})")
    conv = sd.get("layer1.0.conv2.weight")
    if not isinstance(conv, torch.Tensor) or conv.dim() != 4 or conv.shape[1] < 1 \
            or conv.shape[0] % conv.shape[1]:
        shape = tuple(conv.shape) if isinstance(conv, torch.Tensor) else None
        raise ValueError(f"layer1.0.conv2.weight is {shape}, not a (groups * width, width, "
                         f"3, 3) grouped conv")
    width_per_group, groups = conv.shape[1], conv.shape[0] // conv.shape[1]
    fc = sd.get("fc.weight")
    num_classes = fc.shape[0] if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 0
    own, name = _shapes_of(depth, groups, width_per_group, num_classes)
    wrong = [k for k in sd if k not in own or tuple(sd[k].shape) != own[k]]
    wrong += [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if wrong:
        raise ValueError(f"{len(wrong)} keys do not fit {name} ({_classes_phrase(num_classes)})"
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


# --- loading into a model --------------------------------------------------------------------

@dataclass
class LoadReport:
    """What load_weights did.

    Attributes:
        format: the detected format (read_checkpoint's), e.g. 'mmcls 0.x, EMA copy ... skipped'.
        path: the file read.
        loaded: number of tensors loaded.
        skipped: keys not loaded (the classifier with reset_head).
        classes: the class names attached to the model.
        file_dtypes: floating dtypes found in the file, e.g. ['float16'].
        notes: what else happened, e.g. 'tensors were float16, cast to float32'.
    """
    format: str
    path: Path
    loaded: int
    skipped: list[str]
    classes: list[str] | None
    file_dtypes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        msg = f"loaded {self.loaded} tensors from {self.path} ({self.format})"
        if self.skipped:
            msg += f"; skipped {', '.join(self.skipped)} (reset_head)"
        return "; ".join([msg, *self.notes])


def _fc_out(sd: Mapping[str, torch.Tensor]) -> int | None:
    return sd["fc.weight"].shape[0] if "fc.weight" in sd else None


def _dtype_names(tensors: Any) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})


def load_weights(model: nn.Module, source: str | os.PathLike | Checkpoint,
                 reset_head: bool = False, progress: bool = True,
                 verbose: bool = False) -> LoadReport:
    """Load a checkpoint into `model` strictly and attach its class names.

    Every key must match in name and shape; only missing `num_batches_tracked` buffers are
    tolerated (older files lack them). With reset_head=True the classifier (`fc.*`) is not
    loaded and keeps its fresh initialisation, for fine-tuning on other classes. Tensors are
    cast to the model's dtypes (a float16, bfloat16 or float64 file loads into a float32
    model as float32; integer buffers stay int64), the same way whether the model is real or
    on the meta device (resnext.pretrained's build), so both give identical tensors.

    Args:
        model: a ResNeXt (or any module with our keys).
        source: path, URL, or an already read Checkpoint.
        reset_head: skip the classifier instead of failing when its size differs.
        progress: show a download progress bar.
        verbose: on a mismatch, list every key instead of the first 10 of each kind.
    Returns:
        LoadReport; also sets `model.class_names` (the file's names, else the ImageNet-1k
        names for a 1000-class head, else None).
    Raises:
        ValueError: the file holds another architecture (first line: '<file> holds
            resnext101_32x8d (1000 classes); the model is resnext50_32x4d', then the missing,
            unexpected and wrongly shaped keys), or a classifier of another size without
            reset_head; plus read_checkpoint's errors.
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source, progress)
    sd = dict(ckpt.state_dict)
    own = model.state_dict()
    model_classes = _fc_out(own)
    skipped: list[str] = []
    if reset_head:
        skipped = sorted(k for k in sd if k.startswith("fc."))
        for k in skipped:
            del sd[k]
        own = {k: v for k, v in own.items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if [k for k in missing + unexpected + wrong if not k.startswith("fc.")]:
        wrong_text = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
        raise _mismatch(ckpt, model, missing, unexpected, wrong_text, verbose)
    if missing or unexpected or wrong:  # only the classifier differs
        theirs = f"has {_fc_out(sd)} classes" if _fc_out(sd) else "is absent"
        raise ValueError(f"{ckpt.path}: its classifier {theirs}, the model "
                         f"{model_classes or 'has none'}; pass reset_head=True to keep the "
                         f"model's head (fine-tuning) and load everything else")
    # Cast to the model's dtypes here rather than leaving it to load_state_dict: an assigning
    # load (meta-device model) would otherwise take the file's float16 tensors as they are.
    file_dtypes = _dtype_names(sd.values())
    sd = {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in sd.items()}
    notes = []
    model_dtypes = _dtype_names(own[k] for k in sd)
    if file_dtypes and file_dtypes != model_dtypes:
        notes.append(f"tensors were {' and '.join(file_dtypes)}, cast to "
                     f"{' and '.join(model_dtypes)}")
    on_meta = any(t.is_meta for t in own.values())
    # A model built on the meta device (resnext.pretrained) takes the file's tensors as they
    # are (assign), so the weights are never held twice; it then materialises what is left.
    result = model.load_state_dict(sd, strict=False, assign=on_meta)
    unloaded = [k for k in result.missing_keys
                if k not in skipped and not k.endswith("num_batches_tracked")]
    if unloaded:  # the checks above make this unreachable; never load a model half-way
        raise RuntimeError(f"{ckpt.path}: keys left unloaded: {', '.join(unloaded)}")
    model.weights_source = str(ckpt.path)  # ResNeXt.init_weights() leaves loaded weights alone
    model.class_names = _class_names_for(model, None if reset_head else ckpt.classes, reset_head)
    return LoadReport(ckpt.format, ckpt.path, len(sd), skipped, model.class_names, file_dtypes,
                      notes)


def _mismatch(ckpt: Checkpoint, model: nn.Module, missing: list[str], unexpected: list[str],
              wrong: list[str], verbose: bool) -> ValueError:
    """The error for a file that does not fit: first the architecture it holds (one line),
    then the key lists, capped at 10 each unless verbose."""
    model_name = getattr(model, "arch_name", type(model).__name__)
    held = _detect_or_none(ckpt.state_dict)
    if held is not None and held.name != model_name:
        parts = [f"{ckpt.path} holds {held}; the model is {model_name}",
                 "  to build what the file holds, give no model name: get_model(None, "
                 "pretrained=<file>), or predict.py/evaluate.py without --model"]
    else:
        parts = [f"{ckpt.path} ({ckpt.format}) does not fit the model ({model_name}, "
                 f"{_classes_phrase(_fc_out(model.state_dict()))})"]
    limit = None if verbose else 10
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", wrong)):
        if keys:
            parts.append(f"  {label} ({len(keys)}): {_listing(keys, limit)}")
    if not verbose and max(len(missing), len(unexpected), len(wrong)) > 10:
        parts.append("  (verbose=True lists every key)")
    return ValueError("\n".join(parts))


def _class_names_for(model: nn.Module, classes: list[str] | None,
                     reset_head: bool) -> list[str] | None:
    """The file's class names when they match the head, else ImageNet-1k's for a 1000-class
    head (not after reset_head), else None: names that do not match would mislabel."""
    num_classes = _fc_out(model.state_dict())
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        classes = None
    if classes is None and num_classes == 1000 and not reset_head:
        classes = imagenet_class_names()
    return classes


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

    Args:
        url: http(s) or file URL of the weights.
        progress: show torch.hub's progress bar.
    Returns:
        The local file.
    Raises:
        ValueError: the URL names no file.
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

    Args:
        obj: what to save (plain types and tensors, to stay weights-only loadable).
        path: the destination; its folder is created if missing.
    Returns:
        `path` as a Path.
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
    both `CLASSES` (mmcls 0.x) and `dataset_meta.classes` (mmpretrain 1.x), and the model's
    `preprocessing` (resnext.data.Preprocessing, which mmpretrain ignores) as a plain dict, so
    that a model trained at another size is evaluated at it after the round trip. Reading the
    file back with read_checkpoint gives exactly the original tensors.

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
    preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing.to_dict()
    return save_checkpoint({"meta": meta, "state_dict": state_dict}, path)
