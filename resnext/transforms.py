"""Preprocessing: the one description of how images are prepared for a set of weights, the
eval transform it builds, Normalize, and the training transforms.

Evaluation (predict.py, evaluate.py, train.py's validation; mmpretrain
configs/_base_/datasets/imagenet_bs32_pil_resize.py): resize the short side to 256 with PIL
bilinear, centre crop 224, normalise with the ImageNet mean/std. Training: RandomResizedCrop
224 (area 0.08-1, ratio 3/4-4/3) and a horizontal flip. torchvision is imported only where
training transforms are built.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image

from .errors import ConfigError, ImageReadError
from .images import _open_image, _reading, _upright_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CROP_FRACTION", "Preprocessing", "EvalTransform",
           "Normalize", "eval_transform", "train_transform", "FastTrainTransform"]

# mmpretrain's mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on the 0-255
# scale, divided by 255: identical to torchvision's ImageNet constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Validation resizes the short side to img_size / 0.875 (256 for 224) before the centre crop.
CROP_FRACTION = 0.875


_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class Normalize:
    """uint8 pixels -> float32 normalised model input, on whatever device the pixels are.

    ((x / 255) - mean) / std: the operations and order of torchvision's ToTensor + Normalize,
    so the result on CPU is bitwise theirs. The loaders hand over uint8 batches (4x fewer
    bytes to collate, pin and copy to the GPU than float32) and the model side normalises.
    The 255, mean and std are kept as tensors on the pixels' device, never Python scalars:
    CUDA divides by a scalar as a multiplication by its reciprocal, which can differ from
    the CPU result in the last bit; a tensor divisor is a true division on both.

    Args:
        mean, std: per-channel values on the [0, 1] scale (3 each).
    Call: (..., 3, H, W) uint8 -> same shape float32, same device and memory format.
    Raises:
        TypeError: pixels that are not uint8 (already-normalised input must not be scaled
            twice).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._constants:
            self._constants[device] = (
                torch.tensor(255.0, device=device),
                torch.tensor(self.mean, dtype=torch.float32, device=device).view(3, 1, 1),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(3, 1, 1))
        return self._constants[device]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"Normalize takes uint8 pixels, got {pixels.dtype}")
        scale, mean, std = self._on(pixels.device)
        return pixels.float().div_(scale).sub_(mean).div_(std)  # .float() made the one copy

    def __getstate__(self) -> dict:  # DataLoader workers rebuild the constants themselves
        return {"mean": self.mean, "std": self.std, "_constants": {}}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class EvalTransform:
    """Test preprocessing: RGB PIL image -> (3, crop, crop) float32 normalised tensor, or the
    uint8 crop with normalize=False (for a model that normalises on its device).

    Resize the short side to `resize_size` (long side floored), centre-crop `crop_size` at
    offsets round((H - crop) / 2), scale to [0, 1], subtract mean, divide by std: the same
    operations in the same order as torchvision's Resize + CenterCrop + ToTensor + Normalize on
    a PIL image, so the output is bitwise identical (tested against torchvision itself)
    without importing torchvision.

    Args:
        crop_size: output side in pixels.
        resize_size: short side after resizing, in pixels; >= crop_size.
        interpolation: 'bilinear' (mmpretrain's PIL resize) or 'bicubic'.
        mean, std: per-channel normalisation on the [0, 1] scale.
        normalize: False: return the (3, crop, crop) uint8 crop; Normalize(mean, std) of it is
            the float output, bitwise.
    Raises (on call):
        ImageReadError: the resized image would exceed the pixel limit (Pillow's
            MAX_IMAGE_PIXELS, see resnext.images.set_max_image_pixels); the datasets and
            predict.py add the file's path to the message.
    """

    def __init__(self, crop_size: int = 224, resize_size: int = 256,
                 interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, normalize: bool = True):
        self.crop_size, self.resize_size = crop_size, resize_size
        self.resample = _INTERPOLATIONS[interpolation]
        self.normalize = Normalize(mean, std) if normalize else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and new_short * new_long > limit:
            # A thin strip (30000 x 1) is cheap to send and asks for gigabytes once its short
            # side is scaled up: bound the resized image by the same pixel limit as decoding.
            raise ImageReadError(f"{w}x{h} image: resizing its short side to {new_short} "
                                 f"would make it {size[0]}x{size[1]} = "
                                 f"{new_short * new_long:,} pixels, over the limit of "
                                 f"{limit:,} (resnext.images.set_max_image_pixels, "
                                 f"--max-image-pixels)")
        image = image.resize(size, self.resample)  # PIL resizes with antialiasing
        left = int(round((size[0] - self.crop_size) / 2.0))
        top = int(round((size[1] - self.crop_size) / 2.0))
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.crop_size, self.crop_size, 3).permute(2, 0, 1)
        return self.normalize(pixels) if self.normalize else pixels  # (3, crop, crop)

    def __repr__(self) -> str:
        return (f"EvalTransform(crop_size={self.crop_size}, resize_size={self.resize_size}, "
                f"resample={self.resample.name.lower()}, normalize={self.normalize})")


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared for a set of weights: the one source of truth that travels
    with them (as torchvision's `weights.transforms()`), read by predict.py, evaluate.py,
    inference_model and train.py's validation.

    Attributes:
        crop_size: centre-crop side in pixels (the training crop size).
        resize_size: short side before cropping, in pixels; floor(crop / 0.875) by default
            (256 for 224; mmpretrain and timm).
        interpolation: 'bilinear' (PIL; mmpretrain configs/_base_/datasets/
            imagenet_bs32_pil_resize.py) or 'bicubic'.
        mean, std: per-channel normalisation on the [0, 1] scale (mmpretrain's 0-255 values
            / 255).
    Raises:
        ConfigError (a ValueError): non-positive sizes, resize_size < crop_size, unknown
            interpolation.
    """
    crop_size: int = 224
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", math.floor(self.crop_size / CROP_FRACTION))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not (isinstance(self.crop_size, int) and self.crop_size >= 1
                and isinstance(self.resize_size, int) and self.resize_size >= self.crop_size):
            raise ConfigError(f"preprocessing needs integer sizes with resize_size >= crop_size "
                              f">= 1, got crop {self.crop_size!r}, resize {self.resize_size!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got "
                              f"{self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")

    def transform(self, normalize: bool = True) -> EvalTransform:
        """The test transform: RGB PIL image -> (3, crop, crop) float32 normalised tensor
        (normalize=False: the uint8 crop, which `self.normalizer()` turns into the same)."""
        return EvalTransform(self.crop_size, self.resize_size, self.interpolation,
                             self.mean, self.std, normalize)

    def normalizer(self) -> Normalize:
        """uint8 crops -> float32 model input with these weights' mean and std."""
        return Normalize(self.mean, self.std)

    def to_dict(self) -> dict:
        """Plain types, for a checkpoint's meta (weights-only loadable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: Mapping) -> "Preprocessing | None":
        """From a checkpoint's meta: 'preprocessing' (ours), or the 'img_size' that older
        train.py files stored; None when the meta says nothing.

        Raises:
            ConfigError (a ValueError): the stored values are malformed.
        """
        stored = meta.get("preprocessing")
        if isinstance(stored, Mapping):
            known = {k: stored[k] for k in ("crop_size", "resize_size", "interpolation",
                                             "mean", "std") if k in stored}
            return cls(**known)
        if isinstance(meta.get("img_size"), int):
            return cls(crop_size=meta["img_size"])
        return None


def eval_transform(img_size: int = 224, resize_size: int | None = None) -> EvalTransform:
    """Test preprocessing: RGB PIL image -> (3, img_size, img_size) float32 normalised tensor.

    Args:
        img_size: centre-crop size in pixels (mmpretrain: 224).
        resize_size: short side after resizing, in pixels; default floor(img_size / 0.875)
            (256 for 224), as mmpretrain and timm.
    Raises:
        ConfigError (a ValueError): see Preprocessing.
    """
    return Preprocessing(img_size, resize_size).transform()


def train_transform(img_size: int = 224, auto_augment: str | None = None,
                    random_erase: float = 0.0) -> Callable:
    """Training augmentation: PIL RGB image -> (3, img_size, img_size) float32 normalised
    tensor.

    Default: mmpretrain's imagenet_bs32_pil_resize train pipeline, RandomResizedCrop
    (area 0.08-1, ratio 3/4-4/3, bilinear) and a horizontal flip. The options add what
    torchvision's ClassificationPresetTrain adds, in its order: after the flip one
    auto-augment policy, after normalising RandomErasing.

    Args:
        img_size: crop side in pixels.
        auto_augment: None; 'ta_wide' (TrivialAugmentWide), 'ra' (RandAugment: 2 ops,
            magnitude 9) or 'imagenet' (AutoAugment's ImageNet policy), bilinear.
        random_erase: probability of RandomErasing (torchvision's default area and ratio).
    Raises:
        ConfigError (a ValueError): an unknown auto_augment.
    """
    from torchvision import transforms as T  # only training needs torchvision's transforms

    bilinear = T.InterpolationMode.BILINEAR
    steps = [T.RandomResizedCrop(img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                 interpolation=bilinear),
             T.RandomHorizontalFlip(0.5)]
    policies = {"ta_wide": lambda: T.TrivialAugmentWide(interpolation=bilinear),
                "ra": lambda: T.RandAugment(interpolation=bilinear),
                "imagenet": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET,
                                                  interpolation=bilinear)}
    if auto_augment is not None:
        if auto_augment not in policies:
            raise ConfigError(f"auto-augment must be one of {sorted(policies)}, got "
                              f"{auto_augment!r}")
        steps.append(policies[auto_augment]())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if random_erase > 0:
        steps.append(T.RandomErasing(p=random_erase))
    return T.Compose(steps)


# EXIF orientation -> the tensor operation of Pillow's ImageOps.exif_transpose on (C, H, W)
# pixels (2: FLIP_LEFT_RIGHT, 3: ROTATE_180, 4: FLIP_TOP_BOTTOM, 5: TRANSPOSE, 6: ROTATE_270,
# 7: TRANSVERSE, 8: ROTATE_90; each checked against Pillow in the tests).
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


class FastTrainTransform:
    """Training augmentation from a file path, decoding only as much as the crop needs.

    The random draws are train_transform's: torchvision's RandomResizedCrop.get_params on the
    upright image size, then the flip's coin, from torch's RNG in that order, so one seed picks
    the same crops and flips as the reference pipeline. What changes is the work per image:
      * a crop at least 2x (4x, 8x) the output size on both sides is decoded by libjpeg at
        1/2 (1/4, 1/8) scale (PIL draft mode, DCT scaling) and resized from there;
      * other JPEGs are decoded by torchvision.io.decode_jpeg (libjpeg-turbo) and cropped/
        resized as uint8 tensors (antialiased bilinear);
      * every path turns the image upright by the EXIF orientation as Pillow reads it (the
        default path's ImageOps.exif_transpose), so both paths see the same geometry for every
        orientation tag and for malformed tags (ignored by both);
      * with normalize=False the uint8 crop is returned and the training loop normalises
        whole batches on the device (Normalize): a quarter of the bytes to collate, pin and
        copy.
    Outputs differ from train_transform's by resampling detail only (mean |difference| about
    2e-4 in normalised units on hymenoptera photos, same crops and flips). Evaluation keeps
    eval_transform, which is pixel-identical to the reference.

    Args:
        img_size: output side in pixels.
        scale, ratio: RandomResizedCrop's area and aspect ranges (mmpretrain's defaults).
        normalize: False: return uint8 pixels; Normalize() of them is the float output.
    Call: path -> (3, img_size, img_size) float32 normalised tensor (uint8 with
        normalize=False).
    Raises:
        ImageReadError: the file cannot be read or decoded (the message names it).
    """

    def __init__(self, img_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), normalize: bool = True):
        self.img_size, self.scale, self.ratio = img_size, list(scale), list(ratio)
        self.normalize = Normalize() if normalize else None

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        with _reading(path):
            pixels = self._crop(path)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip(0.5)
            pixels = pixels.flip(-1)
        return self.normalize(pixels) if self.normalize else pixels

    def _crop(self, path) -> torch.Tensor:
        """(3, img_size, img_size) uint8 crop, drawing the RandomResizedCrop parameters."""
        from torchvision import transforms as T
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as TF

        size = self.img_size
        with open(path, "rb") as f:
            data = f.read()
        with _open_image(io.BytesIO(data)) as im:
            width, height = im.size
            # The orientation as Pillow reads it (ImageOps.exif_transpose, the default path's
            # rule), for every path below: torchvision's own EXIF parser can disagree.
            orientation = im.getexif().get(0x0112, 1)
            turn = _ORIENT.get(orientation) if isinstance(orientation, int) else None
            swapped = orientation in (5, 6, 7, 8)  # EXIF 90-degree turns
            up_w, up_h = (height, width) if swapped else (width, height)
            top, left, crop_h, crop_w = T.RandomResizedCrop.get_params(
                torch.empty(1, 1, 1).expand(1, up_h, up_w), self.scale, self.ratio)
            reduction = 1
            while reduction < 8 and min(crop_w, crop_h) >= 2 * reduction * size:
                reduction *= 2
            if reduction == 1 and im.format == "JPEG" and im.mode in ("RGB", "L"):
                image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                    mode=ImageReadMode.RGB)  # as stored: (3, height, width)
                image = turn(image) if turn else image  # upright: (3, up_h, up_w)
                return TF.resized_crop(image, top, left, crop_h, crop_w, [size, size],
                                       interpolation=T.InterpolationMode.BILINEAR,
                                       antialias=True)
            if reduction > 1:
                im.draft("RGB" if im.mode == "RGB" else None,
                         (math.ceil(width / reduction), math.ceil(height / reduction)))
            im.load()
            im = _upright_rgb(im, path)
        fx, fy = im.size[0] / up_w, im.size[1] / up_h  # decoded pixels per upright pixel
        box = (left * fx, top * fy, (left + crop_w) * fx, (top + crop_h) * fy)
        out = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return TF.pil_to_tensor(out)

