"""Released weights and models built from files: RELEASED_WEIGHTS, get_model, pretrained=.

model.py's factories build random models and know nothing of files. The factories exported by
`resnext` (`resnext.resnext50_32x4d`, ...) are those same factories wrapped here to accept
`pretrained=` and `reset_head=`: with weights, the model is built on the meta device (no
memory, no random init) and takes the file's tensors, then learns its class names and the
preprocessing the weights expect (`model.preprocessing`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import model as _model
from .checkpoint import (Arch, Checkpoint, LoadReport, detect_architecture, load_weights,
                         read_checkpoint)
from .data import Preprocessing
from .model import ResNeXt

__all__ = [
    "ReleasedWeights", "RELEASED_WEIGHTS", "preprocessing_of", "get_model",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d",
    "resnext101_64x4d",
]


@dataclass(frozen=True)
class ReleasedWeights:
    """One released OpenMMLab checkpoint (mmpretrain configs/resnext/metafile.yml).

    Attributes:
        name: the seed's model name, e.g. 'resnext50-32x4d_8xb32_in1k'.
        factory: our factory function's name, e.g. 'resnext50_32x4d'.
        url: download address; the 8 hex digits before '.pth' are the SHA-256 prefix.
        top1, top5: ImageNet-1k val accuracy (%) published for it.
        preprocessing: the test pipeline it was evaluated with (mmpretrain
            configs/_base_/datasets/imagenet_bs32_pil_resize.py: PIL bilinear resize of the
            short side to 256, centre crop 224, mean/std (123.675, 116.28, 103.53) /
            (58.395, 57.12, 57.375) on the 0-255 scale).
    """
    name: str
    factory: str
    url: str
    top1: float
    top5: float
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


_BASE_URL = "https://download.openmmlab.com/mmclassification/v0/resnext/"
_RELEASES = [
    ReleasedWeights("resnext50-32x4d_8xb32_in1k", "resnext50_32x4d",
                    _BASE_URL + "resnext50_32x4d_b32x8_imagenet_20210429-56066e27.pth",
                    77.90, 93.66),
    ReleasedWeights("resnext101-32x4d_8xb32_in1k", "resnext101_32x4d",
                    _BASE_URL + "resnext101_32x4d_b32x8_imagenet_20210506-e0fa3dd5.pth",
                    78.61, 94.17),
    ReleasedWeights("resnext101-32x8d_8xb32_in1k", "resnext101_32x8d",
                    _BASE_URL + "resnext101_32x8d_b32x8_imagenet_20210506-23a247d5.pth",
                    79.27, 94.58),
    ReleasedWeights("resnext152-32x4d_8xb32_in1k", "resnext152_32x4d",
                    _BASE_URL + "resnext152_32x4d_b32x8_imagenet_20210524-927787be.pth",
                    78.88, 94.33),
]
#: Released weights by seed name and by factory name (both spellings of each model).
RELEASED_WEIGHTS: dict[str, ReleasedWeights] = {
    **{r.name: r for r in _RELEASES}, **{r.factory: r for r in _RELEASES}}


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
                    raise ValueError(f"parameter {name} of {type(module).__name__} was not "
                                     f"loaded and has no initialisation rule")
                value = torch.empty(param.shape, dtype=param.dtype)
                nn.init.normal_(value, std=0.01) if name == "weight" else nn.init.zeros_(value)
                module._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)


def _build_with_weights(factory: Callable[..., ResNeXt], pretrained: bool | str | os.PathLike
                        | Checkpoint, reset_head: bool, dtype: torch.dtype | None,
                        verbose: bool, kwargs: dict) -> ResNeXt:
    name = factory.__name__
    release = None
    if pretrained is True:
        if name not in RELEASED_WEIGHTS:
            released = sorted({r.factory for r in _RELEASES})
            raise ValueError(f"{name} has no released OpenMMLab weights (released: "
                             f"{', '.join(released)}); pass pretrained='path/or/url.pth'")
        release = RELEASED_WEIGHTS[name]
        pretrained = release.url
    ckpt = pretrained if isinstance(pretrained, Checkpoint) else read_checkpoint(pretrained)
    with torch.device("meta"):
        model = factory(**kwargs)
    if dtype is not None:
        model.to(dtype)  # on the meta device: only the dtype the file's tensors are cast to
    report: LoadReport = load_weights(model, ckpt, reset_head=reset_head, verbose=verbose)
    _materialize_rest(model)
    model.load_report = report
    model.preprocessing = release.preprocessing if release else preprocessing_of(ckpt)
    return model


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, "
                         f"got {dtype!r}")


def _with_weights(factory: Callable[..., ResNeXt]) -> Callable[..., ResNeXt]:
    """`factory` plus pretrained= (True: released weights; or a path/URL/Checkpoint),
    reset_head= (skip a classifier of another size, for fine-tuning), dtype= (the model's
    floating dtype, default torch's default float32, whatever dtype a file holds) and
    verbose= (list every key when a file does not fit)."""

    @functools.wraps(factory)
    def build(*, pretrained: bool | str | os.PathLike | Checkpoint = False,
              reset_head: bool = False, dtype: torch.dtype | None = None,
              verbose: bool = False, **kwargs) -> ResNeXt:
        _check_dtype(dtype)
        if pretrained is False or pretrained is None:
            if reset_head:
                raise ValueError("reset_head=True only makes sense with pretrained=")
            model = factory(**kwargs)
            return model.to(dtype) if dtype is not None else model
        return _build_with_weights(factory, pretrained, reset_head, dtype, verbose, kwargs)

    return build


resnext50_32x4d = _with_weights(_model.resnext50_32x4d)
resnext101_32x4d = _with_weights(_model.resnext101_32x4d)
resnext101_32x8d = _with_weights(_model.resnext101_32x8d)
resnext152_32x4d = _with_weights(_model.resnext152_32x4d)
resnext101_64x4d = _with_weights(_model.resnext101_64x4d)
_FACTORIES: dict[str, Callable[..., ResNeXt]] = {
    f.__name__: f for f in (resnext50_32x4d, resnext101_32x4d, resnext101_32x8d,
                            resnext152_32x4d, resnext101_64x4d)}


def _arch_factory(arch: Arch) -> Callable[..., ResNeXt]:
    """A factory for a detected architecture that has no factory of its own (e.g. a
    torchvision/mmpretrain ResNet-50, groups 1)."""

    def factory(**kwargs) -> ResNeXt:
        return ResNeXt(arch.depth, arch.groups, arch.width_per_group, **kwargs)

    factory.__name__ = arch.name
    return _with_weights(factory)


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
        **kwargs: forwarded to the factory (num_classes, reset_head, dtype, verbose, ...).
    Returns:
        The model, in eval mode when weights were loaded, with `class_names` and
        `preprocessing` set from the weights; float32 (or `dtype`) whatever the file holds.
    Raises:
        ValueError: unknown name (the message lists the known ones); a file that holds
            another architecture than `name` (one line naming both); loader errors.
        FileNotFoundError, RuntimeError: see read_checkpoint.
    """
    factory = None
    if pretrained is not False and pretrained is not True and pretrained is not None:
        ckpt = pretrained if isinstance(pretrained, Checkpoint) else read_checkpoint(pretrained)
        if not kwargs.get("reset_head"):
            fc = ckpt.state_dict.get("fc.weight")
            kwargs.setdefault("num_classes", fc.shape[0] if fc is not None else 0)
        try:
            arch: Arch | None = detect_architecture(ckpt)
        except ValueError:
            arch = None  # load_weights will say what does not fit
        wanted = RELEASED_WEIGHTS[name].factory if name in RELEASED_WEIGHTS else name
        if wanted is None:
            if ckpt.meta.get("model") in _FACTORIES:
                name = ckpt.meta["model"]
            elif arch is not None:
                name = arch.name
                factory = _FACTORIES.get(arch.name) or _arch_factory(arch)
        elif arch is not None and wanted in _FACTORIES and arch.name != wanted:
            hint = f"name {arch.name} or none" if arch.name in _FACTORIES else "no name"
            raise ValueError(f"{ckpt.path} holds {arch}; the "
                             f"model is {wanted} (give {hint} to build what the file holds)")
        pretrained = ckpt
    name = name or "resnext50_32x4d"
    factory_name = RELEASED_WEIGHTS[name].factory if name in RELEASED_WEIGHTS else name
    if factory is None and factory_name not in _FACTORIES:
        known = sorted(set(_FACTORIES) | set(RELEASED_WEIGHTS))
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")
    model = (factory or _FACTORIES[factory_name])(pretrained=pretrained, **kwargs)
    return model.eval() if pretrained is not False else model
