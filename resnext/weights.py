"""Where a model's weights come from: the released OpenMMLab weights (RELEASED_WEIGHTS),
loading any checkpoint into a model strictly (load_weights), the immutable record a loaded
model carries (`model.weights_info`, as torchvision's `Weights.meta` or timm's
`pretrained_cfg`), and get_model.

The factories in model.py (`resnext50_32x4d(pretrained=...)`, ...) come here for weights:
the model is built on the meta device (no memory, no random init), takes the file's tensors,
then records the file, its class names and the preprocessing the weights expect.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import (Arch, Checkpoint, _classes_phrase, _detect_or_none, _listing,
                         read_checkpoint)
from .classes import imagenet_class_names
from .errors import CheckpointError, ConfigError
from .model import FACTORIES, ResNeXt
from .releases import DEFAULT_TAG, RELEASES, ReleasedWeights, list_weights, match_release
from .transforms import Preprocessing

__all__ = ["ReleasedWeights", "RELEASED_WEIGHTS", "list_weights", "preprocessing_of",
           "LoadReport", "WeightsInfo", "load_weights", "build_pretrained", "get_model"]


#: Published weights by registry name ('resnext50_32x4d.tv2_in1k'), by mmpretrain's name and,
#: for the factories with an mmpretrain release, by factory name (the seed's default).
RELEASED_WEIGHTS: dict[str, ReleasedWeights] = {
    **{r.name: r for r in RELEASES},
    **{alias: r for r in RELEASES for alias in r.aliases},
    **{r.factory: r for r in RELEASES if r.name.endswith("." + DEFAULT_TAG)}}


def preprocessing_of(source: Checkpoint | str | None) -> Preprocessing:
    """The preprocessing a set of weights expects.

    Args:
        source: a read Checkpoint (its meta: 'preprocessing' from train.py, or the older
            'img_size'), a released model name, or None.
    Returns:
        The stored or released Preprocessing; otherwise mmpretrain's test pipeline (resize
        256, crop 224), which is also torchvision's and timm's for these models.
    """
    if isinstance(source, Checkpoint):
        return Preprocessing.from_meta(source.meta) or Preprocessing()
    if isinstance(source, str) and source in RELEASED_WEIGHTS:
        return RELEASED_WEIGHTS[source].preprocessing
    return Preprocessing()


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


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from: one immutable record, set by load_weights.

    Attributes:
        source: the file read (the cached download for a URL).
        class_names: the classifier's class names (the file's, else ImageNet-1k's for a
            1000-class head), or None.
        preprocessing: the test pipeline the weights expect: the released table's, the one
            train.py stored in the file, else mmpretrain's (resize 256, crop 224).
        load_report: what loading did (format, tensor count, casts, skipped keys).
        release: the RELEASED_WEIGHTS name for released weights, else None.
    """
    source: str
    class_names: tuple[str, ...] | None
    preprocessing: Preprocessing
    load_report: LoadReport
    release: str | None = None


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
    on the meta device (build_pretrained), so both give identical tensors.

    Args:
        model: a ResNeXt (or any module with our keys).
        source: path, URL, or an already read Checkpoint.
        reset_head: skip the classifier instead of failing when its size differs.
        progress: show a download progress bar.
        verbose: on a mismatch, list every key instead of the first 10 of each kind.
    Returns:
        LoadReport; also sets `model.weights_info` (a WeightsInfo), which gives
        `model.class_names` (the file's names, else the ImageNet-1k names for a 1000-class
        head, else None) and `model.preprocessing`.
    Raises:
        CheckpointError (a ValueError): the file holds another architecture (first line:
            '<file> holds resnext101_32x8d (1000 classes); the model is resnext50_32x4d',
            then the missing, unexpected and wrongly shaped keys), or a classifier of another
            size without reset_head; plus read_checkpoint's errors.
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
        theirs = _fc_out(sd)
        keep = (f"to use the file's {theirs}-class head, build the model with "
                f"num_classes={theirs} or get_model(pretrained=<file>); " if theirs else "")
        raise CheckpointError(f"{ckpt.path}: its classifier "
                              f"{f'has {theirs} classes' if theirs else 'is absent'}, the "
                              f"model's {f'has {model_classes}' if model_classes else 'is absent'}"
                              f"; {keep}to train a new head on the rest of the weights, pass "
                              f"reset_head=True")
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
    # A model built on the meta device (build_pretrained) takes the file's tensors as they
    # are (assign), so the weights are never held twice; it then materialises what is left.
    result = model.load_state_dict(sd, strict=False, assign=on_meta)
    unloaded = [k for k in result.missing_keys
                if k not in skipped and not k.endswith("num_batches_tracked")]
    if unloaded:  # the checks above make this unreachable; never load a model half-way
        raise RuntimeError(f"{ckpt.path}: keys left unloaded: {', '.join(unloaded)}")
    classes = _class_names_for(model, None if reset_head else ckpt.classes, reset_head)
    report = LoadReport(ckpt.format, ckpt.path, len(sd), skipped, classes, file_dtypes, notes)
    # ResNeXt.init_weights() leaves weights with a record alone.
    model.weights_info = WeightsInfo(str(ckpt.path), tuple(classes) if classes else None,
                                     preprocessing_of(ckpt), report)
    return report


def _mismatch(ckpt: Checkpoint, model: nn.Module, missing: list[str], unexpected: list[str],
              wrong: list[str], verbose: bool) -> CheckpointError:
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
    return CheckpointError("\n".join(parts))


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


def _materialize_rest(model: nn.Module) -> None:
    """After an assigning load into a meta-device model: give the tensors the file did not
    provide real storage. Missing num_batches_tracked counters become 0; a reset classifier
    gets mmpretrain's head init (Normal(0, 0.01) weight, zero bias)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                if not isinstance(module, nn.Linear):
                    raise RuntimeError(f"parameter {name} of {type(module).__name__} was not "
                                       f"loaded and has no initialisation rule")
                value = torch.empty(param.shape, dtype=param.dtype)
                nn.init.normal_(value, std=0.01) if name == "weight" else nn.init.zeros_(value)
                module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)




def build_pretrained(name: str, depth: int, groups: int, width_per_group: int,
                     pretrained: bool | str | os.PathLike | Checkpoint, *,
                     num_classes: int | None = None, reset_head: bool = False,
                     dtype: torch.dtype | None = None, verbose: bool = False,
                     use_ema: bool = True, weights: str | None = None,
                     **kwargs) -> ResNeXt:
    """A ResNeXt of the given architecture holding a file's weights (the factories' and
    get_model's pretrained= path).

    Args:
        name: the architecture's name, e.g. 'resnext50_32x4d' (for pretrained=True and
            messages).
        depth, groups, width_per_group: as ResNeXt.
        pretrained: True (the released weights of `name`), a path/URL or a read Checkpoint.
        num_classes: classifier size; None: the file's (1000 with reset_head).
        reset_head: leave the file's classifier out and start a new one (fine-tuning).
        dtype: the model's floating dtype; None: float32, whatever dtype the file holds.
        verbose: when the file does not fit, list every key.
        use_ema: a train.py checkpoint's EMA weights when it has them (else the raw ones).
        weights: a registry name ('tv2_in1k' or 'resnext50_32x4d.tv2_in1k'; list_weights()),
            in place of pretrained.
        **kwargs: ResNeXt's backbone options (out_indices, frozen_stages, norm_eval, ...).
    Returns:
        The model in train mode, with `weights_info` set.
    Raises:
        ConfigError (a ValueError): pretrained=True for a model with no released weights.
        CheckpointError, CheckpointNotFoundError, DownloadError: see read_checkpoint and
            load_weights.
    """
    release = _release_for(name, pretrained, weights)
    if release is not None:
        pretrained = release.url
    ckpt = (pretrained if isinstance(pretrained, Checkpoint) else
            read_checkpoint(pretrained, use_ema=use_ema))
    release = release or match_release(ckpt.path)  # a known file keeps its preprocessing
    if num_classes is None:
        num_classes = 1000 if reset_head else (_fc_out(ckpt.state_dict) or 0)
    with torch.device("meta"):
        model = ResNeXt(depth, groups, width_per_group, num_classes=num_classes, **kwargs)
    if dtype is not None:
        model.to(dtype)  # on the meta device: only the dtype the file's tensors are cast to
    load_weights(model, ckpt, reset_head=reset_head, verbose=verbose)
    _materialize_rest(model)
    if release is not None:
        info = model.weights_info
        p = release.preprocessing
        info.load_report.notes.append(f"the registry's {release.name} (resize {p.resize_size}, "
                                      f"crop {p.crop_size})")
        names = release.class_names if not reset_head else None
        model.weights_info = replace(info, preprocessing=p, release=release.name,
                                     class_names=tuple(names) if names else info.class_names)
    return model


def _release_for(name: str, pretrained, weights: str | None = None) -> ReleasedWeights | None:
    """The registry entry `pretrained` or `weights` names: True (the factory's default), an
    entry, or a registry name; None for a file.

    Raises:
        ConfigError (a ValueError): an unknown name, no default entry, or an entry of another
            architecture.
    """
    if weights is not None:
        key = weights if "." in weights else f"{name}.{weights}"
        if key not in RELEASED_WEIGHTS:
            known = ", ".join(r.name for r in list_weights(name)) or "none"
            raise ConfigError(f"unknown weights {weights!r} for {name}; published: {known}")
        pretrained = RELEASED_WEIGHTS[key]
    if pretrained is True:
        if name not in RELEASED_WEIGHTS:
            known = ", ".join(r.name for r in list_weights(name)) or "none"
            raise ConfigError(f"{name} has no released OpenMMLab weights, the default of "
                              f"pretrained=True (published for it: {known}); pass weights= "
                              f"one of those, or pretrained=<path or URL>")
        return RELEASED_WEIGHTS[name]
    release = pretrained if isinstance(pretrained, ReleasedWeights) else (
        RELEASED_WEIGHTS.get(pretrained) if isinstance(pretrained, str) else None)
    if release is not None and release.factory != name:
        raise ConfigError(f"{release.name} holds {release.factory} weights, not {name}")
    return release


def get_model(name: str | None = None, pretrained: bool | str | os.PathLike | Checkpoint = False,
              **kwargs) -> ResNeXt:
    """Build a model by factory name ('resnext50_32x4d') or seed name
    ('resnext50-32x4d_8xb32_in1k'), like mmpretrain's get_model.

    With a checkpoint path/URL and no num_classes, the classifier size is taken from the
    file, so `get_model('resnext50_32x4d', 'work_dirs/rx50/best.pth')` rebuilds a 2-class
    model from train.py. With name None the file decides: its own model name (our
    checkpoints store it), else the architecture its keys and shapes hold
    (checkpoint.detect_architecture: torchvision, timm and mmcls files), which may be one
    without a factory, such as a ResNet-50 (groups 1).

    Args:
        name: see RELEASED_WEIGHTS and resnext.list_models(), or None (the file's model;
            resnext50_32x4d without a file).
        pretrained: False, True (released weights), a path/URL or a read Checkpoint.
        **kwargs: forwarded to the factory (num_classes, reset_head, dtype, verbose, ...);
            use_ema=False takes a train.py checkpoint's raw weights instead of its EMA.
    Returns:
        The model, in eval mode when weights were loaded, with `weights_info` (class names,
        preprocessing, load report) set from the weights; float32 (or `dtype`) whatever the
        file holds.
    Raises:
        ConfigError (a ValueError): unknown name (the message lists the known ones).
        CheckpointError (a ValueError): a file that holds another architecture than `name`
            (one line naming both); loader errors.
        CheckpointNotFoundError, DownloadError: see read_checkpoint.
    """
    arch: Arch | None = None
    if isinstance(pretrained, str) and pretrained in RELEASED_WEIGHTS:
        pretrained = RELEASED_WEIGHTS[pretrained]  # a registry name, not a file
        name = name or pretrained.factory
    if (pretrained is not False and pretrained is not True and pretrained is not None
            and not isinstance(pretrained, ReleasedWeights)):
        ckpt = (pretrained if isinstance(pretrained, Checkpoint) else
                read_checkpoint(pretrained, use_ema=kwargs.pop("use_ema", True)))
        arch = _detect_or_none(ckpt.state_dict)  # None: load_weights says what does not fit
        wanted = RELEASED_WEIGHTS[name].factory if name in RELEASED_WEIGHTS else name
        if wanted is None:
            name = ckpt.meta.get("model") if ckpt.meta.get("model") in FACTORIES else (
                arch.name if arch is not None else None)
        elif arch is not None and wanted in FACTORIES and arch.name != wanted:
            hint = f"name {arch.name} or none" if arch.name in FACTORIES else "no name"
            raise CheckpointError(f"{ckpt.path} holds {arch}; the model is {wanted} (give "
                                  f"{hint} to build what the file holds)")
        pretrained = ckpt
    name = name or "resnext50_32x4d"
    factory_name = RELEASED_WEIGHTS[name].factory if name in RELEASED_WEIGHTS else name
    if pretrained is True and "." in name and name in RELEASED_WEIGHTS:
        pretrained = RELEASED_WEIGHTS[name]  # a registry name: that entry, not the default
    if factory_name in FACTORIES:
        model = FACTORIES[factory_name](pretrained=pretrained, **kwargs)
    elif arch is not None and name == arch.name:  # e.g. a ResNet-50 file: no factory of its own
        model = build_pretrained(arch.name, arch.depth, arch.groups, arch.width_per_group,
                                 pretrained, **kwargs)
    else:
        raise _unknown_model(name)
    return model.eval() if pretrained is not False else model


def _unknown_model(name: str) -> ConfigError:
    known = sorted(set(FACTORIES) | set(RELEASED_WEIGHTS))
    return ConfigError(f"unknown model {name!r}; known: {', '.join(known)}")


def factory_name(name: str) -> str:
    """The factory a factory, registry or mmpretrain name stands for:
    'resnext50_32x4d.tv2_in1k' and 'resnext50-32x4d_8xb32_in1k' -> 'resnext50_32x4d'.

    Raises:
        ConfigError: a name that is none of those (the message lists the known ones).
    """
    factory = RELEASED_WEIGHTS[name].factory if name in RELEASED_WEIGHTS else name
    if factory not in FACTORIES:
        raise _unknown_model(name)
    return factory
