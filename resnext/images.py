"""Image files in, upright 8-bit RGB PIL images out: decoding (every Pillow mode), the one
folder listing predict.py, evaluate.py and train.py share, and the pixel limit.

Decoding follows mmpretrain's LoadImageFromFile as far as pixels go: EXIF orientation applied,
alpha dropped (OpenCV IMREAD_COLOR), 16-bit and float images scaled by their real range.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps

from .errors import ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "load_image", "to_rgb8", "list_images",
           "spread_evenly", "list_class_folders", "set_max_image_pixels",
           "pixel_limit_worker_init"]


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
                             f"pixels (width x height); resnext.images.set_max_image_pixels "
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


def spread_evenly(paths: list[Path], n: int) -> list[Path]:
    """n of `paths` taken evenly over the whole listing (list_images sorts by class folder, so
    every class gets its share); all of them when there are no more than n. Used to pick
    int8 calibration and check photos."""
    if len(paths) <= n:
        return list(paths)
    return [paths[i * len(paths) // n] for i in range(n)]


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


def _set_limit_in_worker(limit: int | None, worker_id: int) -> None:
    Image.MAX_IMAGE_PIXELS = limit


def pixel_limit_worker_init() -> Callable[[int], None]:
    """A DataLoader worker_init_fn that gives each worker this process's pixel limit:
    workers started with 'spawn' (macOS's and Windows' default) import Pillow afresh and
    would otherwise decode up to Pillow's default, whatever set_max_image_pixels said."""
    return functools.partial(_set_limit_in_worker, Image.MAX_IMAGE_PIXELS)


def set_max_image_pixels(n: int | None) -> None:
    """Set the largest image (width x height) that load_image decodes, for this process.

    Sets Pillow's Image.MAX_IMAGE_PIXELS (default 89,478,485), which guards against
    decompression bombs. Pillow only warns between the limit and twice the limit; load_image
    and FastTrainTransform refuse anything above it, and EvalTransform refuses a resize past
    it. DataLoader workers started with 'spawn' do not inherit the setting: the package's
    loaders pass pixel_limit_worker_init() as their worker_init_fn.

    Args:
        n: the limit in pixels; 0 or None removes it.
    Raises:
        ValueError: n is negative.
    """
    if n is not None and n < 0:
        raise ValueError(f"max image pixels must be >= 0 or None, got {n}")
    Image.MAX_IMAGE_PIXELS = n or None
