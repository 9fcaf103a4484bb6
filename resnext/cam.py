"""Class activation maps (Grad-CAM, Selvaraju et al., "Grad-CAM: Visual Explanations from
Deep Networks via Gradient-based Localization", ICCV 2017, arXiv:1610.02391) of the last
stage, and the overlay predict.py --cam writes.

For class c with logit y_c and the last stage's map A (N, 2048, H/32, W/32):
    w_k = mean over (i, j) of dy_c / dA_k[i, j]       (N, 2048)
    cam = ReLU(sum_k w_k A_k)                          (N, H/32, W/32)
upsampled (bilinear) to the input size and scaled to [0, 1] per image. A forward hook on
`model.layer4` picks A up and torch.autograd.grad takes dy_c / dA, so no parameter's .grad
is touched and frozen weights work too. Give it the plain network in eval mode (predict.py
reloads it when --fuse-bn or --compile prepared another); gradients are turned on inside,
also under torch.no_grad or torch.inference_mode.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

__all__ = ["layer_gradients", "grad_cam", "heat_colors", "to_image", "overlay",
           "cam_file_names"]


def layer_gradients(model: nn.Module, x: torch.Tensor,
                    class_index: int | Sequence[int] | torch.Tensor | None = None,
                    layer: nn.Module | None = None):
    """The last stage's map and the gradient of the chosen class's logit with respect to it.

    Args:
        model: a classifier whose forward runs `layer` (default `model.layer4`, as in our
            ResNeXt and torchvision's ResNets), in eval mode.
        x: (N, 3, H, W) float normalised images on the model's device.
        class_index: the class per image: None for the top logit, one int for all, or N.
        layer: the module whose output is A.
    Returns:
        (A, dA, labels): A and dA (N, C, h, w) float, detached; labels (N,) int64, the
        classes the gradients are of.
    Raises:
        ValueError: `layer` did not run in the forward pass.
    """
    layer = model.layer4 if layer is None else layer
    found: list[torch.Tensor] = []

    def keep(module, inputs, output):
        # A leaf of its own: dy/dA exists even when nothing before it requires grad.
        output = output.detach().requires_grad_(True)
        found.append(output)
        return output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone() if x.is_inference() else x  # inference tensors cannot join autograd
            logits = model(x)  # (N, num_classes)
            if not found:
                raise ValueError("the chosen layer did not run in the model's forward pass")
            n = logits.shape[0]
            if class_index is None:
                labels = logits.argmax(dim=1)
            else:
                labels = torch.as_tensor(class_index, dtype=torch.int64,
                                         device=logits.device).expand(n).clone()
            score = logits.gather(1, labels[:, None]).sum()  # rows are independent in eval
            (grad,) = torch.autograd.grad(score, found[-1])
    finally:
        handle.remove()
    return found[-1].detach(), grad, labels


def grad_cam(model: nn.Module, x: torch.Tensor,
             class_index: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM of the last stage (layer4) for one class per image.

    Args:
        model: our ResNeXt (or any model with a `layer4` that its forward runs), in eval
            mode, not compiled.
        x: (N, 3, H, W) float32 images, normalised as the model expects.
        class_index: None (each image's top class), an int, or N ints.
    Returns:
        (N, H, W) float32 in [0, 1] on x's device: ReLU(sum_k w_k A_k), w_k the spatial mean
        of d logit / d A_k, bilinearly upsampled from (H/32, W/32) and scaled per image to
        (cam - min) / (max - min); an image whose map is flat gets all zeros.
    """
    feats, grads, _ = layer_gradients(model, x, class_index)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)     # (N, C, 1, 1)
    cam = F.relu((weights * feats.float()).sum(dim=1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)                   # (N, 1, 1)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp(min=1e-12), torch.zeros_like(cam))


def heat_colors(cam: torch.Tensor) -> torch.Tensor:
    """The 'jet' colour map: values in [0, 1] (blue low, through green and yellow, to red
    high) -> RGB.

    Args:
        cam: (H, W) float in [0, 1].
    Returns:
        (3, H, W) float in [0, 1].
    """
    v = cam.clamp(0, 1)[None]                                  # (1, H, W)
    centres = torch.tensor([3.0, 2.0, 1.0], device=cam.device).view(3, 1, 1)  # r, g, b
    return (1.5 - (4 * v - centres).abs()).clamp(0, 1)         # (3, H, W)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 pixels (e.g. Preprocessing.transform(normalize=False)'s crop) -> an
    RGB PIL image."""
    hwc = pixels.detach().cpu().to(torch.uint8).permute(1, 2, 0)
    hwc = hwc.clone(memory_format=torch.contiguous_format)  # (H, W, 3), its own bytes
    return Image.frombytes("RGB", (hwc.shape[1], hwc.shape[0]), bytes(hwc.untyped_storage()))


def overlay(image: Image.Image | torch.Tensor, cam: torch.Tensor, text: str = "",
            alpha: float = 0.5, min_size: int = 256) -> Image.Image:
    """The photo with the heat map blended over it and `text` in a dark band at the top.

    Args:
        image: the RGB image the map belongs to, e.g. the model's input crop, as a PIL
            image or (3, H, W) uint8 pixels.
        cam: (h, w) float in [0, 1] (grad_cam's), resized to the image.
        text: e.g. 'bees 0.87'; drawn with Pillow's default font.
        alpha: weight of the heat map (0: photo only, 1: map only).
        min_size: the result's short side is enlarged to at least this many pixels, so
            that a small crop and its text stay readable.
    Returns:
        A new RGB image: (1 - alpha) * photo + alpha * jet(cam).
    """
    image = to_image(image) if isinstance(image, torch.Tensor) else image.convert("RGB")
    scale = max(1.0, min_size / min(image.size))
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.BICUBIC)
    width, height = image.size
    cam = F.interpolate(cam.detach().float().cpu()[None, None], size=(height, width),
                        mode="bilinear", align_corners=False)[0, 0]  # (height, width)
    photo = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    photo = photo.view(height, width, 3).permute(2, 0, 1).float() / 255  # (3, height, width)
    mixed = (1 - alpha) * photo + alpha * heat_colors(cam)
    result = to_image((mixed * 255).round().clamp(0, 255))
    if text:
        _caption(result, text)
    return result


def _caption(image: Image.Image, text: str) -> None:
    """Write `text` on a dark band across the top of `image`, in place; shrunk or cut to fit."""
    draw = ImageDraw.Draw(image)
    size = max(10, image.height // 14)
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > image.width - 8:
        size -= 1
        font = _font(size)
    while len(text) > 1 and draw.textlength(text, font=font) > image.width - 8:
        text = text[:-2] + "\u2026"
    left, top, right, bottom = draw.textbbox((4, 3), text, font=font)
    band = Image.new("RGB", (image.width, bottom + 4), (0, 0, 0))
    image.paste(Image.blend(image.crop((0, 0, image.width, bottom + 4)), band, 0.6), (0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255), font=font)


def cam_file_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One output name per input: '<stem>_cam.png', and '<stem>-2_cam.png', '-3', ... for
    later inputs whose name would repeat one already given (compared ignoring case, for
    file systems that do)."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = f"{stem}_cam.png", 1
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}_cam.png"
        used.add(name.lower())
        names.append(name)
    return names
