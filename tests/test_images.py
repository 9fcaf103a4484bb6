"""Images and folders as people have them: every Pillow mode and bit depth, links, hidden
files, every extension, large images (issue 12). Expected pixels come from Pillow's own
conversion of the 8-bit photo; expected listings are written out from the fabricated trees."""
import shutil
import sys
from collections import Counter

import pytest
import torch
from PIL import Image, ImageChops, ImageStat

from resnext.datasets import ClassFolderDataset, folder_class_mapping
from resnext.errors import ImageReadError
from resnext.images import (IMAGE_EXTENSIONS, list_class_folders, list_images, load_image,
                            set_max_image_pixels, to_rgb8)
from resnext.transforms import FastTrainTransform
from conftest import DEMO, HYMENOPTERA, count_files

BIRD = DEMO / "bird.JPEG"
VAL = HYMENOPTERA / "val"


@pytest.fixture(scope="module")
def bird():
    with Image.open(BIRD) as im:
        return im.convert("RGB")


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return max(ImageStat.Stat(ImageChops.difference(a, b)).mean)


def _max_abs(a: Image.Image, b: Image.Image) -> int:
    return max(high for _, high in ImageChops.difference(a, b).getextrema())


def _sixteen_bit(grey: Image.Image, factor: int = 257) -> Image.Image:
    """Mode I with each 8-bit value times `factor` (257: the same photo at 16-bit depth)."""
    return grey.convert("I").point(lambda v: v * factor)


def _i16(image_i: Image.Image, mode: str) -> Image.Image:
    """An I image (values < 65536) in one of Pillow's 16-bit modes, built from its raw bytes:
    Pillow's own I;16 -> I;16B conversion clips to 255, so it cannot make them."""
    little = image_i.convert("I;16").tobytes()  # I;16 is little-endian
    big = b"".join(little[i + 1:i + 2] + little[i:i + 1] for i in range(0, len(little), 2))
    raw = {"I;16": little, "I;16L": little, "I;16B": big,
           "I;16N": little if sys.byteorder == "little" else big}[mode]
    return Image.frombytes(mode, image_i.size, raw)


# --- bit depth and float images -----------------------------------------------------------

def test_16bit_png_equals_the_8bit_photo(tmp_path, bird):
    grey = bird.convert("L")
    _sixteen_bit(grey).convert("I;16").save(tmp_path / "bird16.png")
    with Image.open(tmp_path / "bird16.png") as im:
        assert im.mode in ("I;16", "I")  # which one depends on the Pillow version
        assert im.getextrema()[1] > 255  # really 16-bit data
        # What a plain .convert("RGB") makes of it: a few grey levels (the bug).
        assert sum(1 for c in im.convert("RGB").convert("L").histogram() if c) <= 2
    got = load_image(tmp_path / "bird16.png")
    assert got.mode == "RGB" and got.size == bird.size
    assert got.tobytes() == grey.convert("RGB").tobytes()
    # EXIF orientation is applied to 16-bit images too.
    exif = Image.Exif()
    exif[0x0112] = 6
    _sixteen_bit(grey).convert("I;16").transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "rotated16.png", exif=exif)
    assert load_image(tmp_path / "rotated16.png").tobytes() == grey.convert("RGB").tobytes()
    # Training decodes through the same conversion: same crop of the same pixels.
    grey.save(tmp_path / "bird8.png")
    fast = FastTrainTransform(32)
    torch.manual_seed(0)
    from_16bit = fast(tmp_path / "bird16.png")
    torch.manual_seed(0)
    assert torch.equal(from_16bit, fast(tmp_path / "bird8.png"))


@pytest.mark.parametrize("mode", ["I", "I;16", "I;16L", "I;16B", "I;16N"])
def test_16bit_values_round_to_8bit(mode):
    ramp = Image.new("I", (256, 256))
    ramp.putdata(range(65536))
    image = ramp if mode == "I" else _i16(ramp, mode)
    assert image.mode == mode and image.getpixel((255, 255)) == 65535
    got = to_rgb8(image)
    assert got.mode == "RGB"
    expected = bytes(round(v / 257) for v in range(65536))
    assert got.convert("L").tobytes() == expected
    r, g, b = got.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()


def test_32bit_int_tiff_is_read_as_16bit(tmp_path, bird):
    grey = bird.convert("L")
    _sixteen_bit(grey).save(tmp_path / "bird_i32.tif")
    with Image.open(tmp_path / "bird_i32.tif") as im:
        assert im.mode == "I"
    assert load_image(tmp_path / "bird_i32.tif").tobytes() == grey.convert("RGB").tobytes()
    # A dark 16-bit photo stays dark: the scale is fixed, not stretched to the maximum.
    _sixteen_bit(grey, factor=16).save(tmp_path / "dark.tif")
    dark = load_image(tmp_path / "dark.tif").convert("L")
    assert dark.getextrema() == (0, round(255 * 16 / 257))
    # Outside 0..65535 there is no known scale: refused, naming the file and mode.
    _sixteen_bit(grey, factor=1000).save(tmp_path / "wide.tif")
    with pytest.raises(ImageReadError, match=r"wide\.tif: mode I .*0\.\.255000"):
        load_image(tmp_path / "wide.tif")
    negative = _sixteen_bit(grey).point(lambda v: v - 100)
    with pytest.raises(ImageReadError, match=r"neg\.tif: mode I .*-100\.\."):
        to_rgb8(negative, "neg.tif")


def test_float_tiff_in_unit_range_equals_the_8bit_photo(tmp_path, bird):
    grey = bird.convert("L")
    grey.convert("F").point(lambda v: v / 255).save(tmp_path / "unit.tif")
    with Image.open(tmp_path / "unit.tif") as im:
        assert im.mode == "F" and im.getextrema()[1] <= 1
    got = load_image(tmp_path / "unit.tif")
    assert got.mode == "RGB"
    assert _max_abs(got, grey.convert("RGB")) <= 1


def test_float_images_without_a_known_scale_are_refused(tmp_path, bird):
    bird.convert("L").convert("F").save(tmp_path / "float255.tif")  # 0..255 floats
    with pytest.raises(ImageReadError, match=r"float255\.tif: mode F .*found 0\.\.255"):
        load_image(tmp_path / "float255.tif")
    nan = Image.new("F", (4, 4), 0.5)
    nan.putpixel((3, 3), float("nan"))  # last, where getextrema() would not see it
    with pytest.raises(ImageReadError, match=r"nan\.tif: mode F .*1 NaN"):
        to_rgb8(nan, "nan.tif")


def _every_mode(bird: Image.Image) -> dict[str, tuple[Image.Image, Image.Image]]:
    """mode -> (the photo in that mode, what its RGB conversion should be close to)."""
    grey = bird.convert("L")
    sixteen = _sixteen_bit(grey)
    colour = {m: bird.convert(m) for m in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                           "LAB", "HSV")}
    images = {m: (im, bird) for m, im in colour.items()}
    palette = bird.quantize(256)  # adaptive palette: close to the photo
    images.update({"P": (palette, bird), "PA": (palette.convert("PA"), bird)})
    images.update({m: (im, grey.convert("RGB")) for m, im in {
        "1": bird.convert("1"), "L": grey, "LA": bird.convert("LA"),
        "La": bird.convert("LA").convert("La"), "I": sixteen,
        "I;16": _i16(sixteen, "I;16"), "I;16L": _i16(sixteen, "I;16L"),
        "I;16B": _i16(sixteen, "I;16B"), "I;16N": _i16(sixteen, "I;16N"),
        "F": grey.convert("F").point(lambda v: v / 255)}.items()})
    return images


def test_every_mode_gives_rgb_without_saturating(bird):
    images = _every_mode(bird)
    assert set(images) >= {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr",
                           "LAB", "HSV", "I", "I;16", "I;16B", "F"}
    for mode, (image, expected) in images.items():
        assert image.mode == mode
        got = to_rgb8(image)
        assert got.mode == "RGB" and got.size == bird.size, mode
        levels = got.convert("L").histogram()
        n = sum(levels)
        assert levels[0] < 0.9 * n and levels[255] < 0.9 * n, mode
        if mode == "1":  # two levels by nature: black and white, both present
            assert sum(1 for c in levels if c) == 2 and got.getextrema()[0] == (0, 255)
            continue
        assert sum(1 for c in levels if c) > 50, mode
        # Close to the 8-bit photo (colour-space round trips and a 256-colour palette cost a
        # few levels; the saturated failure modes are off by ~100).
        assert _mean_abs(got, expected) < 4, mode


def test_palette_transparency_and_first_frame(tmp_path, bird):
    # A palette PNG with a transparent index keeps its colours (alpha dropped).
    pal = bird.quantize(64)
    pal.save(tmp_path / "transparent.png", transparency=0)
    with Image.open(tmp_path / "transparent.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    assert _mean_abs(load_image(tmp_path / "transparent.png"), pal.convert("RGB")) == 0
    # Multi-frame files give their first frame.
    first, second = bird.quantize(256), bird.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    first.save(tmp_path / "two.gif", save_all=True, append_images=[second.quantize(256)])
    with Image.open(tmp_path / "two.gif") as im:
        assert im.n_frames == 2
    got = load_image(tmp_path / "two.gif")
    assert _mean_abs(got, first.convert("RGB")) < 1
    assert _mean_abs(got, second) > 20


# --- pixel limit --------------------------------------------------------------------------

@pytest.fixture
def restore_pixel_limit():
    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


def test_pixel_limit_is_the_limit(tmp_path, restore_pixel_limit):
    Image.new("RGB", (100, 50), (10, 200, 30)).save(tmp_path / "big.png")  # 5000 pixels
    # Between the limit and twice it Pillow would only warn: refused all the same.
    for limit in (4000, 1000):
        set_max_image_pixels(limit)
        with pytest.raises(ImageReadError, match=rf"big\.png: .*limit of {limit} pixels"):
            load_image(tmp_path / "big.png")
        with pytest.raises(ImageReadError, match=rf"big\.png: .*limit of {limit} pixels"):
            FastTrainTransform(16)(tmp_path / "big.png")
    set_max_image_pixels(5000)
    assert load_image(tmp_path / "big.png").getpixel((0, 0)) == (10, 200, 30)
    for no_limit in (0, None):
        set_max_image_pixels(no_limit)
        assert Image.MAX_IMAGE_PIXELS is None
        assert load_image(tmp_path / "big.png").size == (100, 50)
    with pytest.raises(ValueError):
        set_max_image_pixels(-1)


# --- folder listing -----------------------------------------------------------------------

def test_image_extensions():
    assert IMAGE_EXTENSIONS == tuple(sorted(IMAGE_EXTENSIONS))
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    # torchvision's list, plus GIF; not formats Pillow cannot decode alone, nor documents.
    assert {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
            ".gif"} <= set(IMAGE_EXTENSIONS)
    assert not {".pdf", ".eps", ".ps", ".mpg", ".h5", ".txt"} & set(IMAGE_EXTENSIONS)


@pytest.fixture
def photo_tree(tmp_path, bird):
    """photos/ with every case of the listing rules; `outside/` is reached through links."""
    root, outside = tmp_path / "photos", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (outside / "more").mkdir(parents=True)
    shutil.copy(BIRD, root / "a.jpg")
    shutil.copy(BIRD, root / "B.JPEG")
    bird.save(root / "c.Png")
    bird.quantize(64).save(root / "d.GIF")
    bird.save(root / "e.webp")
    shutil.copy(BIRD, root / "sub" / "f.jpg")
    shutil.copy(BIRD, outside / "g.jpg")
    shutil.copy(BIRD, outside / "more" / "h.jpg")
    (root / "notes.txt").write_text("not an image")
    shutil.copy(BIRD, root / ".hidden.jpg")
    (root / "._a.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS companion
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(BIRD, root / ".ipynb_checkpoints" / "x.jpg")
    (root / "linked_file.jpg").symlink_to(outside / "g.jpg")
    (root / "linked_dir").symlink_to(outside / "more", target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub" / "same_dir").symlink_to(outside / "more", target_is_directory=True)
    (root / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    return root


def test_list_images_rules(photo_tree):
    skipped = Counter()
    found = list_images(photo_tree, skipped)
    # Sorted by (folder, name), names by code point as sorted() does (upper case first).
    expected = ["B.JPEG", "a.jpg", "c.Png", "d.GIF", "e.webp", "linked_file.jpg",
                "linked_dir/h.jpg", "sub/f.jpg"]
    assert [p.relative_to(photo_tree).as_posix() for p in found] == expected
    assert all(p.is_file() for p in found)
    assert skipped == Counter({"hidden": 3, "not an image": 1, "broken link": 1,
                               "link loop": 1, "folder already listed": 1})
    # Every listed path decodes; the listing is the same without a counter and by the old name.
    assert all(load_image(p).mode == "RGB" for p in found)
    assert list_images(photo_tree) == found


def test_list_images_deep_loop_lists_each_image_once(tmp_path):
    deep = tmp_path / "dir"
    (deep / "sub").mkdir(parents=True)
    shutil.copy(BIRD, deep / "x.jpg")
    shutil.copy(BIRD, deep / "sub" / "y.jpg")
    (deep / "sub" / "loop").symlink_to(deep, target_is_directory=True)
    (deep / "sub" / "up").symlink_to(deep / "sub", target_is_directory=True)
    skipped = Counter()
    found = list_images(deep, skipped)
    assert [p.relative_to(deep).as_posix() for p in found] == ["x.jpg", "sub/y.jpg"]
    assert skipped == Counter({"link loop": 2})


def test_list_class_folders(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    for d in (root / "ants" / "nested", root / "bees", root / ".ipynb_checkpoints",
              outside):
        d.mkdir(parents=True)
    ants = sorted((VAL / "ants").iterdir())[:2]
    shutil.copy(ants[0], root / "ants" / ants[0].name)
    shutil.copy(ants[1], root / "ants" / "nested" / ants[1].name)
    shutil.copy(BIRD, root / ".ipynb_checkpoints" / "x.jpg")
    shutil.copy(BIRD, outside / "w.jpg")
    (root / "wasps").symlink_to(outside, target_is_directory=True)  # a linked class folder
    shutil.copy(BIRD, root / "stray.jpg")
    skipped = Counter()
    classes = list_class_folders(root, skipped)
    assert list(classes) == ["ants", "bees", "wasps"]
    assert classes["ants"] == [root / "ants" / ants[0].name,
                               root / "ants" / "nested" / ants[1].name]
    assert classes["bees"] == []
    assert classes["wasps"] == [root / "wasps" / "w.jpg"]
    assert skipped == Counter({"hidden": 1, "not in a class folder": 1})

    # The dataset and the folder mapping see the same folders; an empty class is no error.
    assert folder_class_mapping(root) == {"ants": 0, "bees": 1, "wasps": 2}
    ds = ClassFolderDataset(root, transform=lambda im: im.size)
    assert ds.classes == ["ants", "bees", "wasps"]
    assert ds.empty_classes == ["bees"]
    assert ds.samples == [(str(p), 0) for p in classes["ants"]] + [(str(classes["wasps"][0]), 2)]
    assert ds.targets == [0, 0, 2] and len(ds) == 3
    with Image.open(ants[1]) as im:
        assert ds[1] == (im.size, 0)
    # A given mapping: its order for labels; unmapped folders ignored; missing ones empty.
    ds = ClassFolderDataset(root, class_to_idx={"wasps": 0, "ants": 1, "moths": 2}, loader=str)
    assert ds.classes == ["wasps", "ants", "moths"]
    assert ds.empty_classes == ["moths"]
    assert ds.samples == [(str(p), 1) for p in classes["ants"]] + [(str(classes["wasps"][0]), 0)]
    assert ds[2] == (str(classes["wasps"][0]), 0)


def test_class_folder_dataset_matches_torchvision_image_folder():
    from torchvision import datasets
    reference = datasets.ImageFolder(str(VAL))
    ours = ClassFolderDataset(VAL)
    assert ours.classes == reference.classes and ours.class_to_idx == reference.class_to_idx
    assert ours.samples == reference.samples and ours.targets == reference.targets
    assert len(ours) == count_files(VAL) and ours.empty_classes == []
    image, label = ours[0]
    assert label == reference[0][1]
    assert image.tobytes() == reference[0][0].tobytes()
