"""The shared preprocessing, predict.py, evaluate.py and inference_model on real photos."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image
from torchvision import datasets, transforms as T

import resnext
from resnext.datasets import build_dataset
from resnext.errors import ImageReadError
from resnext.images import load_image
from resnext.transforms import eval_transform
from resnext import inference_model  # the public API, as the README shows
from conftest import DATA, DEMO, HYMENOPTERA, REPO, count_files

NORM = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIRD = DEMO / "bird.JPEG"
VAL = HYMENOPTERA / "val"


def run_script(*args, env=None, timeout=300):
    """Run a repository script in a subprocess (as a user would), from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# --- preprocessing ------------------------------------------------------------------------------

def test_bird_preprocessing_equals_torchvision_exactly():
    with Image.open(BIRD) as im:
        assert im.size == (403, 500)
        pil = im.convert("RGB")
    # 500 * 256 / 403 = 317.6: short side 256, long side floored to 317 (REFERENCE.md).
    assert T.Resize(256)(pil).size == (256, 317)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), NORM])(pil)
    ours = eval_transform()(load_image(BIRD))
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    # Crop offsets x=16, y=round((317-224)/2)=46: the crop is that window of the resize.
    resized = T.ToTensor()(T.Resize(256)(pil))
    assert torch.equal(NORM(resized[:, 46:270, 16:240]), ours)


def _mean_abs(a, b):
    return (a - b).abs().mean().item()


def test_image_modes_and_exif(tmp_path):
    tf = eval_transform()
    upright = load_image(BIRD)
    # EXIF-rotated copy: pixels stored rotated 90 degrees, Orientation=6 says "rotate back".
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", quality=95,
                                                      exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95)  # same re-encoding, no rotation
    reencoded = tf(load_image(tmp_path / "upright.jpg"))
    rotated = tf(load_image(tmp_path / "rotated.jpg"))
    ignoring_exif = tf(Image.open(tmp_path / "rotated.jpg").convert("RGB"))
    assert _mean_abs(reencoded, tf(upright)) < 0.03  # the re-encoding tolerance itself
    assert _mean_abs(rotated, tf(upright)) < 0.03
    assert _mean_abs(ignoring_exif, tf(upright)) > 0.3  # the test would notice a missed EXIF

    # CMYK JPEG from the RGB source.
    upright.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    assert _mean_abs(tf(load_image(tmp_path / "cmyk.jpg")), tf(upright)) < 0.05

    # Palette PNG with transparency, RGBA (cat-dog.png), LA and grayscale.
    with Image.open(DEMO / "cat-dog.png") as im:
        assert im.mode == "RGBA"
        rgba = im.copy()
    pal = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    rgba.convert("P").save(tmp_path / "palette_plain.png")
    rgba.convert("LA").save(tmp_path / "la.png")
    rgba.convert("L").save(tmp_path / "gray.png")
    for name in ("palette.png", "palette_plain.png", "la.png", "gray.png"):
        with Image.open(tmp_path / name) as im:
            assert im.mode in ("P", "LA", "L"), name
    for path in [tmp_path / n for n in ("palette.png", "palette_plain.png", "la.png",
                                        "gray.png")] + [DEMO / "cat-dog.png"]:
        img = load_image(path)
        assert img.mode == "RGB"
        assert tf(img).shape == (3, 224, 224)
    # Grayscale gives three equal channels before normalisation.
    gray = T.ToTensor()(load_image(tmp_path / "gray.png"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = BIRD.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    for name, reason in [("empty.jpg", "empty file"), ("text.jpg", "cannot decode"),
                         ("truncated.jpg", "truncated"), ("missing.jpg", "not found")]:
        with pytest.raises(ImageReadError, match=f"{name}: .*{reason}"):
            load_image(tmp_path / name)


# --- predict.py -----------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_modes_and_broken_files(tmp_path, ants_bees_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((VAL / "bees").iterdir())[:2]:
        shutil.copy(p, photos / p.name.upper())  # upper-case extension still matched
    shutil.copy(DEMO / "cat-dog.png", photos / "cat-dog.png")
    Image.open(BIRD).convert("CMYK").save(photos / "cmyk.jpg")
    Image.open(BIRD).convert("L").save(photos / "gray.png")
    data = BIRD.read_bytes()
    (photos / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "notes.jpg").write_text("a text file")
    (photos / "readme.txt").write_text("not an image extension: skipped")
    res = run_script("predict.py", photos, BIRD, tmp_path / "gone.jpg", "--checkpoint",
                     ants_bees_checkpoint, "--json", "--topk", "7", "--batch-size", "3")
    assert res.returncode == 1, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    answered = {os.path.basename(r["path"]): r for r in records if "error" not in r}
    failed = {os.path.basename(r["path"]): r for r in records if "error" in r}
    assert set(answered) == {p.name.upper() for p in sorted((VAL / "bees").iterdir())[:2]} | {
        "cat-dog.png", "cmyk.jpg", "gray.png", "bird.JPEG"}
    assert set(failed) == {"truncated.jpg", "zero.jpg", "notes.jpg", "gone.jpg"}
    for name in failed:
        assert name in res.stderr
    for r in answered.values():
        assert len(r["topk"]) == 2  # --topk 7 capped at 2 classes
        assert r["pred_class"] in ("ants", "bees") and r["topk"][0]["label"] == r["pred_label"]
        assert abs(sum(t["score"] for t in r["topk"]) - 1) < 1e-5
    # Text output: path line then "score  class (label)" lines.
    res = run_script("predict.py", BIRD, "--checkpoint", ants_bees_checkpoint, "--topk", "1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].endswith("bird.JPEG") and len(lines) == 2
    assert lines[1].split()[1] in ("ants", "bees")


@pytest.mark.slow
def test_default_weights_without_network_is_a_clear_error(tmp_path):
    closed = "http://127.0.0.1:9"  # nothing listens: every download fails at once
    env = {"HTTPS_PROXY": closed, "https_proxy": closed, "HTTP_PROXY": closed,
           "http_proxy": closed, "TORCH_HOME": str(tmp_path), "no_proxy": "", "NO_PROXY": ""}
    res = run_script("predict.py", BIRD, env=env)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    url = resnext.RELEASED_WEIGHTS["resnext50_32x4d"].url
    assert url in res.stderr and "--checkpoint" in res.stderr


def test_inference_model_and_batch_invariance(ants_bees_checkpoint):
    model = resnext.get_model(pretrained=str(ants_bees_checkpoint))
    assert model.fc.out_features == 2 and not model.training
    result = inference_model(model, BIRD)
    assert set(result) == {"pred_scores", "pred_label", "pred_score", "pred_class"}
    assert result["pred_scores"].shape == (2,)
    assert abs(result["pred_scores"].sum().item() - 1) < 1e-6
    assert result["pred_class"] == ["ants", "bees"][result["pred_label"]]
    assert result["pred_score"] == result["pred_scores"].max().item()
    # One image alone and inside a batch give the same logits (eval mode, float tolerance).
    tf = eval_transform(64)
    batch = torch.stack([tf(load_image(p)) for p in sorted((VAL / "ants").iterdir())[:6]])
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(batch[i:i + 1]) for i in range(6)])
    # The random BN statistics amplify float rounding through 16 blocks: relative 1e-3.
    scale = together.abs().max().item()
    torch.testing.assert_close(alone, together, rtol=1e-3, atol=1e-3 * scale)
    assert torch.equal(alone.argmax(1), together.argmax(1))


# --- evaluate.py ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def independent_top1(ants_bees_checkpoint):
    """Hits on hymenoptera val computed with torchvision only: its ImageFolder, its
    transforms, its ResNeXt class."""
    raw = torch.load(ants_bees_checkpoint, weights_only=True)
    model = torchvision.models.resnext50_32x4d(num_classes=2)
    model.load_state_dict(raw["state_dict"])
    model.eval()
    ds = datasets.ImageFolder(str(VAL), T.Compose([T.Resize(73), T.CenterCrop(64),
                                                   T.ToTensor(), NORM]))
    hits = 0
    with torch.no_grad():
        for i in range(0, len(ds), 51):
            items = [ds[j] for j in range(i, min(i + 51, len(ds)))]
            x = torch.stack([a for a, _ in items])
            y = torch.tensor([b for _, b in items])
            hits += (model(x).argmax(1) == y).sum().item()
    return hits, len(ds)


def _eval_args(*extra):
    return ["--img-size", "64", "--workers", "0", "--batch-size", "20", *map(str, extra)]


@pytest.mark.slow
def test_evaluate_matches_independent_count(tmp_path, ants_bees_checkpoint, independent_top1):
    hits, n = independent_top1
    assert n == count_files(VAL)
    import evaluate
    args = evaluate.get_args_parser().parse_args(
        ["--data", str(VAL), "--checkpoint", str(ants_bees_checkpoint),
         "--json", str(tmp_path / "r.json"), *_eval_args()])
    result = evaluate.main(args)
    assert result["num_images"] == n
    assert result["top1"] == pytest.approx(100 * hits / n)
    assert 0 < hits < n  # a real test: predictions are neither all right nor all wrong
    summary = json.loads((tmp_path / "r.json").read_text())
    # Two classes: "top-5" is top-2 (always 100%), and is named so.
    assert summary == {"top1": result["top1"], "top2": 100.0, "k": 2, "num_images": n,
                       "model": "resnext50_32x4d", "checkpoint": str(ants_bees_checkpoint)}

    # The annotation-file layout gives the same numbers (labels as ImageFolder's order).
    ann = tmp_path / "val.txt"
    ann.write_text("".join(f"{c}/{p.name} {i}\n" for i, c in enumerate(["ants", "bees"])
                           for p in sorted((VAL / c).iterdir())))
    args = evaluate.get_args_parser().parse_args(
        ["--data", str(VAL), "--ann-file", str(ann), "--checkpoint", str(ants_bees_checkpoint),
         *_eval_args()])
    assert evaluate.main(args)["top1"] == result["top1"]


@pytest.mark.slow
def test_evaluate_two_processes_counts_each_image_once(tmp_path, ants_bees_checkpoint,
                                                       independent_top1):
    hits, n = independent_top1
    assert n % 2 == 1  # odd: two processes would pad one duplicate
    res = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "evaluate.py", "--data", VAL, "--checkpoint", ants_bees_checkpoint,
                     "--json", tmp_path / "r.json", *_eval_args())
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["num_images"] == n  # not n + 1: no padded duplicate
    assert summary["top1"] == pytest.approx(100 * hits / n)
    assert res.stdout.count("accuracy/top1") == 1  # rank 0 only


def test_evaluate_imagenet_wnid_folders_keep_imagenet_indices(tmp_path):
    # A 1000-class model: the 10 wnid folders get their ImageNet indices, read here from the
    # copy of the table in tests/data (not our package's copy).
    table = {}
    for line in (DATA / "imagenet1k_wnids.tsv").read_text().splitlines():
        index, wnid, _ = line.split("\t")
        table[wnid] = int(index)
    model = resnext.resnext50_32x4d()
    torch.save(model.state_dict(), tmp_path / "in1k.pth")
    import evaluate
    args = evaluate.get_args_parser().parse_args(
        ["--data", str(DATA / "imagenet_samples"), "--checkpoint", str(tmp_path / "in1k.pth"),
         "--out", str(tmp_path / "preds.json"), *_eval_args()])
    result = evaluate.main(args)
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert result["num_images"] == len(preds) == 10
    for p in preds:
        wnid = os.path.basename(os.path.dirname(p["path"]))
        assert p["label"] == table[wnid]
    assert sorted(p["label"] for p in preds) == [0, 1, 12, 65, 151, 281, 309, 310, 489, 950]
    assert [p["index"] for p in preds] == list(range(10))


def test_dataset_layout_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(BIRD, flat / "a.jpg")
    with pytest.raises(ValueError, match="no class folders.*class folders.*annotation file"):
        build_dataset(flat)
    # Folders that are neither the model's class names nor wnids are listed.
    with pytest.raises(ValueError, match=r"\['ants', 'bees'\] match neither"):
        build_dataset(VAL, class_names=resnext.imagenet_class_names())
    # wnid folders with a model of other classes: the message says what is wrong.
    with pytest.raises(ValueError, match=r"are ImageNet-1k wnids, but the model has 2 classes"):
        build_dataset(DATA / "imagenet_samples", class_names=["ants", "bees"])
    # The model's own names match whatever the sort order.
    ds = build_dataset(VAL, class_names=["bees", "ants"])
    assert ds.class_to_idx == {"bees": 0, "ants": 1}
    bees, ants = count_files(VAL / "bees"), count_files(VAL / "ants")
    assert bees != ants  # so that a swapped mapping would show
    assert ds.targets.count(0) == bees and ds.targets.count(1) == ants
    bad = tmp_path / "bad.txt"
    bad.write_text("ants/x.jpg 0\nno_label_here\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        build_dataset(VAL, ann_file=bad)
    bad.write_text("../../etc/passwd 0\n")
    with pytest.raises(ValueError, match="inside"):
        build_dataset(VAL, ann_file=bad)
    # A link inside the root is the user's own and is followed, wherever it points.
    root = tmp_path / "linked"
    root.mkdir()
    (root / "bird.jpg").symlink_to(BIRD)
    good = tmp_path / "good.txt"
    good.write_text("bird.jpg 3\n")
    ds = build_dataset(root, ann_file=good, transform=eval_transform())
    assert len(ds) == 1 and ds[0][1] == 3 and ds[0][0].shape == (3, 224, 224)
