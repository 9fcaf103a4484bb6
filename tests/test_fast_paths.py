"""Opt-in fast paths: they must keep the reference's results (to float/bf16 tolerance)."""
import json

import pytest
import torch
from PIL import Image

import resnext
from resnext.errors import ImageReadError
from resnext.images import load_image
from resnext.transforms import FastTrainTransform, train_transform
from resnext.inference import fuse_bn
from resnext.runtime import resolve_amp
from conftest import DEMO, HYMENOPTERA, count_files, randomize_
from test_predict_evaluate import BIRD, VAL, run_script

PHOTOS = sorted((HYMENOPTERA / "train" / "bees").iterdir())[:6]
# The photos with a short side of 1000 px or more (tests/data keeps one, 1488x1984): crops
# there allow 1/2-1/8 reduced decoding at a 64 px output.
BIG = [p for p in sorted(HYMENOPTERA.rglob("*.jpg"))
       if min(Image.open(p).size) >= 1000]


def test_fast_train_transform_draws_the_same_crops(tmp_path):
    assert len(BIG) >= 1, "tests/data/hymenoptera lost its large photo (see its README)"
    fast, reference = FastTrainTransform(64), train_transform(64)
    same, other = [], []
    for path in PHOTOS + BIG:
        for seed in range(3):
            torch.manual_seed(seed)
            expected = reference(load_image(path))
            after_reference = torch.get_rng_state()
            torch.manual_seed(seed)
            got = fast(path)
            # Same random draws (crop box, flip): the RNG advanced identically...
            assert torch.equal(torch.get_rng_state(), after_reference)
            assert got.shape == expected.shape == (3, 64, 64) and got.dtype == torch.float32
            # ...and the pixels differ by resampling only: decoding at 1/2-1/8 scale, which
            # 64 px crops of these photos allow, costs ~1e-2 (normalised units; one grey
            # level is 0.017), full-size decodes ~1e-4.
            same.append((got - expected).abs().mean().item())
            torch.manual_seed(seed + 100)
            other.append((reference(load_image(path)) - expected).abs().mean().item())
    assert max(same) < 0.04, same
    # Another crop of the same photo is far further away: the test can tell a wrong crop.
    assert sum(other) / len(other) > 10 * sum(same) / len(same)


def test_fast_train_transform_exif_and_errors(tmp_path):
    upright = load_image(BIRD)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rot.jpg", quality=95,
                                                      exif=exif)
    upright.save(tmp_path / "up.jpg", quality=95)
    fast = FastTrainTransform(64)
    torch.manual_seed(0)
    rotated = fast(tmp_path / "rot.jpg")
    torch.manual_seed(0)
    straight = fast(tmp_path / "up.jpg")
    assert (rotated - straight).abs().mean().item() < 0.05  # EXIF applied, same crop
    Image.open(DEMO / "cat-dog.png").save(tmp_path / "rgba.png")  # non-JPEG path
    assert fast(tmp_path / "rgba.png").shape == (3, 64, 64)
    (tmp_path / "bad.jpg").write_text("no")
    with pytest.raises(ImageReadError, match=r"bad\.jpg"):
        fast(tmp_path / "bad.jpg")


def test_fuse_bn_keeps_outputs_and_original():
    model = randomize_(resnext.resnext50_32x4d(), seed=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.stack([resnext.eval_transform(96)(load_image(p)) for p in PHOTOS[:3]])
    with torch.no_grad():
        reference, got = model(x), fused(x)
    scale = reference.abs().max().item()
    assert (got - reference).abs().max().item() < 1e-4 * scale
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_resolve_amp(monkeypatch):
    flags = open("/proc/cpuinfo").read().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert resolve_amp(None, torch.device("cpu")) is None
    assert resolve_amp("fp16", torch.device("cpu")) == torch.float16
    # CUDA by device class: fp16 from Volta (7.0) on (measured on an H200, 9.0), fp32 before.
    for capability, expected in (((9, 0), torch.float16), ((7, 0), torch.float16),
                                 ((6, 1), None), ((5, 2), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert resolve_amp("auto", torch.device("cuda")) == expected, capability
        assert resolve_amp("fp16", torch.device("cuda")) == torch.float16  # asked is asked

    def no_gpu(device=None):
        raise RuntimeError("Found no NVIDIA driver on your system")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    # The query failing is not this function's error to raise: moving the model will say it.
    assert resolve_amp("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="fp8"):
        resolve_amp("fp8", torch.device("cpu"))


@pytest.mark.slow
def test_predict_fast_options_agree_with_fp32(ants_bees_checkpoint):
    args = [VAL / "ants", "--checkpoint", ants_bees_checkpoint, "--json", "--img-size", "64"]
    exact = run_script("predict.py", *args)
    fast = run_script("predict.py", *args, "--amp", "auto", "--fuse-bn")
    assert exact.returncode == fast.returncode == 0, fast.stderr
    a = [json.loads(line) for line in exact.stdout.splitlines()]
    b = [json.loads(line) for line in fast.stdout.splitlines()]
    assert len(a) == len(b) == count_files(VAL / "ants")
    agree = sum(x["pred_label"] == y["pred_label"] for x, y in zip(a, b))
    assert agree >= len(a) - 1  # bf16 may flip a near-tie, no more
    assert max(abs(x["topk"][0]["score"] - y["topk"][0]["score"])
               for x, y in zip(a, b) if x["pred_label"] == y["pred_label"]) < 0.05
