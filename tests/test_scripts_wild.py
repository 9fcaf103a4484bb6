"""predict.py, evaluate.py and train.py on folders and images as people have them (issue 12):
hidden debris, symlinks, empty and few classes, unnamed classes, pixel limits, pipes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import DEMO, HYMENOPTERA, REPO, count_files

pytestmark = pytest.mark.slow  # every test runs a script in a subprocess

VAL = HYMENOPTERA / "val"
BIRD = DEMO / "bird.JPEG"


def run(*args, timeout=600, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def debris_folder(root, photos):
    """`photos` copied into root/real/, plus what shared drives and notebooks leave behind."""
    (root / "real").mkdir(parents=True)
    for p in photos:
        shutil.copy(p, root / "real" / p.name)
    first = photos[0].name
    (root / "real" / f"._{first}").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(photos[0], root / ".ipynb_checkpoints" / first)
    (root / "notes.txt").write_text("not an image")
    (root / "linked").symlink_to(root / "real")  # the same folder again: listed once
    os.symlink(photos[1], root / "link_to_file.jpg")  # a link to a file outside the folder
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    return root


def test_predict_folder_debris_and_symlinks(tmp_path, checkpoint_at_64):
    photos = sorted((VAL / "bees").iterdir())[:3]
    folder = debris_folder(tmp_path / "photos", photos)
    res = run("predict.py", folder, "--checkpoint", checkpoint_at_64, "--json", "--workers", "0")
    assert res.returncode == 0, res.stderr
    answered = [json.loads(line)["path"] for line in res.stdout.splitlines()]
    # 3 real photos and the linked file; not the hidden copies, not the linked folder again.
    assert sorted(os.path.basename(p) for p in answered) == sorted(
        [p.name for p in photos] + ["link_to_file.jpg"])
    assert "skipped 5 entries in folders" in res.stderr
    for reason in ("2 hidden", "1 not an image", "1 broken link", "1 folder already listed"):
        assert reason in res.stderr, reason


def test_predict_pipe_closed_early_is_quiet(checkpoint_at_64):
    res = subprocess.run(f"{sys.executable} predict.py {VAL} --checkpoint {checkpoint_at_64} --workers 0 "
                         f"--batch-size 4 | head -n 2", shell=True, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert len(res.stdout.splitlines()) == 2
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr


def test_pixel_limit_flag(checkpoint_at_64, tmp_path):
    res = run("predict.py", BIRD, "--checkpoint", checkpoint_at_64, "--max-image-pixels", "10000")
    assert res.returncode == 1
    assert "bird.JPEG" in res.stderr and "10000 pixels" in res.stderr
    res = run("predict.py", BIRD, "--checkpoint", checkpoint_at_64, "--max-image-pixels", "0", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["pred_class"] in ("ants", "bees")


def test_predict_16bit_copy_answers_as_the_photo(checkpoint_at_64, tmp_path):
    from PIL import Image
    gray = Image.open(BIRD).convert("L")
    gray.save(tmp_path / "gray8.png")
    # The same photo as 16-bit data (v * 257), little-endian as Pillow's I;16 holds it.
    values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).to(torch.int32)
    low_bytes = (values * 257).view(torch.uint8).view(-1, 4)[:, :2]  # little-endian host
    Image.frombytes("I;16", gray.size, bytes(low_bytes.flatten().tolist())).save(
        tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode in ("I;16", "I")
    res = run("predict.py", tmp_path / "gray8.png", tmp_path / "gray16.png", "--checkpoint",
              checkpoint_at_64, "--json")
    assert res.returncode == 0, res.stderr
    a, b = (json.loads(line) for line in res.stdout.splitlines())
    assert a["topk"] == b["topk"]  # same labels and identical scores


def test_evaluate_subsets_few_classes_and_json_stdout(tmp_path, checkpoint_at_64):
    # A val folder where one class has no images: the other class is counted, the empty one
    # named; two classes: the second figure is top-2, named so in text and JSON.
    val = tmp_path / "val"
    shutil.copytree(VAL / "ants", val / "ants")
    (val / "bees").mkdir()
    (val / "ants" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # debris: skipped
    res = run("evaluate.py", "--data", val, "--checkpoint", checkpoint_at_64, "--workers", "0", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["num_images"] == count_files(VAL / "ants")
    assert summary["k"] == 2 and summary["top2"] == 100.0
    assert "1 class folders hold no images" in res.stderr and "bees" in res.stderr
    assert "accuracy/top2: 100.0000" in res.stderr and "top5" not in res.stderr


def test_evaluate_warns_when_classes_are_mapped_by_order(tmp_path, ants_bees_checkpoint):
    # Weights without class names (a bare state dict) and a one-folder val set: the folder
    # cannot be matched by name, so the mapping is said, not silently guessed.
    raw = torch.load(ants_bees_checkpoint, weights_only=True)
    torch.save(raw["state_dict"], tmp_path / "bare.pth")
    val = tmp_path / "val"
    shutil.copytree(VAL / "bees", val / "bees")
    res = run("evaluate.py", "--data", val, "--checkpoint", tmp_path / "bare.pth",
              "--workers", "0", "--img-size", "64")
    assert res.returncode == 0, res.stderr
    assert "no class names" in res.stderr and "bees -> 0" in res.stderr


def test_train_with_debris_and_an_empty_class(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            os.makedirs(data / split / cls)
            for p in sorted((HYMENOPTERA / split / cls).iterdir())[:20]:
                shutil.copy(p, data / split / cls / p.name)
                (data / split / cls / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07")
        (data / split / ".ipynb_checkpoints").mkdir()
    (data / "train" / "wasps").mkdir()  # a class without training images
    (data / "val" / "wasps").mkdir()
    res = run("train.py", "--data", data, "--img-size", "32", "--batch-size", "8", "--epochs",
              "1", "--workers", "0", "--work-dir", tmp_path / "work", "--lr", "0.01")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 class folders hold no training images: wasps" in res.stderr
    log = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    copied = {split: sum(min(20, count_files(HYMENOPTERA / split / cls))
                         for cls in ("ants", "bees")) for split in ("train", "val")}
    assert log[0]["classes"] == 3 and log[0]["num_train"] == copied["train"]
    assert log[-1]["val_images"] == copied["val"]


def test_broken_image_in_a_worker_is_one_line(tmp_path, checkpoint_at_64):
    # DataLoader workers re-raise a decode error with their traceback inside the message:
    # the scripts still say it in one line that names the file.
    val = tmp_path / "val"
    shutil.copytree(VAL / "ants", val / "ants")
    (val / "bees").mkdir()
    (val / "bees" / "renamed.jpg").write_text("a text file, renamed")
    res = run("evaluate.py", "--data", val, "--checkpoint", checkpoint_at_64, "--workers", "1")
    assert res.returncode == 1  # a per-file failure, not a usage error
    error_lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "renamed.jpg: cannot decode image" in error_lines[0]
    assert "Traceback" not in res.stderr
    # Every class folder empty: an error, not a 0% result over 0 images.
    for p in (val / "ants").iterdir():
        p.unlink()
    (val / "bees" / "renamed.jpg").unlink()
    res = run("evaluate.py", "--data", val, "--checkpoint", checkpoint_at_64, "--workers", "0")
    assert res.returncode == 2 and "no images to evaluate" in res.stderr


def test_predict_answers_in_input_order_with_workers(tmp_path, checkpoint_at_64):
    photos = sorted((VAL / "ants").iterdir())[:4]
    (tmp_path / "broken.jpg").write_bytes(photos[0].read_bytes()[:100])
    inputs = [photos[0], tmp_path / "broken.jpg", *photos[1:], tmp_path / "missing.png"]
    outputs = {}
    for workers in ("0", "2"):
        res = run("predict.py", *inputs, "--checkpoint", checkpoint_at_64, "--json",
                  "--batch-size", "2", "--workers", workers)
        assert res.returncode == 1, res.stderr
        outputs[workers] = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["path"] for r in outputs["0"]] == [str(p) for p in inputs]
    assert ["error" in r for r in outputs["0"]] == [False, True, False, False, False, True]
    assert outputs["2"] == outputs["0"]
