"""Where people actually run it: images that are cheap to send and costly to open, and other
inputs and environments that used to hang or crash the scripts."""
import json
import struct
import subprocess
import sys

import pytest
from PIL import Image

import resnext
from resnext.datasets import ClassFolderDataset
from resnext.images import set_max_image_pixels
from conftest import REPO


def _strip(path, width, height):
    Image.new("L", (width, height), 128).save(path)  # a few hundred bytes of PNG
    return path


@pytest.mark.parametrize("width,height", [(30000, 1), (1, 8000), (4000, 2)])
def test_thin_strips_are_refused_before_the_resize(tmp_path, width, height):
    path = _strip(tmp_path / f"strip_{width}x{height}.png", width, height)
    assert path.stat().st_size < 2000
    short, long = min(width, height), max(width, height)
    resized = 256 * int(256 * long / short)  # hand count: short side to 256, long side scaled
    assert resized > Image.MAX_IMAGE_PIXELS  # these would ask for gigabytes
    folder = tmp_path / "val" / "strips"
    folder.mkdir(parents=True)
    path.rename(folder / path.name)
    dataset = ClassFolderDataset(tmp_path / "val", resnext.eval_transform())
    with pytest.raises(resnext.ImageReadError) as error:
        dataset[0]
    message = str(error.value)
    assert message.startswith(str(folder / path.name))  # names the file
    assert f"{resized:,} pixels, over the limit of {Image.MAX_IMAGE_PIXELS:,}" in message


def test_resize_bound_follows_the_pixel_limit(tmp_path):
    path = _strip(tmp_path / "wide.png", 600, 2)   # resized: 76,800 x 256 = 19,660,800 px
    image = resnext.load_image(path)
    assert resnext.eval_transform()(image).shape == (3, 224, 224)  # under the default limit
    try:
        set_max_image_pixels(10_000_000)
        with pytest.raises(resnext.ImageReadError, match="19,660,800 pixels"):
            resnext.eval_transform()(image)
        set_max_image_pixels(0)  # no limit: the user's choice, honoured
        assert resnext.eval_transform()(image).shape == (3, 224, 224)
    finally:
        set_max_image_pixels(89_478_485)


@pytest.mark.slow
def test_predict_answers_the_other_files_around_a_strip(tmp_path, ants_bees_checkpoint):
    photos = tmp_path / "in"
    photos.mkdir()
    _strip(photos / "a_strip.png", 30000, 1)
    (photos / "b_photo.jpg").write_bytes((REPO / "demo" / "bird.JPEG").read_bytes())
    res = subprocess.run([sys.executable, "predict.py", str(photos), "--checkpoint",
                          str(ants_bees_checkpoint), "--json", "--workers", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]  # a per-file failure
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert records[0]["path"].endswith("a_strip.png") and "over the limit" in records[0]["error"]
    assert records[1]["pred_class"] in ("ants", "bees")
    assert "Traceback" not in res.stderr and "MemoryError" not in res.stderr


# --- --fast-decode sees what Pillow sees ---------------------------------------------------

def _raw_exif(endian: bytes, field_type: int, value: int) -> bytes:
    """An APP1 EXIF payload whose only entry is the orientation tag, written by hand."""
    e = "<" if endian == b"II" else ">"
    packed = struct.pack(e + "HH", value, 0) if field_type == 3 else (
        struct.pack(e + "I", value) if field_type == 4 else bytes([value, 0, 0, 0]))
    ifd = struct.pack(e + "HHHI", 1, 0x0112, field_type, 1) + packed + struct.pack(e + "I", 0)
    return b"Exif\x00\x00" + endian + struct.pack(e + "HI", 42, 8) + ifd


def _oriented_jpeg(path, orientation):
    """demo/dog.jpg, small (so the fast path decodes it with torchvision.io.decode_jpeg), with
    the EXIF orientation tag set to `orientation` (an int, malformed ones too), or the raw
    EXIF bytes given."""
    with Image.open(REPO / "demo" / "dog.jpg") as im:
        small = im.convert("RGB").resize((200, 150))
    exif = orientation
    if isinstance(orientation, int):
        exif = Image.Exif()
        exif[0x0112] = orientation
    small.save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [
    1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 65535,
    # Files on which torchvision's EXIF reader and Pillow's disagree: a big-endian LONG tag
    # (Pillow turns the image, torchvision did not) and a BYTE tag (the reverse).
    _raw_exif(b"MM", 4, 6), _raw_exif(b"II", 1, 6), _raw_exif(b"MM", 3, 8)],
    ids=lambda o: o if isinstance(o, int) else f"raw-{o[6:8].decode()}-{o[18:20].hex()}")
def test_fast_decode_turns_images_as_pillow_does(tmp_path, orientation):
    import torch
    from resnext.transforms import FastTrainTransform, train_transform
    path = _oriented_jpeg(tmp_path / "oriented.jpg", orientation)
    upright = resnext.load_image(path)  # Pillow's exif_transpose: the default path
    fast, reference = FastTrainTransform(112), train_transform(112)
    for seed in range(4):
        torch.manual_seed(seed)
        expected = reference(upright)
        torch.manual_seed(seed)
        got = fast(path)
        # Same crop and flip on the same upright image: resampling detail only. A wrong turn
        # (e.g. 90 degrees, or padding) differs by ~0.5-1 in normalised units.
        assert (got - expected).abs().mean().item() < 0.04, (orientation, seed)


def test_fast_decode_turns_match_pillow_on_a_tiny_image():
    import numpy as np
    import torch
    from resnext.transforms import _ORIENT
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # H 2, W 3, RGB
    image = Image.fromarray(pixels)
    ops = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # ImageOps.exif_transpose's table
    assert set(_ORIENT) == set(ops)
    for orientation, op in ops.items():
        want = torch.from_numpy(np.array(image.transpose(op))).permute(2, 0, 1)
        got = _ORIENT[orientation](torch.from_numpy(pixels).permute(2, 0, 1))
        assert torch.equal(got, want), orientation


# --- names as people have them ----------------------------------------------------------------

def _two_class_checkpoint(path, classes):
    import torch
    model = resnext.resnext50_32x4d(num_classes=2)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": "resnext50_32x4d", "classes": list(classes)}}, path)
    return path


def test_decomposed_folder_names_match_composed_class_names(tmp_path):
    import unicodedata
    from resnext.datasets import folder_class_mapping
    composed = ["café", "thé"]  # NFC, as a checkpoint holds them
    for name in composed:
        folder = tmp_path / unicodedata.normalize("NFD", name)  # as macOS writes them
        folder.mkdir()
        assert folder.name != name and len(folder.name) == len(name) + 1
    # Reversed order in the model: labels must come from the names, not the sort order.
    mapping = folder_class_mapping(tmp_path, ["thé", "café"])
    assert {unicodedata.normalize("NFC", f): label for f, label in mapping.items()} == {
        "thé": 0, "café": 1}


def test_printable_escapes_what_could_forge_a_line():
    from resnext.cli import printable
    assert printable("café/ants 2.jpg") == "café/ants 2.jpg"  # printable text is kept
    assert printable("a\nb") == "a\\nb" and printable("\x1b[2J") == "\\x1b[2J"
    assert printable("evil\u202egpj.exe") == "evil\\u202egpj.exe"  # bidi override
    assert printable(b"\xff.jpg".decode("utf-8", "surrogateescape")) == "\\udcff.jpg"


@pytest.mark.slow
def test_predict_prints_hostile_names_harmlessly(tmp_path):
    names = ["ants\x1b[31m", "bees\n  1.0000  forged"]
    checkpoint = _two_class_checkpoint(tmp_path / "hostile.pth", names)
    photos = tmp_path / "in"
    photos.mkdir()
    odd = photos / b"odd-\xff-name\nline.jpg".decode("utf-8", "surrogateescape")
    odd.write_bytes((REPO / "demo" / "bird.JPEG").read_bytes())
    res = subprocess.run([sys.executable, "predict.py", str(photos), "--checkpoint",
                          str(checkpoint), "--workers", "0", "--topk", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         errors="surrogateescape")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 3  # one path line and two class lines: nothing forged
    assert lines[0].endswith("odd-\\udcff-name\\nline.jpg")
    assert "\x1b" not in res.stdout and "ants\\x1b[31m" in res.stdout
    assert "bees\\n  1.0000  forged" in res.stdout
    res = subprocess.run([sys.executable, "predict.py", str(odd), "--checkpoint",
                          str(checkpoint), "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    record = json.loads(res.stdout)  # JSON keeps the exact names
    assert record["topk"][0]["class"] in names and len(res.stdout.splitlines()) == 1


# --- runs that cannot mean what the user thinks -------------------------------------------

def _tiny_split(root, per_class, classes=("ants", "bees")):
    """root/train and root/val with a few real photos per class (tests/data/hymenoptera)."""
    import shutil
    from conftest import HYMENOPTERA
    for split, n in (("train", per_class), ("val", 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for photo in sorted((HYMENOPTERA / split / name).iterdir())[:n]:
                shutil.copy(photo, root / split / name / photo.name)
    return root


def _train(argv):
    sys.path.insert(0, str(REPO))
    import train
    return train.main(train.get_args_parser().parse_args(list(map(str, argv))))


def test_single_class_training_is_refused(tmp_path):
    data = _tiny_split(tmp_path / "data", 2, classes=("ants",))
    with pytest.raises(resnext.DatasetError, match="1 class .*at least 2 classes"):
        _train(["--data", data, "--work-dir", tmp_path / "w", "--workers", "0"])
    assert not (tmp_path / "w" / "last.pth").exists()


@pytest.mark.parametrize("too_deep", [True, False])
def test_train_data_folder_one_level_off_names_the_fix(tmp_path, too_deep):
    data = _tiny_split(tmp_path / "outer" / "data", 1)
    wrong = data / "train" if too_deep else tmp_path / "outer"
    with pytest.raises(resnext.DatasetError) as error:
        _train(["--data", wrong, "--work-dir", tmp_path / "w", "--workers", "0"])
    message = str(error.value)
    assert "--ann-file" not in message  # train.py has no such flag
    if too_deep:
        assert "give its parent" in message
    else:
        assert f"did you mean --data {data}" in message


@pytest.mark.slow
def test_short_runs_finished_runs_and_a_changed_amp_are_announced(tmp_path, capsys):
    data = _tiny_split(tmp_path / "data", 4)
    common = ["--data", data, "--work-dir", tmp_path / "w", "--img-size", "32", "--batch-size",
              "4", "--workers", "0", "--epochs", "1"]
    _train(common)
    out = capsys.readouterr().out
    assert "note: no lr milestone (30, 60, 90) falls before epoch 1: the lr stays 0.1" in out
    assert f"best: {tmp_path / 'w' / 'best.pth'}, val top-1 " in out  # the run names its best
    _train(common + ["--resume", "auto"])  # finished: says so instead of nothing
    assert "nothing to train: the run already finished its 1 epochs" in capsys.readouterr().out
    # An fp32 run resumed with fp16 (a GradScaler the checkpoint never had) starts the
    # scaler fresh and says so, instead of "The source state dict is empty".
    _train(common[:-1] + ["2", "--resume", "auto", "--amp", "fp16"])
    out = capsys.readouterr().out
    assert "--amp was fp32 and is now fp16; the fp16 GradScaler starts fresh" in out
    assert torch_load(tmp_path / "w" / "last.pth")["epoch"] == 2


def torch_load(path):
    import torch
    return torch.load(path, weights_only=True)


# --- file-system faults -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_old_one(tmp_path):
    import torch
    path = resnext.save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, tmp_path / "last.pth")
    # A real limit the test sets itself: files may not grow past 1 MiB (as a full disk or a
    # quota would stop them), in a child process.
    code = ("import resource, signal, sys, torch, resnext\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "try:\n"
            "    resnext.save_checkpoint({'epoch': 2, 'w': torch.zeros(1 << 20)}, sys.argv[1])\n"
            "except resnext.CheckpointWriteError as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    message = res.stdout.strip()
    assert message.startswith(f"{path}: writing the checkpoint failed") and "MiB free" in message
    assert "last.pth is unchanged" in message
    assert torch_load(path)["epoch"] == 1  # still loadable, the previous epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary left


def test_an_unreadable_class_folder_is_one_line(tmp_path, monkeypatch, capsys,
                                                ants_bees_checkpoint):
    import os
    data = _tiny_split(tmp_path / "data", 1)
    locked = str(data / "val" / "bees")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:  # what a folder without read permission answers
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    sys.path.insert(0, str(REPO))
    import evaluate
    from resnext.cli import run_cli
    args = evaluate.get_args_parser().parse_args(
        ["--data", str(data / "val"), "--checkpoint", str(ants_bees_checkpoint), "--workers",
         "0", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli("evaluate.py", evaluate.main, args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {locked}: Permission denied")


# --- smaller holes ------------------------------------------------------------------------------

def test_a_saved_inference_model_reads_back(tmp_path):
    import torch
    model = resnext.resnext50_32x4d(num_classes=2).eval()
    prepared = resnext.InferenceModel(model, torch.device("cpu"))
    torch.save(prepared.state_dict(), tmp_path / "prepared.pth")
    assert all(k.startswith("net.") for k in prepared.state_dict())
    loaded = resnext.get_model(pretrained=str(tmp_path / "prepared.pth"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_annotation_label_beyond_the_model_names_file_line_and_count(tmp_path):
    from resnext.datasets import build_dataset
    photo = sorted((REPO / "demo").iterdir())[0]
    (tmp_path / photo.name).write_bytes(photo.read_bytes())
    ann = tmp_path / "val.txt"
    ann.write_text(f"{photo.name} 0\n\n{photo.name} 2\n")
    with pytest.raises(resnext.DatasetError, match=r"val\.txt:3: label 2 is not one of the "
                       r"model's 2 classes \(0\.\.1\)"):
        build_dataset(tmp_path, ann, class_names=["ants", "bees"])
    assert len(build_dataset(tmp_path, ann, num_classes=3)) == 2


@pytest.mark.slow
def test_spawned_loader_workers_keep_the_pixel_limit(tmp_path):
    from torch.utils.data import DataLoader
    from resnext.datasets import ClassFolderDataset
    from resnext.evaluation import build_loader
    folder = tmp_path / "val" / "birds"
    folder.mkdir(parents=True)
    (folder / "bird.JPEG").write_bytes((REPO / "demo" / "bird.JPEG").read_bytes())  # 403x500
    dataset = ClassFolderDataset(tmp_path / "val")
    try:
        set_max_image_pixels(100_000)  # below the photo's 201,500 pixels
        init = build_loader(dataset, 1, 1, 0, 1).worker_init_fn
        assert init is not None
        loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=list,
                            multiprocessing_context="spawn", worker_init_fn=init)
        with pytest.raises(resnext.ImageReadError, match="larger than the limit of 100000"):
            next(iter(loader))
    finally:
        set_max_image_pixels(89_478_485)


def test_slurm_variables_make_a_process_group_without_torchrun(monkeypatch):
    import os
    from resnext import distributed
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NNODES="1")
    monkeypatch.setattr(os, "environ", env)  # a private copy: nothing leaks to other tests
    distributed._from_slurm()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        del env[name]
    env["SLURM_NNODES"] = "2"
    with pytest.raises(resnext.ConfigError, match="set MASTER_ADDR"):
        distributed._from_slurm()
    env["RANK"] = "0"  # torchrun's variables win: nothing is taken from SLURM
    distributed._from_slurm()
    assert "WORLD_SIZE" not in env


# --- loader resources never hang a script ---------------------------------------------------

def test_loader_plan_fits_the_shared_memory_there_is():
    from resnext.runtime import fit_loader_to_shared_memory
    batch = 32 * 3 * 224 * 224 * 4  # a float32 training batch of 32: 19,267,584 bytes
    assert fit_loader_to_shared_memory(15, 4, batch, free=24 * 2**30) == (15, 4, None)
    # Docker's 64 MB: 15 x 4 batches need ~1.2 GB; with 1.5x headroom a batch takes
    # 28,901,377 bytes, so 2 fit with one batch each (67,108,864 // 28,901,377 = 2).
    workers, prefetch, note = fit_loader_to_shared_memory(15, 4, batch, free=64 * 2**20)
    assert (workers, prefetch) == (2, 1)
    assert note.startswith("shared memory (/dev/shm, 64 MB free) is too small for 15 workers "
                           "x 4 batches of 18.4 MB: using 2 workers x 1 batches")
    assert "--shm-size" in note and "--workers" in note
    assert fit_loader_to_shared_memory(4, 2, batch, free=10 * 2**20)[:2] == (0, 1)
    assert fit_loader_to_shared_memory(0, 2, batch, free=0) == (0, 2, None)


def test_loader_failures_are_one_line_with_the_fix(capsys):
    import argparse
    from resnext.cli import run_cli
    for text in ("DataLoader timed out after 600 seconds",
                 "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback "
                 "(most recent call last):\nRuntimeError: unable to write to file "
                 "</torch_51_1933_0>: No space left on device (28)"):
        def main(args, text=text):
            raise RuntimeError(text)

        with pytest.raises(SystemExit) as exit_info:
            run_cli("evaluate.py", main, argparse.Namespace())
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1
        assert "shared memory" in err and "--workers 0" in err and "--shm-size" in err


def _small_shm_command(command: str) -> list[str]:
    """`command` in a private mount namespace whose /dev/shm is a 2 MB tmpfs (Docker's default
    is 64 MB; 2 MB makes the same failure with this suite's small batches)."""
    return ["unshare", "-m", "sh", "-c",
            f"mount -t tmpfs -o size=2m tmpfs /dev/shm && exec {command}"]


def _can_shrink_shm() -> bool:
    import shutil
    if shutil.which("unshare") is None:
        return False
    res = subprocess.run(_small_shm_command("true"), capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_shrink_shm(), reason="needs unshare -m and tmpfs mounts (root)")
@pytest.mark.parametrize("script", ["predict.py", "evaluate.py"])
def test_scripts_end_in_a_container_sized_shared_memory(script, ants_bees_checkpoint):
    import shlex
    from conftest import HYMENOPTERA, count_files
    val = HYMENOPTERA / "val"
    args = ([str(val)] if script == "predict.py" else ["--data", str(val)]) + [
        "--checkpoint", str(ants_bees_checkpoint), "--workers", "2", "--batch-size", "16",
        "--json", "--img-size", "224"]
    command = " ".join(shlex.quote(a) for a in [sys.executable, script, *args])
    res = subprocess.run(_small_shm_command(command), cwd=REPO, capture_output=True,
                         text=True, timeout=600)  # it hung forever before
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shared memory (/dev/shm, 2 MB free) is too small for 2 workers" in res.stderr
    lines = res.stdout.splitlines()
    if script == "predict.py":
        assert len(lines) == count_files(val)  # every image answered
    else:
        assert json.loads(lines[-1])["num_images"] == count_files(val)


def _resume_decision(rank, init_file, work_dirs, results):
    import torch.distributed as dist
    sys.path.insert(0, str(REPO))
    import train
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    try:
        args = train.get_args_parser().parse_args(["--data", "x", "--resume", "auto"])
        from pathlib import Path
        results[rank] = train.prepare_work_dir(args, Path(work_dirs[rank]), rank == 0, 2)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_resume_auto_is_decided_by_rank_zero(tmp_path):
    import torch.multiprocessing as mp
    # Node-local work dirs: rank 0's holds last.pth, rank 1's (another node's disk) does not.
    work_dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "last.pth").write_bytes(b"x")
    results = mp.Manager().dict()
    mp.spawn(_resume_decision, args=(str(tmp_path / "init"), work_dirs, results), nprocs=2)
    assert dict(results) == {0: str(tmp_path / "node0" / "last.pth"),
                             1: str(tmp_path / "node0" / "last.pth")}


@pytest.mark.slow
def test_per_image_predictions_copy_each_batch_once():
    # Every int()/float() of a device tensor is a host synchronisation (aten's
    # _local_scalar_dense); per-image results must come from one copy per batch.
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.data import DataLoader, TensorDataset
    from resnext.evaluation import evaluate

    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.count += 1
            return func(*args, **(kwargs or {}))

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7)).eval()
    model = resnext.InferenceModel(net, torch.device("cpu"), channels_last=False,
                                   num_classes=7)
    images, labels = torch.randn(24, 3, 4, 4), torch.randint(0, 7, (24,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    with CountSyncs():
        result = evaluate(model, loader, return_predictions=True)
    assert CountSyncs.count <= 2 * 3  # a couple per batch at most; it was 4 per image
    with torch.no_grad():
        logits = net(images)
    expected = logits.softmax(1).topk(5, dim=1)
    assert [p["topk"] for p in result["predictions"]] == expected.indices.tolist()
    assert [p["pred_score"] for p in result["predictions"]] == pytest.approx(
        expected.values[:, 0].tolist())
    assert [p["label"] for p in result["predictions"]] == labels.tolist()


@pytest.mark.slow
def test_ctrl_c_in_predict_ends_quietly_with_130(ants_bees_checkpoint):
    import signal
    import time
    from conftest import HYMENOPTERA
    proc = subprocess.Popen([sys.executable, "predict.py", str(HYMENOPTERA), "--checkpoint",
                             str(ants_bees_checkpoint), "--workers", "1", "--batch-size", "2",
                             "--img-size", "224"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    first = proc.stdout.readline()  # an answer has been printed: the run is under way
    assert first.strip()
    time.sleep(0.5)
    __import__("os").killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "predict.py: interrupted"
