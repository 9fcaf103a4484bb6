"""The registry of published weights: its facts against torchvision's own weight enums, the
names, and a known file keeping its preprocessing and class names however it arrives."""
import dataclasses
import hashlib

import pytest
import torch

import resnext
from resnext import releases, weights
from conftest import randomize_
from resnext.transforms import Preprocessing
import test_checkpoint

http_server = test_checkpoint.http_server  # the fixture: a server on 127.0.0.1, a tmp hub dir


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
        assert entry.file_size_mib == enum.meta["_file_size"]
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
def test_a_known_file_keeps_its_preprocessing_by_name(tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    scratch = tmp_path / "weights.pth"
    model = _random_file(scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    # As if our file were the V2 file (the real one is not here); no size: only the name,
    # and the hash prefix it carries, can match.
    entry = _as_if_published(resnext.RELEASED_WEIGHTS[V2], digest, file_size_mib=None)
    _with_entry(monkeypatch, entry)
    path = hub / entry.file_name
    scratch.rename(path)
    loaded = resnext.get_model(pretrained=str(path))
    _assert_is_v2(loaded, model)
    prepared = resnext.load_for_inference(None, path, torch.device("cpu"))
    assert prepared.preprocessing.resize_size == 232  # what predict/evaluate use
    # The same file under another name matches nothing and keeps the standard pipeline.
    other = tmp_path / "mine.pth"
    other.write_bytes(path.read_bytes())
    plain = resnext.get_model(pretrained=str(other))
    assert plain.weights_info.release is None and plain.preprocessing.resize_size == 256


@pytest.mark.slow
def test_a_file_bearing_a_registry_name_is_not_taken_for_it(tmp_path):
    # A 2-class train.py checkpoint saved under the published V2 file's name: its SHA-256
    # does not start with the prefix in the name, so it keeps its own classes and 64 px
    # preprocessing rather than the entry's 1000 names and resize 232.
    path = tmp_path / resnext.RELEASED_WEIGHTS[V2].file_name
    model = randomize_(resnext.resnext50_32x4d(num_classes=2), seed=4)
    stored = Preprocessing(64)
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": "resnext50_32x4d", "classes": ["ants", "bees"],
                         "preprocessing": stored.to_dict()}}, path)
    loaded = resnext.get_model(pretrained=str(path))
    assert loaded.weights_info.release is None and "the registry's" not in str(
        loaded.weights_info.load_report)
    assert list(loaded.class_names) == ["ants", "bees"] and loaded.num_classes == 2
    assert loaded.preprocessing == stored and loaded.preprocessing.resize_size == 73  # 64/0.875
    # A plain state dict under that name: the standard pipeline, not the entry's.
    _random_file(path)
    plain = resnext.get_model(pretrained=str(path))
    assert plain.weights_info.release is None and plain.preprocessing.resize_size == 256


@pytest.mark.slow
def test_a_known_file_is_recognised_by_its_hash(tmp_path):
    path = tmp_path / "renamed.pth"
    _random_file(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    size_mib = path.stat().st_size / 2**20
    entry = dataclasses.replace(resnext.RELEASED_WEIGHTS["resnext50_32x4d.tv2_in1k"],
                                url=f"https://example.invalid/resnext50_32x4d-{digest[:8]}.pth",
                                file_size_mib=round(size_mib, 3))
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


# --- the match on a file downloaded from a local HTTP server ------------------------------------

V2 = "resnext50_32x4d.tv2_in1k"


@pytest.fixture(scope="module")
def served_file(tmp_path_factory):
    """A plain resnext50 state dict with random weights, its model and its SHA-256 (hashlib)."""
    path = tmp_path_factory.mktemp("served") / "weights.pth"
    model = _random_file(path)
    return path, model, hashlib.sha256(path.read_bytes()).hexdigest()


def _as_if_published(real, digest: str, **changes):
    """`real` with its URL's file name carrying `digest`'s prefix, as if that were the published
    file (the real one is not here): `<stem>-<sha256[:8]>.pth`, the registry's own scheme."""
    folder, name = real.url.rsplit("/", 1)
    return dataclasses.replace(real, url=f"{folder}/{name.rsplit('-', 1)[0]}-{digest[:8]}.pth",
                               **changes)


def _with_entry(monkeypatch, entry):
    """The registry with `entry` in place of the entry of that name (the others kept)."""
    monkeypatch.setattr(releases, "RELEASES",
                        [entry if r.name == entry.name else r for r in releases.RELEASES])


def _torchvision_v2():
    from torchvision import models
    return models.get_model_weights("resnext50_32x4d")["IMAGENET1K_V2"]


def _assert_is_v2(loaded, model):
    enum = _torchvision_v2()  # the facts, from torchvision rather than our registry
    info = loaded.weights_info
    assert info.release == V2
    pre = info.preprocessing
    assert ([pre.crop_size], [pre.resize_size]) == (enum.transforms().crop_size,
                                                    enum.transforms().resize_size) == ([224], [232])
    assert list(loaded.class_names) == enum.meta["categories"]
    assert f"the registry's {V2} (resize 232, crop 224)" in str(info.load_report)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


@pytest.mark.slow
def test_a_file_downloaded_under_a_registry_name_keeps_its_preprocessing(
        served_file, http_server, tmp_path, monkeypatch):
    base, www, requests = http_server
    path, model, digest = served_file
    real = resnext.RELEASED_WEIGHTS[V2]
    # Under the published name itself, our bytes fail the hash the name carries: refused,
    # nothing cached (the name alone is not trusted over HTTP).
    (www / real.file_name).write_bytes(path.read_bytes())
    with pytest.raises(resnext.DownloadError, match="failed its SHA-256 check"):
        resnext.get_model(pretrained=f"{base}/{real.file_name}")
    hub = tmp_path / "hub" / "checkpoints"  # http_server's torch.hub dir, not the user's
    assert not (hub / real.file_name).exists()

    # An entry whose name carries our file's hash, and no size: only the name can match.
    entry = _as_if_published(real, digest, file_size_mib=None)
    _with_entry(monkeypatch, entry)
    (www / entry.file_name).write_bytes(path.read_bytes())
    url = f"{base}/{entry.file_name}"
    loaded = resnext.get_model(pretrained=url)
    assert (hub / entry.file_name).is_file()
    assert requests == [f"/{real.file_name}", f"/{entry.file_name}"]
    _assert_is_v2(loaded, model)
    prepared = resnext.load_for_inference(None, url, torch.device("cpu"))  # predict/evaluate
    assert prepared.preprocessing.resize_size == 232 and prepared.class_names[134] == "crane bird"
    assert len(requests) == 2  # from the cache


@pytest.mark.slow
def test_a_renamed_file_downloaded_is_recognised_by_size_and_hash(
        served_file, http_server, tmp_path, monkeypatch):
    base, www, requests = http_server
    path, model, digest = served_file
    # Its own size in MiB, as torchvision publishes sizes (a 0.001 MiB rounding).
    entry = _as_if_published(resnext.RELEASED_WEIGHTS[V2], digest,
                             file_size_mib=round(path.stat().st_size / 2**20, 3))
    _with_entry(monkeypatch, entry)
    renamed = "finetune_copy.pth"  # no entry's name, no hash in it
    assert renamed not in {r.file_name for r in releases.RELEASES}
    (www / renamed).write_bytes(path.read_bytes())
    loaded = resnext.get_model(pretrained=f"{base}/{renamed}")
    assert (tmp_path / "hub" / "checkpoints" / renamed).is_file()
    _assert_is_v2(loaded, model)
    prepared = resnext.load_for_inference(None, f"{base}/{renamed}", torch.device("cpu"))
    assert prepared.preprocessing.resize_size == 232
    assert requests == [f"/{renamed}"]


@pytest.mark.slow
def test_a_downloaded_file_matching_nothing_keeps_the_standard_pipeline(
        served_file, http_server, monkeypatch):
    base, www, requests = http_server
    path, model, digest = served_file
    # The right size, another hash: the hash is really compared, the size alone is not enough.
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    _with_entry(monkeypatch, _as_if_published(resnext.RELEASED_WEIGHTS[V2], wrong,
                                              file_size_mib=round(path.stat().st_size / 2**20, 3)))
    (www / "mine.pth").write_bytes(path.read_bytes())
    loaded = resnext.get_model(pretrained=f"{base}/mine.pth")
    local = resnext.get_model(pretrained=str(path))  # the same file, read from disk
    info = loaded.weights_info
    assert info.release is None and "the registry's" not in str(info.load_report)
    assert (info.preprocessing.resize_size, info.preprocessing.crop_size) == (256, 224)
    assert info.preprocessing == local.weights_info.preprocessing
    assert loaded.class_names == local.class_names and loaded.class_names[134] != "crane bird"
    assert torch.equal(loaded.fc.weight, model.fc.weight) and requests == ["/mine.pth"]


@pytest.mark.slow
def test_a_renamed_release_matches_at_its_published_size(served_file):
    path, _, digest = served_file
    real = resnext.RELEASED_WEIGHTS[V2]
    # Our file holds the V2 file's tensors, saved by torch.save: the published 95.833 is its
    # size in MiB (2**20 bytes), not in MB.
    assert abs(path.stat().st_size / 2 ** 20 - real.file_size_mib) < 0.05
    entry = _as_if_published(real, digest)  # the published size kept
    assert releases.match_release(path, [entry]) is entry
