"""The registry of published weights: its facts against torchvision's own weight enums, the
names, and a known file keeping its preprocessing and class names however it arrives."""
import dataclasses
import hashlib

import pytest
import torch

import resnext
from resnext import releases, weights
from conftest import randomize_


def test_torchvision_entries_are_torchvisions_facts():
    from torchvision import models
    from torchvision.transforms import InterpolationMode
    entries = [r for r in resnext.list_weights() if r.publisher == "torchvision"]
    assert len(entries) == 5
    for entry in entries:
        tag = {"tv_in1k": "IMAGENET1K_V1", "tv2_in1k": "IMAGENET1K_V2"}[entry.name.split(".")[1]]
        enum = models.get_model_weights(entry.factory)[tag]
        transform = enum.transforms()
        assert entry.url == enum.url
        metrics = enum.meta["_metrics"]["ImageNet-1K"]
        assert (entry.top1, entry.top5) == (metrics["acc@1"], metrics["acc@5"])
        assert entry.file_size_mb == enum.meta["_file_size"]
        p = entry.preprocessing
        assert ([p.crop_size], [p.resize_size]) == (transform.crop_size, transform.resize_size)
        assert transform.interpolation == InterpolationMode.BILINEAR == {
            "bilinear": InterpolationMode.BILINEAR}[p.interpolation]
        assert list(p.mean) == transform.mean and list(p.std) == transform.std
        assert entry.class_names == enum.meta["categories"]
        with torch.device("meta"):  # shapes only, no weights drawn
            built = getattr(resnext, entry.factory)()
        assert enum.meta["num_params"] == sum(t.numel() for t in built.parameters())


def test_names_follow_one_scheme_and_the_default_stays_mmpretrain():
    names = [r.name for r in resnext.list_weights()]
    assert all(n.split(".")[0] in resnext.list_models() and n.split(".")[1] in (
        "mmpretrain_in1k", "tv_in1k", "tv2_in1k") for n in names)
    assert len(names) == len(set(names)) == 9
    for factory in ("resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d",
                    "resnext152_32x4d"):
        assert resnext.RELEASED_WEIGHTS[factory].name == f"{factory}.mmpretrain_in1k"
    assert "resnext101_64x4d" not in resnext.RELEASED_WEIGHTS  # no mmpretrain release
    with pytest.raises(resnext.ConfigError, match="resnext101_64x4d.tv_in1k"):
        resnext.resnext101_64x4d(pretrained=True)  # the message lists what there is
    with pytest.raises(resnext.ConfigError, match="unknown weights 'tv3_in1k'"):
        resnext.resnext50_32x4d(weights="tv3_in1k")
    with pytest.raises(resnext.ConfigError, match="holds resnext50_32x4d weights, not"):
        resnext.resnext101_32x8d(weights="resnext50_32x4d.tv2_in1k")


def _random_file(path):
    model = randomize_(resnext.resnext50_32x4d(), seed=3)
    torch.save(model.state_dict(), path)  # a plain state dict, as torchvision publishes
    return model


@pytest.mark.slow
def test_a_known_file_keeps_its_preprocessing_by_name(tmp_path):
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    model = _random_file(hub / "resnext50_32x4d-1a0047aa.pth")  # the V2 file's name
    loaded = resnext.get_model(pretrained=str(hub / "resnext50_32x4d-1a0047aa.pth"))
    info = loaded.weights_info
    assert info.release == "resnext50_32x4d.tv2_in1k"
    assert (info.preprocessing.resize_size, info.preprocessing.crop_size) == (232, 224)
    assert loaded.class_names[134] == "crane bird"  # torchvision's names
    assert "the registry's resnext50_32x4d.tv2_in1k (resize 232, crop 224)" in str(
        info.load_report)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    prepared = resnext.load_for_inference(None, hub / "resnext50_32x4d-1a0047aa.pth",
                                          torch.device("cpu"))
    assert prepared.preprocessing.resize_size == 232  # what predict/evaluate use
    # The same file under another name matches nothing and keeps the standard pipeline.
    other = tmp_path / "mine.pth"
    other.write_bytes((hub / "resnext50_32x4d-1a0047aa.pth").read_bytes())
    plain = resnext.get_model(pretrained=str(other))
    assert plain.weights_info.release is None and plain.preprocessing.resize_size == 256


@pytest.mark.slow
def test_a_known_file_is_recognised_by_its_hash(tmp_path):
    path = tmp_path / "renamed.pth"
    _random_file(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    size_mb = path.stat().st_size / 1e6
    entry = dataclasses.replace(resnext.RELEASED_WEIGHTS["resnext50_32x4d.tv2_in1k"],
                                url=f"https://example.invalid/resnext50_32x4d-{digest[:8]}.pth",
                                file_size_mb=round(size_mb, 3))
    assert releases.match_release(path, [entry]) is entry
    wrong = dataclasses.replace(entry, url="https://example.invalid/x-00000000.pth")
    assert releases.match_release(path, [wrong]) is None


@pytest.mark.slow
def test_weights_by_registry_name_in_every_entry_point(tmp_path, monkeypatch):
    path = tmp_path / "resnext50_32x4d-1a0047aa.pth"
    model = _random_file(path)
    entry = dataclasses.replace(resnext.RELEASED_WEIGHTS["resnext50_32x4d.tv2_in1k"],
                                url=path.as_uri())  # served from disk, no network
    monkeypatch.setitem(weights.RELEASED_WEIGHTS, "resnext50_32x4d.tv2_in1k", entry)
    for built in (resnext.resnext50_32x4d(weights="tv2_in1k"),
                  resnext.get_model("resnext50_32x4d.tv2_in1k", pretrained=True),
                  resnext.get_model(pretrained="resnext50_32x4d.tv2_in1k"),
                  resnext.load_for_inference("resnext50_32x4d.tv2_in1k", None,
                                             torch.device("cpu")).net):
        assert torch.equal(built.fc.weight, model.fc.weight)
    prepared = resnext.load_for_inference("resnext50_32x4d.tv2_in1k", None, torch.device("cpu"))
    assert prepared.preprocessing.resize_size == 232 and prepared.class_names[639] == (
        "maillot tank suit")
