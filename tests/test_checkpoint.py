"""Checkpoint formats, safe loading, released-weights download (local server), export."""
import argparse
import contextlib
import hashlib
import http.server
import pickle
import sys
import threading
import types
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import resnext
from resnext import unpickling
from resnext.checkpoint import export_openmmlab, read_checkpoint
from resnext.weights import RELEASED_WEIGHTS, get_model, load_weights
from conftest import DEMO, randomize_


@pytest.fixture(scope="module")
def reference():
    """A resnext50 with random weights and BN statistics, and its logits on a real photo."""
    model = randomize_(resnext.resnext50_32x4d(), seed=3).eval()
    from PIL import Image
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(73), T.CenterCrop(64), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with Image.open(DEMO / "demo.JPEG") as im:
        x = tf(im.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        logits = model(x)
    return model, x, logits


def logits_after_loading(path, x, **kwargs):
    model = resnext.resnext50_32x4d(**kwargs)
    report = load_weights(model, path)
    model.eval()
    with torch.no_grad():
        return model(x), model, report


def openmmlab_keys(sd):
    return OrderedDict((f"head.{k}" if k.startswith("fc.") else f"backbone.{k}", v)
                       for k, v in sd.items())


LONG_NAMES = [f"class {i}, long WordNet name" for i in range(1000)]


@contextlib.contextmanager
def fake_mmengine():
    """Register a throwaway mmengine.logging.history_buffer module while saving, as mmengine
    itself is not installed (and must never be imported by the loader)."""
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    mods = {n: types.ModuleType(n) for n in names}

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([2.3, 2.1])
            self._count_history = np.array([32, 32])
            self._max_length = 1000000

        def update(self, value):
            pass

    HistoryBuffer.__module__ = names[-1]
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    mods[names[-1]].HistoryBuffer = HistoryBuffer
    sys.modules.update(mods)
    try:
        yield HistoryBuffer
    finally:
        for n in names:
            sys.modules.pop(n, None)


def make_mmpretrain_1x(sd, path):
    with fake_mmengine() as HistoryBuffer:
        buffer = HistoryBuffer()
        ckpt = {
            "meta": {"dataset_meta": {"classes": LONG_NAMES}, "epoch": 100, "iter": 500400,
                     "mmengine_version": "0.10.4", "seed": np.int64(1234)},
            "state_dict": openmmlab_keys(sd),
            "message_hub": {"log_scalars": {"train/loss": buffer},
                            "runtime_info": {"epoch": 100, "max_iters": np.int64(500400),
                                             "loss": np.float64(1.25), "arr": np.zeros(3)}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9}]},
            # A bound method pickles as builtins.getattr(obj, name).
            "param_schedulers": [{"milestones": {30: 1, 60: 1, 90: 1}, "hook": buffer.update}],
        }
        torch.save(ckpt, path)
    globals_needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    return globals_needed


@pytest.mark.slow
def test_every_format_loads_to_identical_logits(reference, tmp_path):
    model, x, expected = reference
    sd = model.state_dict()
    files = {}

    tv = torchvision.models.resnext50_32x4d()
    tv.load_state_dict(sd)
    torch.save(tv.state_dict(), tmp_path / "torchvision.pth")
    files["torchvision"] = "state dict"
    torch.save(OrderedDict(sd), tmp_path / "pytorch_model.bin")  # timm/HF hub name, same keys
    files["pytorch_model.bin"] = "state dict"
    # mmcls 0.x release: meta with CLASSES, backbone./head.fc. keys, legacy serialization.
    torch.save({"meta": {"mmcls_version": "0.12.0", "CLASSES": LONG_NAMES, "epoch": 100,
                         "config": "model = dict(type='ImageClassifier')"},
                "state_dict": openmmlab_keys(sd)},
               tmp_path / "mmcls.pth", _use_new_zipfile_serialization=False)
    files["mmcls.pth"] = "mmcls 0.x (legacy serialization)"
    needed = make_mmpretrain_1x(sd, tmp_path / "mmpretrain.pth")
    assert "mmengine.logging.history_buffer.HistoryBuffer" in needed
    assert "builtins.getattr" in needed
    assert any(n.endswith("multiarray._reconstruct") for n in needed)
    assert any(n.endswith("multiarray.scalar") for n in needed)
    files["mmpretrain.pth"] = "mmpretrain 1.x"
    torch.save({"state_dict": sd, "meta": {"model": "resnext50_32x4d", "classes": LONG_NAMES},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},
               tmp_path / "ours.pth")
    files["ours.pth"] = "resnext"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    files["ddp.pth"] = "wrapper prefixes stripped"
    torch.save({f"module.module._orig_mod.{k}": v for k, v in sd.items()},
               tmp_path / "ddp2.pth")
    files["ddp2.pth"] = "wrapper prefixes stripped"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1), "epoch": 5},
               tmp_path / "tv_references.pth")
    files["tv_references.pth"] = "torchvision references"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    files["model.safetensors"] = "state dict"

    for name, fmt in files.items():
        path = tmp_path / (name if "." in name else name + ".pth")
        logits, loaded, report = logits_after_loading(path, x)
        assert torch.equal(logits, expected), name
        assert fmt in report.format, (name, report.format)
        assert report.loaded == len(sd)
    # mmengine was never imported for real (the fake was removed after saving).
    assert "mmengine" not in sys.modules


@pytest.mark.slow  # seconds: the quick subset keeps under its budget
def test_class_names_travel_with_weights(reference, tmp_path):
    model, x, _ = reference
    sd = model.state_dict()
    torch.save({"meta": {"CLASSES": LONG_NAMES}, "state_dict": openmmlab_keys(sd)},
               tmp_path / "a.pth")
    make_mmpretrain_1x(sd, tmp_path / "b.pth")
    torch.save(sd, tmp_path / "c.pth")
    for name in ("a.pth", "b.pth"):
        _, loaded, _ = logits_after_loading(tmp_path / name, x)
        assert loaded.class_names == LONG_NAMES
    _, loaded, _ = logits_after_loading(tmp_path / "c.pth", x)
    # No names in the file: the ImageNet-1k names, checked against torchvision's list
    # (which disambiguates two of them: 'crane bird', 'maillot tank suit').
    tv_names = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1.meta["categories"]
    assert sum(a == b for a, b in zip(loaded.class_names, tv_names)) == 998
    assert loaded.class_names[12] == "house finch"


def test_mmpretrain_foreign_objects_stay_inert(reference, tmp_path):
    model, _, _ = reference
    make_mmpretrain_1x(model.state_dict(), tmp_path / "m.pth")
    ckpt = read_checkpoint(tmp_path / "m.pth")
    assert isinstance(ckpt.raw["message_hub"]["log_scalars"]["train/loss"], unpickling._Inert)
    assert isinstance(ckpt.raw["param_schedulers"][0]["hook"], unpickling._Inert)  # getattr never ran
    assert ckpt.raw["meta"]["epoch"] == 100
    # Without our stand-ins, torch itself refuses the file.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "m.pth", weights_only=True)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["zip", "legacy", "plain pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Payload(marker)}
    path = tmp_path / "evil.pth"
    if how == "plain pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save(evil, path, _use_new_zipfile_serialization=(how == "zip"))
    # Sanity: an unsafe load would run the payload.
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"evil\.pth: refused to load"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="refused"):
        resnext.resnext50_32x4d(pretrained=str(path))
    assert not marker.exists()


def test_not_a_checkpoint_names_the_file(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.pth"):
        read_checkpoint(tmp_path / "notes.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: no state dict found"):
        read_checkpoint(tmp_path / "odd.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint(tmp_path / "missing.pth")


def test_safetensors_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    save_file({"fc.bias": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails
    with pytest.raises(ValueError, match=r"m\.safetensors: .*pip install safetensors"):
        read_checkpoint(tmp_path / "m.safetensors")


def blank_state_dict(factory) -> dict:
    """The model's keys and shapes holding zeros, without drawing random weights."""
    with torch.device("meta"):
        model = factory()
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_wrong_architecture_fails_listing_keys(tmp_path):
    # A 101 checkpoint into a 50: the extra blocks of layer3 are listed.
    big = blank_state_dict(resnext.resnext101_32x4d)
    torch.save({"state_dict": openmmlab_keys(big)}, tmp_path / "r101.pth")
    with pytest.raises(ValueError) as err:
        load_weights(resnext.resnext50_32x4d(), tmp_path / "r101.pth", verbose=True)
    msg = str(err.value)
    assert msg.splitlines()[0] == (f"{tmp_path / 'r101.pth'} holds resnext101_32x4d "
                                   f"(1000 classes); the model is resnext50_32x4d")
    assert "unexpected (" in msg
    assert "layer3.6.conv1.weight" in msg and "layer3.22.bn3.running_var" in msg
    # Deep-stem (ResNetV1d-style) checkpoint: stem keys unknown, conv1 missing.
    sd = resnext.resnext50_32x4d().state_dict()
    deep = {k: v for k, v in sd.items() if not k.startswith(("conv1.", "bn1."))}
    deep["stem.0.conv.weight"] = torch.zeros(32, 3, 3, 3)
    deep["stem.0.bn.weight"] = torch.zeros(32)
    torch.save({"state_dict": openmmlab_keys(deep)}, tmp_path / "deep.pth")
    with pytest.raises(ValueError) as err:
        load_weights(resnext.resnext50_32x4d(), tmp_path / "deep.pth")
    msg = str(err.value)
    assert "missing (5): conv1.weight, bn1.weight, bn1.bias, bn1.running_mean" in msg
    assert "stem.0.conv.weight" in msg and "stem.0.bn.weight" in msg
    # A 32x8d into 32x4d: same keys, wrong shapes, listed.
    torch.save(blank_state_dict(resnext.resnext101_32x8d), tmp_path / "x8.pth")
    shapes = r"layer1\.0\.conv1\.weight \(256, 64, 1, 1\) vs model \(128, 64, 1, 1\)"
    with pytest.raises(ValueError, match=shapes):
        load_weights(resnext.resnext101_32x4d(), tmp_path / "x8.pth")
    # Keys of another head are placed nowhere: listed by the converter.
    torch.save({"state_dict": {**openmmlab_keys(sd), "neck.proj.weight": torch.zeros(1)}},
               tmp_path / "neck.pth")
    with pytest.raises(ValueError, match=r"neck\.pth: 1 keys have no place .*neck\.proj\.weight"):
        read_checkpoint(tmp_path / "neck.pth")


def test_missing_num_batches_tracked_is_tolerated(reference, tmp_path):
    model, x, expected = reference
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    logits, _, _ = logits_after_loading(tmp_path / "old.pth", x)
    assert torch.equal(logits, expected)
    # The factory path builds on the meta device and assigns the file's tensors: the missing
    # counters get real zeros, and frozen stages stay frozen.
    built = resnext.resnext50_32x4d(pretrained=str(tmp_path / "old.pth"), frozen_stages=1)
    assert not any(t.is_meta for t in built.state_dict().values())
    assert built.layer1[0].bn1.num_batches_tracked.item() == 0
    assert not built.layer1[0].conv1.weight.requires_grad
    assert built.layer2[0].conv1.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(built.eval()(x), expected)
    del sd["layer1.0.bn1.running_var"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing \(1\): layer1\.0\.bn1\.running_var"):
        load_weights(resnext.resnext50_32x4d(), tmp_path / "broken.pth")


def test_head_mismatch_with_and_without_reset(reference, tmp_path):
    model, x, _ = reference
    torch.save({"meta": {"CLASSES": LONG_NAMES}, "state_dict": openmmlab_keys(model.state_dict())},
               tmp_path / "in1k.pth")
    with pytest.raises(resnext.CheckpointError, match="has 1000 classes, the model's has 2; "
                       "to use the file's 1000-class head, build the model with "
                       "num_classes=1000 or get_model.*pass reset_head=True") as error:
        resnext.resnext50_32x4d(num_classes=2, pretrained=str(tmp_path / "in1k.pth"))
    assert isinstance(error.value, ValueError)  # what callers caught before the error types
    # Without num_classes a factory takes the file's head, as get_model does.
    assert resnext.resnext50_32x4d(pretrained=str(tmp_path / "in1k.pth")).fc.out_features == 1000
    tuned = resnext.resnext50_32x4d(num_classes=2, pretrained=str(tmp_path / "in1k.pth"),
                                    reset_head=True)
    # The new head has mmpretrain's init (Normal(0, 0.01), zero bias); the rest is the file's.
    assert tuned.fc.weight.shape == (2, 2048) and not tuned.fc.weight.is_meta
    assert abs(tuned.fc.weight.std().item() - 0.01) < 0.001 and (tuned.fc.bias == 0).all()
    assert tuned.fc.weight.requires_grad
    assert torch.equal(tuned.layer4[2].conv3.weight, model.layer4[2].conv3.weight)
    assert not any(t.is_meta for t in tuned.state_dict().values())
    assert tuned.class_names is None
    report = load_weights(resnext.resnext50_32x4d(num_classes=2), tmp_path / "in1k.pth",
                          reset_head=True)
    assert report.skipped == ["fc.bias", "fc.weight"] and "reset_head" in str(report)


def test_export_openmmlab_round_trip(reference, tmp_path):
    model, x, expected = reference
    path = export_openmmlab(model, tmp_path / "sub" / "rx50_for_mmdet.pth", classes=LONG_NAMES)
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["CLASSES"] == LONG_NAMES
    assert raw["meta"]["dataset_meta"]["classes"] == LONG_NAMES
    assert set(raw["state_dict"]) == {f"backbone.{k}" for k in model.state_dict()
                                      if not k.startswith("fc.")} | {"head.fc.weight",
                                                                     "head.fc.bias"}
    ckpt = read_checkpoint(path)
    own = model.state_dict()
    assert ckpt.state_dict.keys() == own.keys()
    assert all(torch.equal(ckpt.state_dict[k], own[k]) for k in own)
    logits, loaded, _ = logits_after_loading(path, x)
    assert torch.equal(logits, expected) and loaded.class_names == LONG_NAMES
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temporary file


def test_released_table_and_names():
    assert RELEASED_WEIGHTS["resnext50-32x4d_8xb32_in1k"] is RELEASED_WEIGHTS["resnext50_32x4d"]
    r = RELEASED_WEIGHTS["resnext101_32x8d"]
    assert (r.top1, r.top5) == (79.27, 94.58)
    assert r.url.endswith("resnext101_32x8d_b32x8_imagenet_20210506-23a247d5.pth")
    assert {w.factory for w in RELEASED_WEIGHTS.values() if w.publisher == "mmpretrain"} == {
        "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d"}
    with pytest.raises(ValueError, match="resnext101_64x4d has no released OpenMMLab weights"):
        resnext.resnext101_64x4d(pretrained=True)
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*resnext50_32x4d"):
        get_model("resnet50")
    assert get_model("resnext152-32x4d_8xb32_in1k", num_classes=3).depth == 152


# --- download through a local HTTP server -----------------------------------------------------

@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve tmp_path/'www' on 127.0.0.1; yields (base_url, folder, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, fmt, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    torch_home = tmp_path / "hub"
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(torch_home))
    try:
        yield f"http://127.0.0.1:{server.server_port}", root, requests
    finally:
        torch.hub.set_dir(old)
        server.shutdown()


def _sha8(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


@pytest.mark.slow  # seconds: the quick subset keeps under its budget
def test_pretrained_download_hash_and_cache(reference, tmp_path, http_server, monkeypatch):
    base, www, requests = http_server
    model, x, expected = reference
    staging = tmp_path / "release.pth"
    torch.save({"meta": {"CLASSES": LONG_NAMES}, "state_dict": openmmlab_keys(model.state_dict())},
               staging, _use_new_zipfile_serialization=False)
    good_name = f"rx50_b32x8_imagenet-{_sha8(staging)}.pth"
    (www / good_name).write_bytes(staging.read_bytes())
    entry = replace(RELEASED_WEIGHTS["resnext50_32x4d"], url=f"{base}/{good_name}")
    monkeypatch.setitem(RELEASED_WEIGHTS, "resnext50_32x4d", entry)

    loaded = resnext.resnext50_32x4d(pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert loaded.class_names == LONG_NAMES
    cached = Path(torch.hub.get_dir()) / "checkpoints" / good_name
    assert cached.is_file() and requests == [f"/{good_name}"]
    get_model("resnext50-32x4d_8xb32_in1k", pretrained=True)  # from the cache
    assert requests == [f"/{good_name}"]

    # A name whose hash prefix does not match: clear error, nothing cached.
    bad_name = "rx50_b32x8_imagenet-0123abcd.pth"
    (www / bad_name).write_bytes(staging.read_bytes())
    with pytest.raises(RuntimeError, match=r"failed its SHA-256 check.*0123abcd"):
        resnext.resnext50_32x4d(pretrained=f"{base}/{bad_name}")
    assert not (cached.parent / bad_name).exists()
    assert not [p for p in cached.parent.iterdir() if p.name != good_name]

    # A cached file that was altered later is caught too.
    # (Flip the last byte: a legacy file ends with a storage chosen by memory address, sometimes
    # a zero num_batches_tracked, so writing a zero there would leave the file unchanged.)
    altered = bytearray(cached.read_bytes())
    altered[-1] ^= 0xFF
    cached.write_bytes(bytes(altered))
    with pytest.raises(RuntimeError, match="delete it to download again"):
        resnext.resnext50_32x4d(pretrained=True)


def test_no_network_names_url_and_local_option(http_server, monkeypatch):
    base, _, _ = http_server
    # Every outside connection goes to a closed local port: nothing leaves the machine.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy")
    monkeypatch.delenv("NO_PROXY")
    url = RELEASED_WEIGHTS["resnext50_32x4d"].url
    with pytest.raises(RuntimeError) as err:
        resnext.resnext50_32x4d(pretrained=True)
    msg = str(err.value)
    assert url in msg and "pretrained='/path/to/" in msg and "--checkpoint" in msg
