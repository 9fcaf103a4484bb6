"""Images in, tensors out: decoding, the shared transforms, datasets and the eval sampler.

One preprocessing for predict.py, evaluate.py and train.py's validation (mmpretrain
configs/_base_/datasets/imagenet_bs32_pil_resize.py): decode to RGB with EXIF orientation
applied, resize the short side to 256 with PIL bilinear, centre crop 224, normalise with the
ImageNet mean/std. Training: RandomResizedCrop 224 (area 0.08-1, ratio 3/4-4/3) and a
horizontal flip.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageReadError", "load_image",
    "Preprocessing", "EvalTransform", "Normalize", "eval_transform", "train_transform",
    "imagenet_wnids", "imagenet_class_names",
    "ClassFolderDataset", "AnnotationFileDataset", "UnpaddedDistributedSampler",
    "folder_class_mapping", "build_dataset", "FastTrainTransform",
    "to_rgb8", "list_images", "list_class_folders", "set_max_image_pixels",
    "SeededAugmentation", "EpochTaggedSampler", "sample_seed",
]

# mmpretrain's mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) on the 0-255
# scale, divided by 255: identical to torchvision's ImageNet constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _decodable_extensions() -> tuple[str, ...]:
    """Lower-case extensions of every format this Pillow build can open and decode by itself."""
    from PIL import ImageFile
    Image.init()  # registers all plugins, not only the common ones Image.open preloads
    # Registered but not decodable here: EPS/PS need Ghostscript, MPEG is identify-only (no
    # pixels), PDF/PALM are write-only; stubs (GRIB, HDF5, BUFR, WMF) need a user handler.
    # MPO files open through the JPEG plugin, so they are decodable without an OPEN entry.
    stubs = {fmt for fmt, (factory, _) in Image.OPEN.items()
             if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)}
    openable = (set(Image.OPEN) | {"MPO"}) - stubs - {"EPS", "MPEG"}
    return tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items()
                        if fmt in openable))


# Every extension Pillow decodes (.jpg, .png, .gif, .webp, .tif, .bmp, ...; a superset of
# torchvision's IMG_EXTENSIONS), matched case-insensitively.
IMAGE_EXTENSIONS = _decodable_extensions()
# Validation resizes the short side to img_size / 0.875 (256 for 224) before the centre crop.
CROP_FRACTION = 0.875


class ImageReadError(ValueError):
    """An image file is missing, empty, truncated or not an image; the message names it."""

    def __init__(self, message: str = ""):
        # A DataLoader re-raises a worker's exception as ImageReadError("Caught ImageReadError
        # in DataLoader worker process N. Original Traceback ... ImageReadError: <message>"):
        # keep the one line that names the file.
        if isinstance(message, str) and message.startswith("Caught ImageReadError"):
            message = message.rstrip().splitlines()[-1].split("ImageReadError: ", 1)[-1]
        super().__init__(message)


@contextlib.contextmanager
def _reading(path: str | os.PathLike):
    """Turn any failure to read or decode `path` into an ImageReadError that names it."""
    try:
        yield
    except ImageReadError:
        raise  # already names the file (e.g. to_rgb8 refusing a range)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(f"{path}: image larger than the limit of {Image.MAX_IMAGE_PIXELS} "
                             f"pixels (width x height); resnext.data.set_max_image_pixels "
                             f"raises or removes the limit") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ImageReadError(f"{path}: empty file") from None
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _open_image(fp) -> Image.Image:
    """Image.open with Pillow's decompression-bomb warning (between MAX_IMAGE_PIXELS and twice
    that) raised as an error, so that the pixel limit is the limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(fp)


def to_rgb8(im: Image.Image, path: str | os.PathLike | None = None) -> Image.Image:
    """Any Pillow image as 8-bit RGB, scaled by the real range of its mode, never saturated.

    Rules, by mode:
      * RGB: returned as is. L, 1 (0/255), CMYK, YCbCr, LAB, HSV, RGBX: Pillow's conversion.
      * Alpha (RGBA, LA, PA, P with transparency, premultiplied RGBa/La): alpha dropped, colour
        kept, as OpenCV's IMREAD_COLOR does in mmpretrain.
      * I;16, I;16L, I;16B, I;16N (16-bit): round(v / 257), so 65535 -> 255 and 257 * k -> k.
      * I (32-bit signed): read as 16-bit samples, like I;16. Pillow uses I for 16-bit PNG,
        PGM and TIFF data in some versions, and the 16-bit scale is fixed, never guessed
        from the image's maximum, so a dark 16-bit photo stays dark. Values below 0 or above
        65535 have no known scale: refused.
      * F (32-bit float): values in [0, 1] -> round(255 * v). Anything else (0-255 floats,
        other ranges, NaN, infinity) has no known scale: refused.
    Multi-frame files (GIF, APNG, WebP, multi-page TIFF) give their first frame, the one
    Image.open loads.

    Args:
        im: a decoded (or lazily opened) Pillow image, any mode.
        path: the file it came from, for error messages (default im.filename).
    Returns:
        An RGB image of the same size (`im` itself when already RGB).
    Raises:
        ImageReadError: naming the file and mode, for an I or F image outside the ranges
            above (the message gives the range found), or a mode Pillow cannot convert.
    """
    name = path if path is not None else (getattr(im, "filename", "") or "<image>")
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):
        im, mode = im.convert("I"), "I"
    if mode == "I":
        low, high = im.getextrema()
        if low < 0 or high > 65535:
            raise ImageReadError(f"{name}: mode I (32-bit integer) values {low}..{high} are "
                                 f"outside the 16-bit range 0..65535; their scale is unknown")
        # point() on I computes v / 257 + 0.5 in double and truncates: round(v / 257).
        return im.point(lambda v: v / 257 + 0.5).convert("L").convert("RGB")
    if mode == "F":
        # getextrema() misses NaN unless it comes first: check every value.
        values = torch.frombuffer(bytearray(im.tobytes("raw", "F")), dtype=torch.float32)
        finite = values[values.isfinite()]
        if finite.numel() < values.numel() or (
                values.numel() and (finite.min() < 0 or finite.max() > 1)):
            found = (f"{finite.min().item():g}..{finite.max().item():g}" if finite.numel()
                     else "none finite")
            nonfinite = values.numel() - finite.numel()
            found += f", {nonfinite} NaN/infinite" if nonfinite else ""
            raise ImageReadError(f"{name}: mode F (32-bit float) values must lie in [0, 1] "
                                 f"to be read as intensities; found {found}")
        return im.point(lambda v: v * 255 + 0.5).convert("L").convert("RGB")  # F->L truncates
    if (mode == "P" and "transparency" in im.info) or mode in ("RGBa", "La"):
        # Palette transparency: Pillow's advice is to go through RGBA. Premultiplied alpha:
        # un-premultiply first, so that colour is kept.
        im = im.convert("LA" if mode == "La" else "RGBA")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageReadError(f"{name}: cannot convert mode {im.mode} to RGB ({e})") from None


def _upright_rgb(im: Image.Image, path: str | os.PathLike | None = None) -> Image.Image:
    """A decoded image, EXIF orientation applied, as 8-bit RGB by to_rgb8's rules."""
    ImageOps.exif_transpose(im, in_place=True)
    return to_rgb8(im, path)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image, EXIF orientation applied.

    Every Pillow mode is converted by its real range (see to_rgb8): 16-bit and [0, 1] float
    images are scaled, never saturated; alpha is dropped (as OpenCV's IMREAD_COLOR does in
    mmpretrain). Multi-frame files give their first frame. Images above the pixel limit
    (Pillow's MAX_IMAGE_PIXELS, see set_max_image_pixels) are refused before decoding.

    Args:
        path: the image file.
    Returns:
        An RGB image, upright.
    Raises:
        ImageReadError: naming the path, when the file is missing, empty, not an image,
            truncated, over the pixel limit, or an I/F image whose range has no known scale.
    """
    with _reading(path):
        im = _open_image(path)
        try:
            im.load()  # decode now, so truncation errors surface here; frees the file handle
            rgb = _upright_rgb(im, path)
        except BaseException:
            im.close()
            raise
        if rgb is im and getattr(im, "is_animated", False):
            rgb = im.copy()
        if rgb is not im:
            im.close()  # multi-frame formats (GIF, APNG, TIFF) keep the file open for seek()
        return rgb


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
        ValueError: non-positive sizes, resize_size < crop_size, unknown interpolation.
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
            raise ValueError(f"preprocessing needs integer sizes with resize_size >= crop_size "
                             f">= 1, got crop {self.crop_size!r}, resize {self.resize_size!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got "
                             f"{self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")

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
            ValueError: the stored values are malformed.
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
        ValueError: see Preprocessing.
    """
    return Preprocessing(img_size, resize_size).transform()


def train_transform(img_size: int = 224) -> Callable:
    """Training augmentation (mmpretrain imagenet_bs32_pil_resize train pipeline): PIL RGB
    image -> (3, img_size, img_size) float32 normalised tensor, random crop and flip."""
    from torchvision import transforms as T  # only training needs torchvision's transforms

    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class FastTrainTransform:
    """Training augmentation from a file path, decoding only as much as the crop needs.

    The random draws are train_transform's: torchvision's RandomResizedCrop.get_params on the
    upright image size, then the flip's coin, from torch's RNG in that order, so one seed picks
    the same crops and flips as the reference pipeline. What changes is the work per image:
      * a crop at least 2x (4x, 8x) the output size on both sides is decoded by libjpeg at
        1/2 (1/4, 1/8) scale (PIL draft mode, DCT scaling) and resized from there;
      * other JPEGs are decoded by torchvision.io.decode_jpeg (libjpeg-turbo, EXIF applied)
        and cropped/resized as uint8 tensors (antialiased bilinear);
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
            swapped = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF 90-degree turns
            up_w, up_h = (height, width) if swapped else (width, height)
            top, left, crop_h, crop_w = T.RandomResizedCrop.get_params(
                torch.empty(1, 1, 1).expand(1, up_h, up_w), self.scale, self.ratio)
            reduction = 1
            while reduction < 8 and min(crop_w, crop_h) >= 2 * reduction * size:
                reduction *= 2
            if reduction == 1 and im.format == "JPEG" and im.mode in ("RGB", "L"):
                image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                    mode=ImageReadMode.RGB, apply_exif_orientation=True)
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


@functools.lru_cache(maxsize=1)
def _imagenet_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files("resnext").joinpath("imagenet1k.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    assert [int(r[0]) for r in rows] == list(range(1000)), "imagenet1k.tsv is corrupt"
    return tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order ('n01440764' is 0)."""
    return list(_imagenet_table()[0])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k short class names in index order ('tench', 'goldfish', ...)."""
    return list(_imagenet_table()[1])


def list_images(folder: str | os.PathLike, skipped: Counter | None = None) -> list[Path]:
    """Image files under `folder`, recursively: the one listing predict, evaluate and train use.

    Rules (list_class_folders applies the same ones inside each class folder):
      * links to files and folders are followed, also out of `folder` (the user's own links,
        as torchvision's ImageFolder follows them); a real folder is entered at most once,
        so link loops end;
      * hidden entries (names starting with '.': .ipynb_checkpoints, .git, macOS ._x.jpg
        companions) are skipped, folders with everything inside them;
      * files with an extension in IMAGE_EXTENSIONS (any case) are listed, others skipped;
      * order: sorted by (folder relative to `folder`, file name), as ImageFolder sorts.

    Args:
        folder: the folder to list.
        skipped: if given, a Counter that gets one count per skipped entry, by reason:
            'hidden', 'not an image' (other extension, or not a regular file), 'broken link',
            'link loop' (a link to a folder being listed), 'folder already listed' (a second
            link to one folder), 'unreadable' (a sub-folder that cannot be opened).
    Returns:
        Paths under `folder` as reached (links not resolved), so they read like the input.
    Raises:
        FileNotFoundError, NotADirectoryError, PermissionError: `folder` itself cannot be
            listed.
    """
    skipped = Counter() if skipped is None else skipped
    root = Path(folder)
    root_stat = os.stat(root)
    found: list[tuple[str, str, Path]] = []  # (relative folder, name, path): the sort key
    visited: set[tuple[int, int]] = set()
    # Depth-first in sorted order (a stack, so deep trees need no recursion); a folder is
    # marked when entered, so the first link to reach it (in that order) lists it.
    stack = [(root, "", (root_stat.st_dev, root_stat.st_ino), frozenset())]
    while stack:
        path, rel, key, ancestors = stack.pop()
        if key in ancestors:
            skipped["link loop"] += 1
            continue
        if key in visited:
            skipped["folder already listed"] += 1
            continue
        visited.add(key)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            if path is root:
                raise
            skipped["unreadable"] += 1
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                skipped["hidden"] += 1
            elif entry.is_dir():  # follows links; False for a broken one
                st = entry.stat()
                subfolders.append((Path(entry.path), os.path.join(rel, entry.name),
                                   (st.st_dev, st.st_ino), ancestors | {key}))
            elif entry.is_file():
                if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append((rel, entry.name, Path(entry.path)))
                else:
                    skipped["not an image"] += 1
            elif entry.is_symlink():  # its target is missing (or a loop of links)
                skipped["broken link"] += 1
            else:  # socket, FIFO, device
                skipped["not an image"] += 1
        stack.extend(reversed(subfolders))
    found.sort(key=lambda item: item[:2])
    return [path for _, _, path in found]



def _class_folders(root: str | os.PathLike, skipped: Counter | None = None) -> dict[str, Path]:
    """Class folder name -> path: the sub-folders of `root` by list_images' rules (links
    followed, hidden ones skipped), sorted by name. Files directly in `root` are skipped."""
    skipped = Counter() if skipped is None else skipped
    folders = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            skipped["hidden"] += 1
        elif entry.is_dir():
            folders[entry.name] = Path(entry.path)
        elif entry.is_symlink() and not entry.is_file():
            skipped["broken link"] += 1
        else:
            skipped["not in a class folder"] += 1
    return folders


def list_class_folders(root: str | os.PathLike,
                       skipped: Counter | None = None) -> dict[str, list[Path]]:
    """Images of each class folder `root/<class>/...`, by list_images' rules.

    Class folders are the sub-folders of `root` (links followed, hidden ones such as
    .ipynb_checkpoints skipped); each is listed recursively with list_images.

    Args:
        root: folder holding one sub-folder per class.
        skipped: if given, a Counter of skipped entries by reason, as list_images fills it,
            plus 'not in a class folder' for files directly in `root`.
    Returns:
        Class name -> sorted image paths, classes in sorted order; an empty class folder
        maps to [].
    Raises:
        FileNotFoundError, NotADirectoryError, PermissionError: `root` cannot be listed.
    """
    skipped = Counter() if skipped is None else skipped
    return {name: list_images(path, skipped)
            for name, path in _class_folders(root, skipped).items()}


def set_max_image_pixels(n: int | None) -> None:
    """Set the largest image (width x height) that load_image decodes, for this process.

    Sets Pillow's Image.MAX_IMAGE_PIXELS (default 89,478,485), which guards against
    decompression bombs. Pillow only warns between the limit and twice the limit; load_image
    and FastTrainTransform refuse anything above it. DataLoader workers started with 'spawn'
    do not inherit the setting: call this in their worker_init_fn too.

    Args:
        n: the limit in pixels; 0 or None removes it.
    Raises:
        ValueError: n is negative.
    """
    if n is not None and n < 0:
        raise ValueError(f"max image pixels must be >= 0 or None, got {n}")
    Image.MAX_IMAGE_PIXELS = n or None


class _LabelledImages(Dataset):
    """(transform(loader(path)), label) for each of `samples`, a list of (path, label)."""

    samples: list[tuple[str, int]]
    loader: Callable
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform else image), label


class ClassFolderDataset(_LabelledImages):
    """`root/<class>/<image>` layout (torchvision ImageFolder's) with a chosen label mapping.

    Folders and images are found by list_class_folders (links followed, hidden entries
    skipped, every Pillow extension); samples are ordered as ImageFolder orders them (class
    name, then path). Empty classes are allowed: evaluation counts what is there, and
    training can check `empty_classes`.

    Args:
        root: folder whose sub-folders are classes.
        transform: applied to the RGB PIL image (see eval_transform / train_transform).
        class_to_idx: folder name -> label; default the sorted folder order. Folders not in
            the mapping are ignored; mapped classes without a folder are empty.
        loader: path -> image (default load_image); FastTrainTransform-style pipelines pass
            `str` here and do the decoding in `transform`.
    Attributes:
        classes: class names in label order. class_to_idx: name -> label.
        samples (alias imgs): [(path str, label), ...]. targets: the labels.
        empty_classes: mapped class names with no image. skipped: Counter of skipped entries
            by reason (see list_images).
    Items are (transform(loader(path)), label).
    Raises:
        FileNotFoundError, NotADirectoryError: root is not a folder.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, loader: Callable = load_image):
        self.root = str(root)
        self.transform = transform
        self.loader = loader
        self.skipped: Counter = Counter()
        images = list_class_folders(root, self.skipped)
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(images)}
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.samples = [(str(path), self.class_to_idx[name])
                        for name in sorted(self.class_to_idx) for path in images.get(name, [])]
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]
        self.empty_classes = [name for name in self.classes if not images.get(name)]


class AnnotationFileDataset(_LabelledImages):
    """mmpretrain's annotation-file layout: lines `relative/path label`, paths under root.

    Args:
        root: folder the paths are relative to (mmpretrain's data_prefix).
        ann_file: text file, one `path label` per line (e.g. meta/val.txt of ImageNet).
        transform: applied to the RGB PIL image.
        classes: optional class names (len must exceed every label).
        loader: path -> image, as for ClassFolderDataset.
    Raises:
        ValueError: naming the file and line, for a malformed line, a negative label or a
            path that leaves root.
        FileNotFoundError: ann_file does not exist.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Callable | None = None, classes: Sequence[str] | None = None,
                 loader: Callable = load_image):
        self.root = Path(root)
        self.transform = transform
        self.loader = loader
        self.samples: list[tuple[str, int]] = []
        with open(ann_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().rsplit(maxsplit=1)
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise ValueError(f"{ann_file}:{lineno}: expected 'relative/path label', "
                                     f"got {line.strip()!r}")
                rel, label = parts[0], int(parts[1])
                path = self.root / rel
                # Lexically inside root: '..' may not leave it, but links inside it are the
                # user's own and are followed (as list_images does).
                inside = not os.path.normpath(rel).startswith(("..", os.sep))
                if label < 0 or not inside:
                    raise ValueError(f"{ann_file}:{lineno}: label must be >= 0 and the path "
                                     f"inside {self.root}, got {line.strip()!r}")
                self.samples.append((str(path), label))
        if not self.samples:
            raise ValueError(f"{ann_file}: no annotations")
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes) if classes is not None else None


class UnpaddedDistributedSampler(Sampler[int]):
    """Shards indices 0..N-1 over ranks without padding (rank r gets r, r+W, r+2W, ...), so
    every image is evaluated exactly once; shard sizes may differ by one."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


_LAYOUT_HELP = (
    "Expected either (a) class folders, root/<class>/<image> (ImageNet val sorted into wnid "
    "folders such as root/n01440764/ILSVRC2012_val_00000293.JPEG, or any ImageFolder), or "
    "(b) mmpretrain's layout: a folder of images plus an annotation file of "
    "'relative/path label' lines (e.g. --ann-file meta/val.txt), paths relative to the folder.")


def folder_class_mapping(root: str | os.PathLike, class_names: Sequence[str] | None = None,
                         num_classes: int | None = None) -> dict[str, int]:
    """Label of each class folder under `root`, for evaluating a given model.

    In order: folders that are all among the model's class names get those names' indices
    (whatever their sort order: a model from train.py); ImageNet wnid folders (n01440764, ...)
    get their ImageNet-1k index, for a 1000-class model (a subset of the 1000 folders keeps the
    released indices); a model without class names gets the sorted folder order (ImageFolder).

    Args:
        root: folder holding one sub-folder per class.
        class_names: the model's class names, if known.
        num_classes: the model's number of outputs, if known.
    Returns:
        folder name -> label.
    Raises:
        ValueError: no class folders (a flat folder: the message explains both layouts), or
            folders that match neither the class names nor the wnids (listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder. {_LAYOUT_HELP}")
    folders = list(_class_folders(root))  # sorted; the folders ClassFolderDataset reads
    if not folders:
        raise ValueError(f"{root}: no class folders found (a flat folder of images needs an "
                         f"annotation file). {_LAYOUT_HELP}")
    if class_names is not None and all(f in class_names for f in folders):
        return {f: list(class_names).index(f) for f in folders}
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    n = len(class_names) if class_names is not None else num_classes
    if all(f in wnid_index for f in folders) and n in (None, 1000):
        return {f: wnid_index[f] for f in folders}
    if class_names is None:
        if num_classes is not None and len(folders) > num_classes:
            raise ValueError(f"{root}: {len(folders)} class folders but the model has only "
                             f"{num_classes} classes")
        return {f: i for i, f in enumerate(folders)}
    preview = ", ".join(map(repr, list(class_names)[:5]))
    preview += ", ..." if len(class_names) > 5 else ""
    unknown = [f for f in folders if f not in class_names and f not in wnid_index]
    if not unknown:  # ImageNet wnid folders, but the model is not a 1000-class one
        missing = [f for f in folders if f not in class_names]
        raise ValueError(f"{root}: class folders {missing} are ImageNet-1k wnids, but the model "
                         f"has {len(class_names)} classes ({preview}), not ImageNet's 1000")
    raise ValueError(f"{root}: class folders {unknown} match neither the model's "
                     f"{len(class_names)} class names ({preview}) nor ImageNet-1k wnids")


def build_dataset(root: str | os.PathLike, ann_file: str | os.PathLike | None = None,
                  transform: Callable | None = None, class_names: Sequence[str] | None = None,
                  num_classes: int | None = None, loader: Callable = load_image) -> Dataset:
    """The dataset for a folder, in either supported layout (see folder_class_mapping).

    Args:
        root: the class-folder root, or with ann_file the folder the annotation paths are
            relative to.
        ann_file: mmpretrain annotation file ('relative/path label' lines), or None.
        transform: applied to each RGB PIL image.
        class_names, num_classes: the model's, to map folders to its labels.
        loader: path -> image (default load_image; `str` for FastTrainTransform).
    Returns:
        A dataset of (tensor, label) with `samples` [(path, label), ...].
    Raises:
        ValueError: see folder_class_mapping and AnnotationFileDataset.
    """
    if ann_file is not None:
        return AnnotationFileDataset(root, ann_file, transform, classes=class_names,
                                     loader=loader)
    mapping = folder_class_mapping(root, class_names, num_classes)
    return ClassFolderDataset(root, transform, class_to_idx=mapping, loader=loader)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation.

    Args:
        seed: the run's --seed; epoch: 0-based epoch; index: the sample's dataset index.
    Returns:
        A fixed mix of the three in [0, 2**63), distinct for distinct (epoch, index) pairs of
        any realistic run (index < 2**31).
    """
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index & (2**63 - 1)


class SeededAugmentation(Dataset):
    """Training samples whose random augmentation depends only on (seed, epoch, index).

    Indexed by (epoch, index) pairs (from EpochTaggedSampler): torch's and Python's RNGs
    are seeded with sample_seed(seed, epoch, index) before the sample is loaded, so the crop
    and flip of every image are the same whichever worker process draws it, however many
    workers there are, and after a resume; loader workers can therefore live across epochs.

    Args:
        dataset: a map-style dataset whose transform draws from torch's (or Python's) RNG.
        seed: the run's --seed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        torch.manual_seed(seed)
        random.seed(seed)
        return self.dataset[index]


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler (DistributedSampler) to yield (epoch, index) pairs for
    SeededAugmentation; set_epoch reaches the wrapped sampler too."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
