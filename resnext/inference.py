"""Classify images: mmpretrain's inference_model, and the batched helper predict.py uses."""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from PIL import Image
from torch import nn

from .checkpoint import get_model
from .data import eval_transform, load_image

__all__ = ["inference_model", "classify", "autocast"]


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
