"""export.py and resnext.export: each format read back with its own loader (torch.jit.load,
torch.export.load, onnxruntime) gives the eager model's logits on real photos and carries the
class names and preprocessing; dynamic batches; the one-line error without onnx; int8."""
import io
import json
import math
import subprocess
import sys

import pytest
import torch

import resnext
from resnext import Preprocessing
from resnext.errors import ConfigError, MissingDependencyError
from resnext.export import (compare, export_meta, export_onnx, export_program,
                            export_torchscript, load_artifact, load_images, quantize_int8,
                            require_onnx)
from resnext.images import list_images
from resnext.quantize import cpu_has_vnni, int8_recipe
from conftest import DEMO, HYMENOPTERA, REPO, randomize_

sys.path.insert(0, str(REPO))
import export as export_script  # noqa: E402  (the script: get_args_parser, main)

# The tests call torch.jit.load themselves, which torch 2.14 deprecates (docs/export.md).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
NAMES = ["ants", "bees"]
AT_64 = Preprocessing(64).to_dict()  # what checkpoint_at_64 stores: crop 64, resize 73


def _photos() -> list:
    # Real photos of several sizes and modes: the demo's four and three hymenoptera ones.
    return sorted(DEMO.glob("*.*[gG]")) + list_images(HYMENOPTERA / "val")[::12]


@pytest.fixture(scope="module")
def model(checkpoint_at_64):
    return resnext.get_model(pretrained=str(checkpoint_at_64))


@pytest.fixture(scope="module")
def photos(model):
    paths = _photos()
    assert len(paths) == 7
    return load_images(paths, model.preprocessing)  # (7, 3, 64, 64)


def _close(got, expected):
    # fp32 through another runtime: rounding only (conv/BN folding, other kernels).
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def test_meta_says_what_the_file_takes(model, checkpoint_at_64):
    meta = export_meta(model, "onnx", True, str(checkpoint_at_64))
    assert meta["class_names"] == NAMES and meta["preprocessing"] == AT_64
    assert meta["input"] == {"name": "images", "shape": ["N", 3, 64, 64], "dtype": "float32",
                             "layout": "NCHW"}
    assert meta["output"]["shape"] == ["N", 2] and meta["model"] == "resnext50_32x4d"
    assert json.loads(json.dumps(meta)) == meta  # plain JSON types
    with pytest.raises(ConfigError):
        export_meta(model, "tflite")


@pytest.mark.slow
def test_torchscript_round_trip(model, photos, tmp_path):
    meta = export_meta(model, "torchscript", False, "x.pth")
    export_torchscript(model, tmp_path / "m.torchscript.pt", meta)
    files = {"resnext.json": ""}
    loaded = torch.jit.load(str(tmp_path / "m.torchscript.pt"), _extra_files=files)
    stored = json.loads(files["resnext.json"])
    assert stored["class_names"] == NAMES and stored["preprocessing"] == AT_64
    expected = _eager(model, photos)
    with torch.no_grad():
        _close(loaded(photos[:1]), expected[:1])
        _close(loaded(photos[:3]), expected[:3])  # a trace takes any batch
        _close(torch.cat([loaded(x[None]) for x in photos]), expected)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_exported_program_round_trip(model, photos, tmp_path, dynamic):
    path = tmp_path / "m.pt2"
    export_program(model, path, export_meta(model, "exported-program", dynamic), dynamic)
    files = {"resnext.json": ""}
    loaded = torch.export.load(str(path), extra_files=files).module()
    sidecar = json.loads((tmp_path / "m.pt2.json").read_text())
    assert json.loads(files["resnext.json"]) == sidecar
    assert sidecar["class_names"] == NAMES and sidecar["preprocessing"] == AT_64
    expected = _eager(model, photos)
    with torch.no_grad():
        _close(loaded(photos[:1]), expected[:1])
        if dynamic:
            _close(loaded(photos[:3]), expected[:3])
        else:  # exactly one image: the program refuses another batch size
            with pytest.raises(Exception, match="size"):
                loaded(photos[:3])


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_round_trip(model, photos, tmp_path, dynamic):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    export_onnx(model, path, export_meta(model, "onnx", dynamic), dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert props["resnext.model"] == "resnext50_32x4d"
    assert json.loads(props["resnext.class_names"]) == NAMES
    assert json.loads(props["resnext.preprocessing"]) == AT_64
    assert json.loads(props["resnext.json"])["dynamic_batch"] is dynamic
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [3, 64, 64]
    assert (inp.shape[0] == 1) is not dynamic  # a symbolic batch dimension when dynamic
    expected = _eager(model, photos)
    for n in (1, 3) if dynamic else (1,):
        got = session.run(None, {"images": photos[:n].numpy()})[0]
        _close(torch.from_numpy(got), expected[:n])


def test_missing_onnx_is_one_line(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    for call in (require_onnx, lambda: export_onnx(model, tmp_path / "m.onnx",
                                                   export_meta(model, "onnx"))):
        with pytest.raises(MissingDependencyError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and 'pip install -e ".[onnx]"' in message
        assert message.startswith("ONNX export needs onnx,")
    assert not (tmp_path / "m.onnx").exists()


def test_compare_counts_by_hand():
    reference = torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 0.9]])
    candidate = reference + torch.tensor([[0.5, 0.0], [0.0, -0.1], [-0.2, 0.0]])
    table = {float(r[0]): (r, c) for r, c in zip(reference, candidate)}
    images = reference[:, 0].view(3, 1, 1, 1)  # each "image" names its row
    result = compare(lambda x: torch.stack([table[float(v)][0] for v in x.flatten()]),
                     lambda x: torch.stack([table[float(v)][1] for v in x.flatten()]),
                     images, batch_sizes=(1, 2))
    assert result.images == 3 and result.batch_sizes == (1, 2)
    assert result.max_abs_diff == pytest.approx(0.5) and result.logit_scale == 4.0
    assert result.mean_abs_diff == pytest.approx(0.8 / 6)
    assert result.top1_agree == 2  # the third row's 1.0 vs 0.9 flipped to 0.8 vs 0.9
    assert result.relative_diff == pytest.approx(0.125)
    assert not result.passed(None, 1.0) and result.passed(0.2, 2 / 3)
    assert not result.passed(0.1, 0.5)
    # The flipped row's margin in the reference, 1.0 - 0.9; the median margin of 2, 4, 0.1.
    assert result.flipped_margins == pytest.approx((0.1,)) and result.median_margin == 2.0
    # Two-class softmax by hand, p0 = sigmoid(l0 - l1): rows move by s(2.5) - s(2),
    # s(-3.9) - s(-4) and s(0.1) - s(-0.1); the flipped row moves most.
    sigmoid = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    moves = [sigmoid(2.5) - sigmoid(2), sigmoid(-3.9) - sigmoid(-4), sigmoid(0.1) - sigmoid(-0.1)]
    assert result.max_prob_diff == pytest.approx(max(moves)) and max(moves) == moves[2]
    assert "where they differ, the reference's top-1 margin was 0.1 (median image 2)" in str(
        result)


def _fit_pca_head(model: torch.nn.Module, img_size: int, k: int = 8) -> None:
    """A linear head on the k leading principal components of the pooled features of
    hymenoptera train (logistic regression, folded into fc). A head on high-variance
    directions is decisive where rounding noise is small relative to how images differ,
    as in a trained network; conftest's head on all 2048 standardised features amplifies
    the directions where random features barely differ (docs/export.md)."""
    paths = list_images(HYMENOPTERA / "train")
    x = load_images(paths, Preprocessing(img_size))
    y = torch.tensor([p.parent.name == "bees" for p in paths]).long()
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    mean = feats.mean(0)
    components = torch.linalg.svd(feats - mean, full_matrices=False).Vh[:k].T  # (2048, k)
    z = (feats - mean) @ components
    std = z.std(0)
    w = torch.zeros(2, k, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy((z / std) @ w.T + b, y).backward()
        opt.step()
    with torch.no_grad():
        weight = (w / std) @ components.T
        model.fc.weight.copy_(weight)
        model.fc.bias.copy_(b - weight @ mean)


def save_decisive_checkpoint(path, img_size: int = 64):
    """A resnext50_32x4d with conftest's random weights (seed 7) and _fit_pca_head's head,
    saved in our layout with class names and preprocessing (also what docs/export.md's int8
    figures were measured on, at 224 px)."""
    torch.manual_seed(0)
    model = randomize_(resnext.resnext50_32x4d(num_classes=2), seed=7)
    _fit_pca_head(model, img_size)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": "resnext50_32x4d", "classes": NAMES,
                         "preprocessing": Preprocessing(img_size).to_dict()}}, path)
    return path


@pytest.fixture(scope="module")
def decisive_checkpoint(tmp_path_factory):
    return save_decisive_checkpoint(tmp_path_factory.mktemp("decisive") / "decisive.pth")


INT8_MIN_AGREEMENT = 0.9  # measured: 33 of 33 val photos with the defaults (docs/export.md)


@pytest.mark.slow
def test_int8_agrees_with_fp32_and_is_smaller(decisive_checkpoint, tmp_path):
    model = resnext.get_model(pretrained=str(decisive_checkpoint))
    pre = model.preprocessing
    calibration = load_images(list_images(HYMENOPTERA / "train"), pre)  # 40 photos
    val = load_images(list_images(HYMENOPTERA / "val"), pre)  # 33 other photos
    int8 = quantize_int8(model, calibration.split(16))
    meta = export_meta(model, "torchscript", quantization={"dtype": "int8"})
    export_torchscript(int8, tmp_path / "int8.pt", meta)
    fp32 = export_torchscript(model, io.BytesIO(), meta).getvalue()
    files = {"resnext.json": ""}
    loaded = torch.jit.load(str(tmp_path / "int8.pt"), _extra_files=files)
    assert json.loads(files["resnext.json"])["class_names"] == NAMES
    with torch.no_grad():
        expected = model(val)
        got = torch.cat([loaded(x) for x in val.split(16)])
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert len(set(expected.argmax(1).tolist())) == 2  # both classes predicted
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= INT8_MIN_AGREEMENT, agreement
    # Not equal: int8 really ran (the logits differ by more than float rounding).
    assert (got - expected).abs().max() > 1e-3 * expected.abs().max()
    assert (tmp_path / "int8.pt").stat().st_size < len(fp32) / 3


def test_script_refuses_before_the_work(checkpoint_at_64, tmp_path):
    parse = export_script.get_args_parser().parse_args
    ckpt = str(checkpoint_at_64)
    for argv, message in (
            (["--checkpoint", ckpt, "--quantize", "int8"], "needs --calibrate"),
            (["--checkpoint", ckpt, "--quantize", "int8", "--format", "onnx",
              "--calibrate", "x"], "writes TorchScript"),
            (["--checkpoint", ckpt, "--out", ckpt], "is the checkpoint itself"),
            (["--checkpoint", ckpt, "--dynamic-batch", "--check-images",
              str(DEMO / "bird.JPEG"), "--out", str(tmp_path / "a.pt")], "at least 2 photos")):
        with pytest.raises(ConfigError, match=message):
            export_script.main(parse(argv))
    assert not list(tmp_path.iterdir())
    assert export_script.default_out("w/best.pth", None, "onnx", False) == \
        export_script.default_out("w/best.pth", "resnext101_32x4d", "onnx", False)
    assert str(export_script.default_out("w/best.pth", None, "onnx", False)) == "w/best.onnx"
    assert str(export_script.default_out("https://h/rx50.pth?x=1", None, "exported-program",
                                         False)) == "rx50.pt2"
    assert str(export_script.default_out(None, None, "torchscript", True)) == \
        "resnext50_32x4d.int8.torchscript.pt"


def test_script_check_fails_with_status_1(checkpoint_at_64, tmp_path, capsys):
    # A tolerance no float computation meets: the check must fail, and say so.
    args = export_script.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint_at_64), "--out", str(tmp_path / "m.pt"),
         "--tolerance", "1e-30"])
    assert export_script.main(args) == 1
    out, err = capsys.readouterr()
    assert "check: 4 photos at batch 1," in out and "top-1 agreement 4/4" in out
    assert "check failed: max |logit diff|" in err and "is over --tolerance 1e-30" in err
    assert "top-1 agreement" not in err  # 4/4 agreed: only the failed rule is named
    assert f"{tmp_path / 'm.pt'} is kept" in err and (tmp_path / "m.pt").exists()
    run, meta = load_artifact(tmp_path / "m.pt")
    assert meta["source"] == str(checkpoint_at_64) and meta["class_names"] == NAMES


@pytest.mark.slow
def test_import_resnext_export_imports_no_onnx():
    code = ("import sys, resnext, resnext.export\n"
            "bad = [m for m in ('onnx', 'onnxruntime', 'torchvision') if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def _run(*argv, env_code: str = ""):
    code = (f"import sys, runpy\n{env_code}\nsys.argv = ['export.py', *sys.argv[1:]]\n"
            "runpy.run_path('export.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "exported-program", "onnx"])
def test_script_exports_and_checks_each_format(checkpoint_at_64, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    ckpt = tmp_path / "best.pth"
    ckpt.write_bytes(checkpoint_at_64.read_bytes())
    res = _run("--checkpoint", ckpt, "--format", fmt, "--dynamic-batch")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / ("best" + {"torchscript": ".torchscript.pt", "onnx": ".onnx",
                                "exported-program": ".pt2"}[fmt])
    assert f"wrote {out}" in res.stdout
    assert "check: 4 photos at batch 1 and 4," in res.stdout
    assert "top-1 agreement 4/4" in res.stdout
    run, meta = load_artifact(out)
    assert meta["format"] == fmt and meta["dynamic_batch"] is True
    assert meta["class_names"] == NAMES and meta["preprocessing"] == AT_64


@pytest.mark.slow
def test_script_without_onnx_says_how_to_install(checkpoint_at_64, tmp_path):
    res = _run("--checkpoint", checkpoint_at_64, "--format", "onnx", "--out",
               tmp_path / "m.onnx", env_code="sys.modules['onnx'] = None")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        'export.py: error: ONNX export needs onnx, which is not installed: '
        'pip install -e ".[onnx]"']
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_script_int8(decisive_checkpoint, tmp_path):
    out = tmp_path / "int8.pt"
    res = _run("--checkpoint", decisive_checkpoint, "--quantize", "int8", "--calibrate",
               HYMENOPTERA / "train", "--check-images", HYMENOPTERA / "val", "--out", out,
               "--speed-runs", "0", "--min-agreement", INT8_MIN_AGREEMENT)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "calibrate: 40 of 40 photos in" in lines[1]
    check = next(line for line in lines if line.startswith("check:"))
    agreed = int(check.split("top-1 agreement ")[1].split("/")[0])
    assert "33 photos at batch 1 and 16" in check and agreed >= INT8_MIN_AGREEMENT * 33
    bits = 8 if cpu_has_vnni() else 7
    assert f"int8 ({bits}-bit activations, float32 layers: head)" in check
    size = next(line for line in lines if line.startswith("size:"))
    assert float(size.split("(")[1].split("x")[0]) > 3  # fp32 / int8 file size
    assert not any(line.startswith("speed") for line in lines)  # --speed-runs 0
    assert "note: only" not in res.stderr and "calibrated on" not in res.stderr  # 40, apart
    _, meta = load_artifact(out)
    assert meta["class_names"] == NAMES and meta["quantization"]["dtype"] == "int8"
    assert meta["quantization"]["activation_bits"] == bits
    assert meta["quantization"]["float_layers"] == ["head"]


@pytest.mark.slow
def test_script_int8_below_the_bar_writes_nothing(checkpoint_at_64, tmp_path):
    # conftest's model, its head on all 2048 features and scaled up (logits in the hundreds),
    # quantized whole with 7-bit activations: rounding decides the class (measured 16/33).
    out = tmp_path / "int8.pt"
    out.write_bytes(b"an earlier file")
    first_train = list_images(HYMENOPTERA / "train")[0]  # the first of any spread of them
    res = _run("--checkpoint", checkpoint_at_64, "--quantize", "int8", "--calibrate",
               HYMENOPTERA / "train", "--calibrate-images", "8", "--check-images",
               HYMENOPTERA / "val", first_train, "--out", out, "--speed-runs", "0",
               "--float-layers", "--activation-bits", "7")
    assert res.returncode == 1, res.stderr[-3000:]
    check = next(line for line in res.stdout.splitlines() if line.startswith("check:"))
    agreed = int(check.split("top-1 agreement ")[1].split("/")[0])
    assert "(7-bit activations, float32 layers: none)" in check and agreed < 0.99 * 34
    assert (f"check failed: top-1 agreement {agreed}/34 is under --min-agreement 0.99; {out} "
            f"not written (--min-agreement lowers the bar)") in res.stderr
    assert "note: only 8 calibration photos" in res.stderr
    assert "note: 1 of the 34 check photos is also calibrated on" in res.stderr
    assert not any(line.startswith("wrote") for line in res.stdout.splitlines())
    assert out.read_bytes() == b"an earlier file"


@pytest.mark.slow
def test_int8_keeps_the_layers_asked_for_in_float(model, photos):
    x = photos
    default = quantize_int8(model, [x])
    assert type(default.fc) is torch.nn.Linear  # the head: float32 weights, as given
    assert torch.equal(default.fc.weight, model.fc.weight)
    assert type(quantize_int8(model, [x], float_layers=()).fc) is not torch.nn.Linear
    both = quantize_int8(model, [x], float_layers=("head", "stem"))
    assert not type(both.conv1).__module__.startswith("torch.ao.nn.quantized")
    assert type(default.conv1).__module__.startswith("torch.ao.nn.intrinsic.quantized")
    # The activation range reaches the observers: the same calibration range spread over
    # 0..255 instead of 0..127 gives a step 255/127 times finer (the stem's input here).
    seven = quantize_int8(model, [x], full_range=False).conv1_input_scale_0
    eight = quantize_int8(model, [x], full_range=True).conv1_input_scale_0
    assert float(seven / eight) == pytest.approx(255 / 127, rel=0.02)
    with pytest.raises(ConfigError, match="unknown float layer neck"):
        int8_recipe(float_layers=("neck",))
    with pytest.raises(ConfigError, match="supports the 'x86' quantized engine, not 'qnnpack'"):
        quantize_int8(model, [x], backend="qnnpack")
    assert int8_recipe(full_range=False)["activation_bits"] == 7
    assert int8_recipe()["activation_bits"] == (8 if cpu_has_vnni() else 7)


# In a fresh interpreter, each file with its own format's loader only (no resnext import): the
# files stand alone, as a deployment loads them. argv[1]: the folder with the files and
# photos.pt; writes logits.pt ({format: {'all': (N, C), 'one': (1, C)}}: int8 on all the
# photos, the fp32 files on the first 8, to save time) and meta.json.
_DEPLOY_CHILD = r"""
import json, sys
from pathlib import Path
import torch
d = Path(sys.argv[1])
photos = torch.load(d / "photos.pt", weights_only=True)
x = photos[:8]
logits, metas = {}, {}
with torch.no_grad():
    for fmt, name in (("torchscript", "m.torchscript.pt"), ("int8", "m.int8.torchscript.pt")):
        files = {"resnext.json": ""}
        net = torch.jit.load(str(d / name), _extra_files=files)
        logits[fmt] = {"all": net(photos if fmt == "int8" else x), "one": net(x[:1])}
        metas[fmt] = json.loads(files["resnext.json"])
    files = {"resnext.json": ""}
    program = torch.export.load(str(d / "m.pt2"), extra_files=files).module()
    logits["exported-program"] = {"all": program(x), "one": program(x[:1])}
    metas["exported-program"] = json.loads(files["resnext.json"])
if (d / "m.onnx").is_file():
    import onnxruntime
    session = onnxruntime.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    run = lambda v: torch.from_numpy(session.run(["logits"], {"images": v.numpy()})[0])
    logits["onnx"] = {"all": run(x), "one": run(x[:1])}
    metas["onnx"] = json.loads(props["resnext.json"])
    metas["onnx props"] = {k: props[k] for k in ("resnext.model", "resnext.class_names",
                                                 "resnext.preprocessing")}
assert not [m for m in sys.modules if m.split(".")[0] == "resnext"], "imported resnext"
torch.save(logits, d / "logits.pt")
(d / "meta.json").write_text(json.dumps(metas))
"""


@pytest.mark.slow
def test_every_artifact_reloads_in_a_fresh_process(decisive_checkpoint, tmp_path):
    has_onnx = True
    try:
        require_onnx()
    except MissingDependencyError:  # ONNX is optional; the other formats are still checked
        has_onnx = False
    model = resnext.get_model(pretrained=str(decisive_checkpoint))
    pre = model.preprocessing
    photos = load_images(list_images(HYMENOPTERA / "val"), pre)  # 33 real photos, 64 px
    torch.save(photos, tmp_path / "photos.pt")
    written = {fmt: export_meta(model, fmt, True, "decisive.pth")
               for fmt in ("torchscript", "exported-program", "onnx")}
    export_torchscript(model, tmp_path / "m.torchscript.pt", written["torchscript"])
    export_program(model, tmp_path / "m.pt2", written["exported-program"], dynamic_batch=True)
    if has_onnx:
        export_onnx(model, tmp_path / "m.onnx", written["onnx"], dynamic_batch=True)
    calibration = load_images(list_images(HYMENOPTERA / "train")[::4], pre)  # 10 other photos
    int8 = quantize_int8(model, [calibration])  # measured: 33/33 val photos agree with fp32
    written["int8"] = export_meta(model, "torchscript", quantization={"dtype": "int8"})
    export_torchscript(int8, tmp_path / "m.int8.torchscript.pt", written["int8"])

    res = subprocess.run([sys.executable, "-c", _DEPLOY_CHILD, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    metas = json.loads((tmp_path / "meta.json").read_text())

    expected = _eager(model, photos)
    assert len(set(expected.argmax(1).tolist())) == 2  # a model whose answers vary
    fp32 = ["torchscript", "exported-program"] + (["onnx"] if has_onnx else [])
    assert sorted(logits) == sorted(fp32 + ["int8"])
    for fmt in fp32:
        for key, reference in (("all", expected[:8]), ("one", expected[:1])):
            got = logits[fmt][key]
            assert got.dtype == torch.float32 and got.shape == reference.shape, (fmt, key)
            _close(got, reference)
            assert torch.equal(got.argmax(1), reference.argmax(1)), (fmt, key)
    got = logits["int8"]["all"]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= INT8_MIN_AGREEMENT, agreement
    assert (got - expected).abs().max() > 1e-3 * expected.abs().max()  # int8 really ran
    with torch.no_grad():  # the file runs the quantized model the parent built
        torch.testing.assert_close(got, int8(photos), rtol=1e-4, atol=1e-4)
        # At batch 1 the x86 engine may pick other int8 kernels (oneDNN/FBGEMM) and round
        # otherwise: compared with the parent's quantized model at batch 1 too.
        torch.testing.assert_close(logits["int8"]["one"], int8(photos[:1]), rtol=1e-4,
                                   atol=1e-4)

    for fmt, meta in written.items():
        if fmt in logits:
            assert metas[fmt] == meta, fmt
            assert metas[fmt]["class_names"] == NAMES and metas[fmt]["preprocessing"] == AT_64
    assert metas["int8"]["quantization"] == {"dtype": "int8"}
    assert metas["exported-program"]["input"]["shape"] == ["N", 3, 64, 64]
    if has_onnx:
        assert metas["onnx props"] == {"resnext.model": "resnext50_32x4d",
                                       "resnext.class_names": json.dumps(NAMES),
                                       "resnext.preprocessing": json.dumps(AT_64)}
