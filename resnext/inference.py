"""Classify images: mmpretrain's inference_model, and the batched helper predict.py uses."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from .checkpoint import get_model, read_checkpoint
from .data import eval_transform, load_image

__all__ = ["inference_model", "classify", "autocast", "resolve_amp", "fuse_bn",
           "compile_available", "maybe_compile", "InferenceSetup", "load_for_inference"]


def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX on this x86 CPU (Linux /proc/cpuinfo); else bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """'auto' -> 'bf16' where the device runs bf16 natively (CUDA with bf16 support, or a
    CPU with AVX512-BF16/AMX), else None (fp32), so no device gets slower; other values pass
    through unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and _cpu_has_fast_bf16() else None


def fuse_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with every BatchNorm folded into the conv before it.

    conv -> BN in eval mode is one affine map, so the folded conv (with a bias) gives the
    same outputs to float rounding while skipping a full pass over every activation map.
    Only for eval: the copy has no BN to train. The original model is left untouched.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    pairs = [(fused, "conv1", "bn1")]
    for block in fused.modules():
        if hasattr(block, "conv3") and hasattr(block, "bn3"):  # Bottleneck
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())
    return fused


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can run here: Inductor needs a C++ compiler (and Triton on
    CUDA). Returns (ok, reason when not)."""
    if not shutil.which(os.environ.get("CXX", "c++")) and not shutil.which("g++"):
        return False, "no C++ compiler found"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    return True, ""


def maybe_compile(model: nn.Module, device: torch.device, announce: bool = True) -> nn.Module:
    """torch.compile(model) where compile_available, else the model unchanged (saying so)."""
    ok, why = compile_available(device)
    if ok:
        return torch.compile(model)
    if announce:
        print(f"--compile ignored: {why}; running eager")
    return model


@dataclass
class InferenceSetup:
    """What predict.py/evaluate.py run with: the prepared model and facts about it.

    Attributes:
        model: in eval mode, on the device, with the requested fast options applied.
        class_names: from the checkpoint (or ImageNet's for 1000 classes), else None.
        num_classes: classifier outputs (None without a classifier).
        arch_name: e.g. 'resnext50_32x4d'.
        img_size: centre-crop size to use (pixels).
        amp: the resolved autocast dtype name, or None for fp32.
    """
    model: nn.Module
    class_names: list[str] | None
    num_classes: int | None
    arch_name: str
    img_size: int
    amp: str | None


def load_for_inference(name: str | None, checkpoint: str | None, device: torch.device, *,
                       img_size: int | None = None, amp: str | None = None,
                       fuse: bool = False, channels_last: bool = True,
                       compile: bool = False, announce: bool = True) -> InferenceSetup:
    """Build and load the model predict.py and evaluate.py use.

    Args:
        name: factory or seed name; None: the checkpoint's own, else resnext50_32x4d.
        checkpoint: path/URL of any supported format; None: the released weights of `name`.
        device: where to run.
        img_size: crop size; None: the size train.py stored in the checkpoint, else 224.
        amp: None, 'auto', 'bf16' or 'fp16' (see resolve_amp).
        fuse: fold BatchNorm into the convs (fuse_bn).
        channels_last: convert the weights to channels_last.
        compile: torch.compile where available (maybe_compile).
        announce: print when an option falls back.
    Raises:
        The loader's errors (ValueError, FileNotFoundError, RuntimeError for downloads).
    """
    pretrained = read_checkpoint(checkpoint) if checkpoint else True
    stored_size = pretrained.meta.get("img_size") if pretrained is not True else None
    model = get_model(name, pretrained=pretrained).to(device)
    setup = InferenceSetup(model, model.class_names, model.num_classes or None,
                           model.arch_name, img_size or stored_size or 224,
                           resolve_amp(amp, device))
    if fuse:
        model = fuse_bn(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = maybe_compile(model, device, announce)
    setup.model = model
    return setup


def autocast(device: torch.device, amp: str | None):
    """torch.autocast for amp in {'bf16', 'fp16'}, or a no-op context for None (fp32)."""
    if amp is None:
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be 'bf16', 'fp16' or None, got {amp!r}")
    return torch.autocast(device.type, dtype=dtypes[amp])


def classify(model: nn.Module, images: torch.Tensor, amp: str | None = None,
             channels_last: bool = True) -> torch.Tensor:
    """Softmax scores for a batch, in eval mode under inference_mode.

    Args:
        model: a classifier (put in eval mode here).
        images: (N, 3, H, W) float32 normalised images, on the model's device.
        amp: None (fp32, exact), 'bf16' or 'fp16' autocast.
        channels_last: run in channels_last memory format (same numbers, faster kernels).
    Returns:
        (N, num_classes) float32 probabilities.
    """
    model.eval()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(images.device, amp):
        logits = model(images)
    return logits.float().softmax(dim=1)


def inference_model(model: nn.Module | str, image: str | os.PathLike | Image.Image,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """Classify one image, returning mmpretrain's result dict.

    Args:
        model: a model, or a name for get_model(name, pretrained=True) (released weights).
        image: a path or a PIL image; decoded to RGB with EXIF orientation, resized (short
            side 256, PIL bilinear), centre-cropped to 224 and normalised.
        device: where to run; default the model's device.
    Returns:
        {'pred_scores': (num_classes,) float32 softmax tensor on CPU, 'pred_label': int,
         'pred_score': float, 'pred_class': str (only when the model has class names)}.
    Raises:
        resnext.data.ImageReadError: the image cannot be read (the message names it).
    """
    if isinstance(model, str):
        model = get_model(model, pretrained=True)
    if device is not None:
        model = model.to(device)
    device = next(model.parameters()).device
    pil = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
    x = eval_transform()(pil).unsqueeze(0).to(device)
    scores = classify(model, x)[0].cpu()
    label = int(scores.argmax())
    result = {"pred_scores": scores, "pred_label": label, "pred_score": float(scores[label])}
    names = getattr(model, "class_names", None)
    if names:
        result["pred_class"] = names[label]
    return result
