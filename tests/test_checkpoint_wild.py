"""Checkpoints as people actually have them (issue 11): half precision, EMA copies, numpy
arrays, a file of another architecture, and the messages for refused pickles and folders."""
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision

import resnext
from resnext import checkpoint as ck, unpickling
from resnext.checkpoint import detect_architecture, read_checkpoint
from resnext.weights import load_weights
from resnext.model import ResNeXt
from resnext.weights import get_model
from conftest import DEMO, randomize_


def small_model(seed: int = 5) -> ResNeXt:
    """A cheap ResNeXt-50 2x4d with 3 classes, random weights and BN statistics."""
    torch.manual_seed(seed)
    return randomize_(ResNeXt(50, groups=2, width_per_group=4, num_classes=3), seed=seed).eval()


def openmmlab_keys(sd):
    return OrderedDict((f"head.{k}" if k.startswith("fc.") else f"backbone.{k}", v)
                       for k, v in sd.items())


@pytest.fixture(scope="module")
def bird():
    """bird.JPEG through the package's test pipeline: (1, 3, 224, 224) float32."""
    return resnext.eval_transform()(resnext.load_image(DEMO / "bird.JPEG")).unsqueeze(0)


@pytest.fixture(scope="module")
def small():
    return small_model()


def logits_of(model, x):
    with torch.no_grad():
        return model.eval()(x)


def plain_logits(sd, x):
    """Logits of a float32 small model given `sd` by torch's own load_state_dict (upcast
    first), independent of our loader."""
    ref = ResNeXt(50, groups=2, width_per_group=4, num_classes=3)
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return logits_of(ref, x)


# --- 1. half-precision (and float64) files ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_or_high_precision_file_gives_float32_model(small, bird, tmp_path, dtype):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in small.state_dict().items()}
    path = tmp_path / "half.pth"
    torch.save({"state_dict": openmmlab_keys(sd), "meta": {"CLASSES": ["a", "b", "c"]}}, path)
    expected = plain_logits(sd, bird)
    if dtype != torch.float64:  # the file really lost precision: the check can fail
        assert not torch.equal(expected, logits_of(small, bird))

    built = get_model(pretrained=str(path))  # meta-device build, assigning the file's tensors
    existing = ResNeXt(50, groups=2, width_per_group=4, num_classes=3)
    report = load_weights(existing, path)  # copy into a real model
    for model in (built, existing):
        for k, t in model.state_dict().items():
            counter = k.endswith("num_batches_tracked")
            assert t.dtype == (torch.int64 if counter else torch.float32), k
        logits = logits_of(model, bird)  # float32 input: no "Input type ... HalfTensor" error
        assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
        assert logits.argmax().item() == expected.argmax().item()
    # Both paths hold the same tensors.
    other = built.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in existing.state_dict().items())
    name = str(dtype).removeprefix("torch.")
    assert f"tensors were {name}, cast to float32" in str(report)
    assert built.weights_info.load_report.notes == report.notes and report.file_dtypes == [name]


def test_dtype_argument_builds_that_dtype(small, bird, tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in small.state_dict().items()}
    torch.save(sd, tmp_path / "half.pth")
    model = get_model(pretrained=str(tmp_path / "half.pth"), dtype=torch.float64)
    assert model.conv1.weight.dtype == torch.float64 and model.fc.bias.dtype == torch.float64
    assert model.layer1[0].bn1.num_batches_tracked.dtype == torch.int64
    logits = logits_of(model, bird.double())
    assert torch.allclose(logits.float(), plain_logits(sd, bird), rtol=1e-4, atol=1e-5)
    assert "cast to float64" in str(model.weights_info.load_report)
    # A float32 file into a float32 model says nothing about casting.
    torch.save(small.state_dict(), tmp_path / "f32.pth")
    assert get_model(pretrained=str(tmp_path / "f32.pth")).weights_info.load_report.notes == []
    with pytest.raises(ValueError, match="floating torch.dtype"):
        resnext.resnext50_32x4d(dtype=torch.int8)


# --- 2. EMA copies ----------------------------------------------------------------------------

def test_mmcls_ema_keys_are_skipped(small, bird, tmp_path):
    raw_training = small_model(seed=9)  # what EMAHook leaves in ema_* after its swap
    sd = openmmlab_keys(small.state_dict())
    params = [k for k, _ in small.named_parameters()]
    ema = {("ema_head_" + k.replace(".", "_") if k.startswith("fc.")
            else "ema_backbone_" + k.replace(".", "_")): v.detach()
           for k, v in raw_training.named_parameters()}
    assert "ema_backbone_conv1_weight" in ema and "ema_head_fc_weight" in ema
    torch.save({"meta": {"CLASSES": ["a", "b", "c"], "mmcls_version": "0.25.0"},
                "state_dict": {**sd, **ema}}, tmp_path / "ema.pth")
    model = get_model(pretrained=str(tmp_path / "ema.pth"))
    assert torch.equal(logits_of(model, bird), logits_of(small, bird))
    assert model.weights_info.load_report.format == (
        f"mmcls 0.x, EMA copy ({len(params)} ema_* keys) skipped")
    assert len(params) == 161  # every parameter of a ResNeXt-50, as in the issue

    # ema_* keys that shadow no main key (or not one of the same shape) are still refused.
    stray = {**sd, **ema, "ema_neck_proj_weight": torch.zeros(3)}
    torch.save({"meta": {"CLASSES": ["a", "b", "c"]}, "state_dict": stray}, tmp_path / "s.pth")
    with pytest.raises(ValueError, match=r"keys have no place .*ema_neck_proj_weight"):
        read_checkpoint(tmp_path / "s.pth")
    bad = {**sd, **ema, "ema_head_fc_bias": torch.zeros(4)}
    torch.save({"state_dict": bad}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="have no place"):
        read_checkpoint(tmp_path / "b.pth")


def test_mmengine_ema_state_dict_is_skipped(small, bird, tmp_path):
    raw_training = small_model(seed=9)
    ema_sd = {f"module.{k}": v for k, v in openmmlab_keys(raw_training.state_dict()).items()}
    ema_sd["steps"] = torch.tensor(500400)
    torch.save({"meta": {"dataset_meta": {"classes": ["a", "b", "c"]}},
                "state_dict": openmmlab_keys(small.state_dict()),
                "ema_state_dict": ema_sd, "message_hub": {"runtime_info": {"epoch": 100}}},
               tmp_path / "ema.pth")
    model = get_model(pretrained=str(tmp_path / "ema.pth"))
    assert torch.equal(logits_of(model, bird), logits_of(small, bird))
    assert model.class_names == ["a", "b", "c"]
    fmt = model.weights_info.load_report.format
    assert fmt.startswith("mmpretrain 1.x") and f"EMA copy (ema_state_dict, {len(ema_sd)}" in fmt


# --- 3. numpy arrays --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["float32", "float16 in state_dict", "big-endian fortran"])
def test_numpy_arrays_load_as_tensors(small, bird, tmp_path, layout):
    sd = small.state_dict()
    arrays = {k: v.numpy() for k, v in sd.items()}
    if layout == "float32":
        obj, expected = arrays, logits_of(small, bird)
    elif layout == "float16 in state_dict":
        arrays = {k: a.astype(np.float16) if a.dtype == np.float32 else a
                  for k, a in arrays.items()}
        obj = {"state_dict": arrays, "meta": {"epoch": np.int64(90), "lr": np.float64(0.5),
                                              "history": np.zeros((0, 2), np.float32)}}
        expected = plain_logits({k: torch.from_numpy(a) for k, a in arrays.items()}, bird)
    else:  # byte-swapped, column-major copies of the same numbers
        swapped = {k: a.astype(a.dtype.newbyteorder(">")) for k, a in arrays.items()}
        obj = {k: np.asfortranarray(a) if a.ndim else a for k, a in swapped.items()}
        assert not obj["conv1.weight"].flags.c_contiguous
        expected = logits_of(small, bird)
    torch.save(obj, tmp_path / "np.pth")
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "np.pth")
    assert any(n.endswith("multiarray._reconstruct") for n in needed)  # really numpy inside
    ckpt = read_checkpoint(tmp_path / "np.pth")
    assert all(isinstance(v, torch.Tensor) for v in ckpt.state_dict.values())
    assert ckpt.state_dict["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    model = get_model(pretrained=ckpt)
    assert torch.allclose(logits_of(model, bird), expected, rtol=1e-5, atol=1e-6)
    if layout == "float16 in state_dict":
        meta = dict(ckpt.raw["meta"])
        assert torch.equal(meta.pop("history"), torch.zeros(0, 2))  # b'' pickles as bytes()
        assert meta == {"epoch": 90, "lr": 0.5}  # numpy scalars as Python numbers
        assert "tensors were float16, cast to float32" in str(model.weights_info.load_report)


def test_numpy_arrays_that_cannot_be_tensors_are_named(small, tmp_path):
    arrays = {k: v.numpy() for k, v in small.state_dict().items()}
    arrays["conv1.weight"] = np.array([object(), 1], dtype=object)[1:]  # object dtype
    torch.save(arrays, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match=r"obj\.pth: 1 entries are numpy arrays of dtype O"
                                         r".*torch\.from_numpy"):
        read_checkpoint(tmp_path / "obj.pth")


# --- 4. a file of another architecture --------------------------------------------------------

def meta_state_dict(build):
    with torch.device("meta"):
        return build().state_dict()


@pytest.mark.parametrize("factory", resnext.list_models())
def test_detect_architecture_of_every_factory(factory):
    model = getattr(resnext.model, factory)
    arch = detect_architecture(meta_state_dict(model))
    with torch.device("meta"):
        ref = model()
    assert (arch.depth, arch.groups, arch.width_per_group, arch.num_classes, arch.name) == (
        ref.depth, ref.groups, ref.width_per_group, 1000, factory)


def test_detect_architecture_of_torchvision_models():
    tv = meta_state_dict(lambda: torchvision.models.resnet101(num_classes=10))
    assert detect_architecture(tv) == ck.Arch(101, 1, 64, 10, "resnet101")
    tv = meta_state_dict(torchvision.models.resnext101_32x8d)
    assert detect_architecture(tv).name == "resnext101_32x8d"
    headless = {k: v for k, v in meta_state_dict(torchvision.models.resnet152).items()
                if not k.startswith("fc.")}
    assert detect_architecture(headless) == ck.Arch(152, 1, 64, 0, "resnet152")
    for not_ours in (torchvision.models.wide_resnet50_2, torchvision.models.resnet18):
        with pytest.raises(ValueError):
            detect_architecture(meta_state_dict(not_ours))


def fake_file(build, path, **save_kwargs):
    """A real file with the shapes of `build()`'s state dict, each tensor a broadcast zero
    (a few bytes however large the model)."""
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in
          meta_state_dict(build).items()}
    torch.save(sd, path, **save_kwargs)
    return path


def test_wrong_architecture_is_one_line_first(tmp_path):
    path = fake_file(resnext.model.resnext101_32x8d, tmp_path / "x101.pth")
    assert path.stat().st_size < 1_000_000
    with torch.device("meta"):
        target = resnext.model.resnext50_32x4d()
    with pytest.raises(ValueError) as err:
        load_weights(target, path)
    msg = str(err.value)
    first = msg.splitlines()[0]
    assert first == f"{path} holds resnext101_32x8d (1000 classes); the model is resnext50_32x4d"
    assert len(msg.encode()) < 2048 and "... and " in msg and "more" in msg
    with pytest.raises(ValueError) as err:
        load_weights(target, path, verbose=True)
    assert "layer3.22.bn3.running_var" in str(err.value) and "... and" not in str(err.value)

    # get_model with a name that the file contradicts: the one line only.
    with pytest.raises(ValueError) as err:
        get_model("resnext50_32x4d", pretrained=str(path))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path} holds resnext101_32x8d (1000 classes); "
                                     f"the model is resnext50_32x4d")
    # Without a name the file's architecture is built (nothing is held twice: assigned).
    model = get_model(pretrained=str(path))
    assert model.arch_name == "resnext101_32x8d" and model.fc.out_features == 1000


def test_get_model_builds_what_a_file_without_meta_holds(bird, tmp_path):
    # torchvision ResNet-50 (no factory of ours: groups 1), random weights and BN stats.
    tv = randomize_(torchvision.models.resnet50(num_classes=7), seed=2).eval()
    torch.save(tv.state_dict(), tmp_path / "tv_r50.pth")
    model = get_model(pretrained=str(tmp_path / "tv_r50.pth"))
    assert (model.arch_name, model.depth, model.groups, model.num_classes) == ("resnet50", 50, 1, 7)
    assert torch.allclose(logits_of(model, bird), logits_of(tv, bird), rtol=1e-4, atol=1e-5)
    # An mmcls-layout file of a small ResNeXt: the factory-less 50_2x4d, 3 classes.
    small = small_model()
    torch.save({"meta": {"CLASSES": ["a", "b", "c"]},
                "state_dict": openmmlab_keys(small.state_dict())},
               tmp_path / "mmcls.pth", _use_new_zipfile_serialization=False)
    model = get_model(pretrained=str(tmp_path / "mmcls.pth"))
    assert model.arch_name == "resnext50_2x4d" and model.class_names == ["a", "b", "c"]
    assert torch.equal(logits_of(model, bird), logits_of(small, bird))
    # A file of a factory's architecture gets that factory; its name agrees with the file.
    path = fake_file(resnext.model.resnext152_32x4d, tmp_path / "x152.pth")
    assert get_model(pretrained=str(path)).arch_name == "resnext152_32x4d"
    assert get_model("resnext152-32x4d_8xb32_in1k", pretrained=str(path)).depth == 152


# --- 6. messages ------------------------------------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('ran')",))


@pytest.mark.parametrize("how", ["zip", "legacy", "plain pickle"])
def test_refusal_never_advises_weights_only_false(tmp_path, how):
    path = tmp_path / "evil.pth"
    evil = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Payload()}
    if how == "plain pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save(evil, path, _use_new_zipfile_serialization=(how == "zip"))
    with pytest.raises(pickle.UnpicklingError) as torch_err:  # torch's own wording advises it
        torch.load(path, weights_only=True)
    assert "weights_only" in str(torch_err.value)
    with pytest.raises(ValueError, match="refused to load") as err:
        read_checkpoint(path)
    msg = str(err.value)
    for advice in ("weights_only", "safe_globals", "trust", "\x1b["):
        assert advice not in msg, msg


def test_reason_strips_any_advice():
    text = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
            "`False` will likely succeed. WeightsUnpickler error: Can only build Tensor, "
            "Parameter or types allowlisted via `add_safe_globals`, but got <class 'x'>")
    assert "weights_only" not in unpickling._reason(text) and unpickling._reason(text)
    reason = "Unsupported global: GLOBAL os.system was not an allowed global by default."
    advice = " Please use `torch.serialization.add_safe_globals([os.system])` if you trust it."
    assert unpickling._reason(reason + advice) == reason


def test_directory_is_named_as_one(tmp_path, small):
    work_dir = tmp_path / "work_dir"
    work_dir.mkdir()
    (work_dir / "log.txt").write_text("epoch 1")
    with pytest.raises(ValueError, match=r"work_dir is a directory; pass the checkpoint file "
                                         r"inside it .*holds no \.pth"):
        read_checkpoint(work_dir)
    torch.save(small.state_dict(), work_dir / "best.pth")
    torch.save(small.state_dict(), work_dir / "last.pth")
    with pytest.raises(ValueError, match=r"is a directory; pass the checkpoint file inside it "
                                         r"\(e\.g\. .*best\.pth\); checkpoint files there: "
                                         r"best\.pth, last\.pth$"):
        get_model(pretrained=str(work_dir))
