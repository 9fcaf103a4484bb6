"""Recipe parts beside mmpretrain's (resnext.recipes, train.py's recipe options), checked
against independent computations: the parameter groups by module type, the lr of every epoch
by a hand formula, MixUp/CutMix targets recovered from the mixed pixels."""
import json
import math
import shutil
import sys

import pytest
import torch
from torch import nn

import resnext
from resnext.recipes import BatchMixer, build_optimizer, build_scheduler, parameter_groups
from conftest import HYMENOPTERA, REPO


def _owner_is_norm(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, nn.BatchNorm2d)  # the only normalisation ResNeXt has


def test_parameter_groups_follow_module_types():
    model = resnext.resnext50_32x4d(num_classes=3, frozen_stages=1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = {g["name"]: g for g in parameter_groups(model, 1e-4, norm_weight_decay=0.0,
                                                     bias_weight_decay=2e-5)}
    ids = {key: {id(p) for p in g["params"]} for key, g in groups.items()}
    # Independent rule: the parameter's own name says bias; its owning module says norm.
    want_bias = {id(p) for n, p in named if n.endswith(".bias") and not _owner_is_norm(model, n)}
    want_bias |= {id(p) for n, p in named if n.endswith(".bias") and _owner_is_norm(model, n)}
    want_norm = {id(p) for n, p in named if _owner_is_norm(model, n)} - want_bias
    assert ids["bias"] == want_bias and ids["norm"] == want_norm
    assert ids["other"] == {id(p) for _, p in named} - want_bias - want_norm
    assert (groups["other"]["weight_decay"], groups["norm"]["weight_decay"],
            groups["bias"]["weight_decay"]) == (1e-4, 0.0, 2e-5)
    # Frozen stem and stage 1 are in no group; the only non-norm bias is the classifier's.
    frozen = {id(p) for p in model.conv1.parameters()} | {id(p) for p in model.layer1.parameters()}
    assert not frozen & set().union(*ids.values())
    assert {n for n, p in named if id(p) in want_bias and not _owner_is_norm(model, n)} == {
        "fc.bias"}
    # Norm decay alone: norm weights and biases together, the fc bias with the rest.
    norm_only = {g["name"]: g for g in parameter_groups(model, 1e-4, norm_weight_decay=0.0)}
    assert {id(p) for p in norm_only["norm"]["params"]} == {
        id(p) for n, p in named if _owner_is_norm(model, n)}
    assert [g["name"] for g in parameter_groups(model, 1e-4)] == ["other"]


@pytest.mark.parametrize("kind,warmup", [("cosine", 5), ("cosine", 0), ("step", 3)])
def test_lr_of_every_epoch_matches_the_hand_formula(kind, warmup):
    base, epochs, factor, min_lr = 0.5, 30, 0.01, 1e-5
    milestones = (10, 20)
    param = nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer("sgd", [param], base, 0.9, 0.0)
    scheduler = build_scheduler(optimizer, kind, epochs, milestones, 0.1, warmup, factor,
                                min_lr)
    for epoch in range(epochs):
        if epoch < warmup:   # linear from base x factor, torchvision's LinearLR
            want = base * (factor + (1 - factor) * epoch / warmup)
        elif kind == "cosine":
            t, span = epoch - warmup, epochs - warmup
            want = min_lr + (base - min_lr) * (1 + math.cos(math.pi * t / span)) / 2
        else:                # milestones are absolute epochs
            want = base * 0.1 ** sum(epoch >= m for m in milestones)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9), epoch
        optimizer.step()
        scheduler.step()


def test_recipe_errors_are_clear():
    param = nn.Parameter(torch.zeros(1))
    with pytest.raises(resnext.ConfigError, match="optimizer must be"):
        build_optimizer("lamb", [param], 0.1, 0.9, 0.0)
    optimizer = build_optimizer("adamw", [param], 0.1, 0.9, 0.05)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    with pytest.raises(resnext.ConfigError, match="--warmup-epochs 10 must be below"):
        build_scheduler(optimizer, "cosine", 10, warmup_epochs=10)


def _two_images():
    photos = sorted((HYMENOPTERA / "val" / "bees").iterdir())[:4]
    from resnext.transforms import eval_transform
    return torch.stack([eval_transform(64)(resnext.load_image(p)) for p in photos])


def test_mixup_targets_carry_the_pixel_mixing_weight():
    images, labels = _two_images(), torch.tensor([0, 1, 2, 1])
    mixed, targets = BatchMixer(3, mixup_alpha=0.2, seed=0)(images, labels, 0, 5)
    assert targets.shape == (4, 3) and torch.allclose(targets.sum(1), torch.ones(4))
    # torchvision mixes each image with the next one of the batch (a roll by 1).
    partner = images.roll(1, 0)
    differ = (images - partner).abs() > 0.5
    lam = ((mixed - partner)[differ] / (images - partner)[differ]).mean().item()
    hand = lam * nn.functional.one_hot(labels, 3) + (1 - lam) * nn.functional.one_hot(
        labels.roll(1), 3)
    assert torch.allclose(targets, hand.float(), atol=1e-4)


def test_cutmix_targets_carry_the_pasted_area():
    images, labels = _two_images(), torch.tensor([0, 1, 2, 0])
    for index in range(6):
        mixed, targets = BatchMixer(3, cutmix_alpha=1.0, seed=1)(images, labels, 0, index)
        assert torch.allclose(targets.sum(1), torch.ones(4))
        pasted = (mixed != images).any(dim=1)[0]  # (H, W): pixels taken from the partner
        area = pasted.float().mean().item()
        own = targets[0, labels[0]].item() - (labels[0] == labels[-1]).float().item() * area
        assert own == pytest.approx(1 - area, abs=2 / 64)  # one row of pixels of slack


def test_batch_mixing_depends_on_seed_epoch_and_batch_only():
    images, labels = _two_images(), torch.tensor([0, 1, 2, 1])
    mixer = BatchMixer(3, mixup_alpha=0.2, cutmix_alpha=1.0, seed=3)
    a = mixer(images, labels, 2, 7)
    torch.rand(100)  # whatever else drew from the RNG in between
    b = mixer(images, labels, 2, 7)
    c = mixer(images, labels, 2, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_auto_augment_and_random_erase_in_torchvision_order():
    from torchvision import transforms as T
    tf = resnext.train_transform(64, auto_augment="ta_wide", random_erase=0.1)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.TrivialAugmentWide,
                     T.ToTensor, T.Normalize, T.RandomErasing]
    assert tf.transforms[-1].p == 0.1
    assert [type(t) for t in resnext.train_transform(64).transforms] == [
        T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    with pytest.raises(resnext.ConfigError, match="auto-augment must be one of"):
        resnext.train_transform(64, auto_augment="augmix")


@pytest.mark.slow
def test_train_with_the_modern_recipe_options(tmp_path):
    import subprocess
    data = tmp_path / "data"
    for split, n in (("train", 8), ("val", 3)):
        for name in ("ants", "bees"):
            (data / split / name).mkdir(parents=True)
            for photo in sorted((HYMENOPTERA / split / name).iterdir())[:n]:
                shutil.copy(photo, data / split / name / photo.name)
    work = tmp_path / "work"
    cmd = [sys.executable, "train.py", "--data", str(data), "--work-dir", str(work),
           "--batch-size", "4", "--workers", "0", "--epochs", "4", "--lr", "0.2",
           "--lr-scheduler", "cosine", "--warmup-epochs", "2", "--label-smoothing", "0.1",
           "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--auto-augment", "ta_wide",
           "--random-erase", "0.1", "--weight-decay", "2e-5", "--norm-weight-decay", "0",
           "--train-crop-size", "48", "--val-resize-size", "64", "--val-crop-size", "56",
           "--optimizer", "sgd"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    header = records[0]["args"]
    assert (header["train_crop_size"], header["val_crop_size"], header["val_resize_size"]) == (
        48, 56, 64)
    epochs = [r for r in records if r["type"] == "epoch"]
    for r in epochs:  # the lr each epoch ran at: warmup then cosine, by hand
        e = r["epoch"] - 1
        want = 0.2 * (0.01 + 0.99 * e / 2) if e < 2 else 0.2 * (1 + math.cos(
            math.pi * (e - 2) / 2)) / 2
        assert r["lr"] == pytest.approx(want, rel=1e-9)
    assert len(epochs) == 4 and all(math.isfinite(r["train_loss"]) for r in epochs)
    saved = torch.load(work / "last.pth", weights_only=True)
    assert saved["meta"]["preprocessing"]["crop_size"] == 56
    assert saved["meta"]["preprocessing"]["resize_size"] == 64
    # --fast-decode cannot do TrivialAugment: said at once.
    res = subprocess.run(cmd + ["--fast-decode"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "--fast-decode does the default recipe" in res.stderr


# --- fine-tuning kit ----------------------------------------------------------------------------

def test_balanced_sampler_draws_classes_uniformly_and_shards_one_draw():
    from resnext.datasets import BalancedDistributedSampler
    targets = [0] * 90 + [1] * 9 + [2] * 1  # 90 : 9 : 1
    shards = [BalancedDistributedSampler(targets, 2, rank, seed=4) for rank in (0, 1)]
    for s in shards:
        s.set_epoch(3)
    drawn = [list(s) for s in shards]
    assert len(drawn[0]) == len(drawn[1]) == len(shards[0]) == 50
    # Rank shards interleave one draw: rebuilt, it is the single-process draw.
    single = BalancedDistributedSampler(targets, 1, 0, seed=4)
    single.set_epoch(3)
    assert [i for pair in zip(*drawn) for i in pair] == list(single)
    # Over many epochs each class comes a third of the time (each image of class c: 1/(3 n_c)).
    counts = torch.zeros(3)
    for epoch in range(200):
        single.set_epoch(epoch)
        counts += torch.bincount(torch.tensor([targets[i] for i in single]), minlength=3)
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.02)
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert first != list(single)


def test_inverse_frequency_weights_by_hand():
    from resnext.recipes import inverse_frequency_weights
    weights = inverse_frequency_weights([0] * 6 + [1] * 3 + [2] * 1, num_classes=4)
    # N / (C n_c) with N 10, C 4: 10/24, 10/12, 10/4, and 0 for the class without images.
    assert torch.allclose(weights, torch.tensor([10 / 24, 10 / 12, 10 / 4, 0.0]))


def test_lr_multipliers_give_head_and_backbone_their_lr():
    from resnext.recipes import with_lr_multipliers
    model = resnext.resnext50_32x4d(num_classes=3)
    groups = with_lr_multipliers(parameter_groups(model, 1e-4, norm_weight_decay=0.0), model,
                                 0.01, head_lr_mult=10.0)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone/other", "backbone/norm", "head/other"}
    assert {id(p) for p in by_name["head/other"]["params"]} == {id(model.fc.weight),
                                                                id(model.fc.bias)}
    assert by_name["head/other"]["lr"] == pytest.approx(0.1)
    assert by_name["backbone/other"]["lr"] == by_name["backbone/norm"]["lr"] == 0.01
    assert by_name["backbone/norm"]["weight_decay"] == 0.0
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def _three_class_folder(root, counts=(12, 6, 3)):
    """A 3-class folder of real photos with imbalanced classes: ants, bees and demo photos."""
    sources = [sorted((HYMENOPTERA / "train" / "ants").iterdir()),
               sorted((HYMENOPTERA / "train" / "bees").iterdir()),
               sorted((REPO / "demo").iterdir())]
    for split in ("train", "val"):
        for name, photos, n in zip(("ants", "bees", "others"), sources, counts):
            (root / split / name).mkdir(parents=True)
            for photo in photos[:n if split == "train" else 2]:
                shutil.copy(photo, root / split / name / photo.name)
    return root


def _train_in_process(argv):
    sys.path.insert(0, str(REPO))
    import train
    return train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.mark.slow
def test_fine_tuning_from_a_checkpoint_with_frozen_stages_and_balanced_classes(tmp_path,
                                                                              capsys):
    data = _three_class_folder(tmp_path / "data")
    common = ["--data", data, "--img-size", "32", "--batch-size", "4", "--workers", "0",
              "--epochs", "1", "--lr", "0.05", "--seed", "2"]
    _train_in_process(common + ["--work-dir", tmp_path / "base"])  # a train.py checkpoint
    start = torch.load(tmp_path / "base" / "last.pth", weights_only=True)["state_dict"]
    _train_in_process(common + ["--work-dir", tmp_path / "tuned", "--load-from",
                                tmp_path / "base" / "last.pth", "--frozen-stages", "3",
                                "--class-balance", "sampler", "--head-lr-mult", "10"])
    out = capsys.readouterr().out
    assert "frozen: the stem and stages 1-3 (no gradients, BatchNorm in eval)" in out
    assert "class balance: sampler" in out and "head/other lr 0.5" in out
    tuned = torch.load(tmp_path / "tuned" / "last.pth", weights_only=True)["state_dict"]
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
    for key, value in start.items():
        if key.startswith(frozen):  # weights and BN statistics: bitwise unchanged
            assert torch.equal(tuned[key], value), key
    moved = [k for k in start if k.startswith(("layer4.", "fc.")) and k.endswith("weight")
             and not torch.equal(tuned[k], start[k])]
    assert "fc.weight" in moved and any(k.startswith("layer4.") for k in moved)
    # --class-balance loss runs too, and --pretrained without a release is one clear error.
    _train_in_process(common + ["--work-dir", tmp_path / "loss", "--class-balance", "loss"])
    with pytest.raises(resnext.ConfigError, match="resnext101_64x4d has no released weights"):
        _train_in_process(common + ["--work-dir", tmp_path / "x", "--model",
                                    "resnext101_64x4d", "--pretrained"])


@pytest.mark.slow
def test_pretrained_starts_from_the_released_file(tmp_path, monkeypatch, capsys):
    # The released weights, served by a local HTTP server: the download path as users hit it.
    import hashlib
    import http.server
    import threading
    from resnext import weights
    model = resnext.resnext50_32x4d()
    raw = tmp_path / "raw.pth"
    torch.save({"state_dict": {f"backbone.{k}" if not k.startswith("fc.") else f"head.{k}": v
                               for k, v in model.state_dict().items()},
                "meta": {"CLASSES": [str(i) for i in range(1000)]}}, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    served = tmp_path / "srv"
    served.mkdir()
    raw.rename(served / f"rx50-{digest}.pth")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served),
                                                                    **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        release = weights.RELEASED_WEIGHTS["resnext50_32x4d"]
        local = weights.ReleasedWeights(release.name, release.factory,
                                        f"http://127.0.0.1:{server.server_port}/"
                                        f"rx50-{digest}.pth", release.top1, release.top5)
        monkeypatch.setitem(weights.RELEASED_WEIGHTS, "resnext50_32x4d", local)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        data = _three_class_folder(tmp_path / "data", counts=(4, 4, 4))
        _train_in_process(["--data", data, "--img-size", "32", "--batch-size", "4",
                           "--workers", "0", "--epochs", "1", "--work-dir", tmp_path / "w",
                           "--pretrained", "--frozen-stages", "4", "--lr", "0.01"])
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert f"rx50-{digest}.pth" in out and "skipped fc.bias, fc.weight (reset_head)" in out
    tuned = torch.load(tmp_path / "w" / "last.pth", weights_only=True)["state_dict"]
    assert torch.equal(tuned["layer4.2.conv3.weight"], model.layer4[2].conv3.weight)
    assert tuned["fc.weight"].shape == (3, 2048)


# --- EMA, repeated augmentation, presets -----------------------------------------------------

def test_ema_decay_is_torchvisions_adjusted_decay():
    from resnext.recipes import ema_decay
    # torchvision's V2 command: 8 GPUs x 128, EMA every 32 steps, decay 0.99998, 600 epochs:
    # alpha = (1 - 0.99998) x 8 x 128 x 32 / 600 = 0.00109226..., decay = 1 - alpha.
    assert ema_decay(0.99998, 32, 8, 128, 600) == pytest.approx(1 - 2e-5 * 8 * 128 * 32 / 600)
    assert ema_decay(0.9, 32, 8, 128, 1) == 0.0  # alpha capped at 1: the EMA is the model


def test_model_ema_averages_weights_and_bn_statistics_by_hand():
    from resnext.recipes import ModelEMA
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.75)
    history = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(step + 1.0)
            model[1].running_mean.add_(2.0)
        history.append((model[0].weight.clone(), model[1].running_mean.clone()))
        ema.update_parameters(model)
    (w0, m0), (w1, m1), (w2, m2) = history
    want_w = 0.75 * (0.75 * w0 + 0.25 * w1) + 0.25 * w2  # the first update copies
    want_m = 0.75 * (0.75 * m0 + 0.25 * m1) + 0.25 * m2
    assert torch.allclose(ema.module[0].weight, want_w)
    assert torch.allclose(ema.module[1].running_mean, want_m)
    assert int(ema.n_averaged) == 3


def test_repeated_augmentation_spreads_copies_over_ranks():
    from resnext.datasets import RepeatedAugmentationSampler, SeededAugmentation
    n, world, reps, seed, epoch = 40, 4, 4, 7, 2
    shards = []
    for rank in range(world):
        sampler = RepeatedAugmentationSampler(n, world, rank, seed, reps)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    assert all(len(s) == n // world for s in shards)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    # Hand rule: the first n / reps images of the epoch's permutation, each on every rank once.
    for image in order[:n // reps]:
        holders = sorted((rank, r) for rank, s in enumerate(shards) for i, r in s if i == image)
        assert [rank for rank, _ in holders] == list(range(world))
        assert sorted(r for _, r in holders) == list(range(reps))
    # Copies of one image get different augmentations, one copy always the same.
    draws = SeededAugmentation(_RandomDataset(), seed)
    assert draws[(epoch, (5, 0))] == draws[(epoch, (5, 0))] == draws[(epoch, 5)]
    assert draws[(epoch, (5, 1))] != draws[(epoch, (5, 0))]


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(1).item()  # what a random crop would draw


def test_torchvision_v2_preset_is_the_published_command_and_flags_override_it():
    sys.path.insert(0, str(REPO))
    import train
    parser = train.get_args_parser()
    args = parser.parse_args(["--data", "x", "--recipe", "torchvision-v2"])
    # torchvision references/classification/README.md, ResNet-50 / ResNeXt V2 weights:
    # --batch-size 128 --lr 0.5 --lr-scheduler cosineannealinglr --lr-warmup-epochs 5
    # --lr-warmup-method linear --auto-augment ta_wide --epochs 600 --random-erase 0.1
    # --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2
    # --cutmix-alpha 1.0 --train-crop-size 176 --model-ema --val-resize-size 232
    # --ra-sampler --ra-reps 4 (8 GPUs; lr-warmup-decay 0.01, model-ema-steps 32,
    # model-ema-decay 0.99998 by default)
    published = dict(batch_size=128, lr=0.5, lr_scheduler="cosine", warmup_epochs=5,
                     warmup_lr_factor=0.01, auto_augment="ta_wide", epochs=600,
                     random_erase=0.1, weight_decay=2e-5, norm_weight_decay=0.0,
                     label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0,
                     train_crop_size=176, model_ema=True, val_resize_size=232, ra_reps=4,
                     model_ema_steps=32, model_ema_decay=0.99998, momentum=0.9,
                     optimizer="sgd", lr_reference_batch=8 * 128)
    assert {k: getattr(args, k) for k in published} == published
    mine = parser.parse_args(["--data", "x", "--lr", "0.2", "--recipe", "torchvision-v2",
                              "--epochs", "10"])
    assert (mine.lr, mine.epochs, mine.batch_size) == (0.2, 10, 128)  # explicit flags win
    plain = parser.parse_args(["--data", "x"])  # the same parser: no preset left behind
    assert (plain.lr, plain.epochs, plain.batch_size, plain.model_ema, plain.ra_reps) == (
        0.1, 100, 32, False, 1)


def _tiny_data(root, per_class=8, val=3):
    for split, n in (("train", per_class), ("val", val)):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for photo in sorted((HYMENOPTERA / split / name).iterdir())[:n]:
                shutil.copy(photo, root / split / name / photo.name)
    return root


@pytest.mark.slow
def test_ema_runs_end_to_end_and_resumes_bitwise(tmp_path, capsys, monkeypatch):
    import signal
    data = _tiny_data(tmp_path / "data")
    common = ["--data", data, "--img-size", "32", "--batch-size", "4", "--workers", "0",
              "--lr", "0.05", "--seed", "3", "--deterministic", "--model-ema",
              "--model-ema-steps", "1", "--model-ema-decay", "0.9", "--epochs", "2"]
    _train_in_process(common + ["--work-dir", tmp_path / "straight"])
    assert "EMA top-1" in capsys.readouterr().out
    # The same run stopped after its first epoch (as SIGTERM would: after last.pth is
    # written), then resumed: the EMA's decay depends on --epochs, which stays 2.
    import train
    line = train.epoch_line

    def stop_after_first(record, epochs):
        if record["epoch"] == 1:
            raise train.Stopped(signal.SIGTERM)
        return line(record, epochs)

    monkeypatch.setattr(train, "epoch_line", stop_after_first)
    with pytest.raises(train.Stopped):
        _train_in_process(common + ["--work-dir", tmp_path / "resumed"])
    monkeypatch.setattr(train, "epoch_line", line)
    _train_in_process(common + ["--work-dir", tmp_path / "resumed", "--resume", "auto"])
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    for part in ("state_dict",):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["ema"]["state_dict"][k], b["ema"]["state_dict"][k])
               for k in a["ema"]["state_dict"])
    assert a["ema"]["n_averaged"] == b["ema"]["n_averaged"] > 0
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text()
           .splitlines()]
    last = [r for r in log if r["type"] == "epoch"][-1]
    assert "ema/accuracy/top1" in last and last["best_weights"] in ("ema", "raw")
    # The loader takes the EMA weights of a train.py checkpoint unless asked for the raw.
    path = tmp_path / "straight" / "last.pth"
    ema_model = resnext.get_model(pretrained=str(path))
    raw_model = resnext.get_model(pretrained=str(path), use_ema=False)
    assert torch.equal(ema_model.fc.weight, a["ema"]["state_dict"]["fc.weight"])
    assert torch.equal(raw_model.fc.weight, a["state_dict"]["fc.weight"])
    assert "EMA weights used" in ema_model.weights_info.load_report.format
    # evaluate.py on the checkpoint equals the log's validation of each set of weights.
    import subprocess
    for flag, key in (([], "ema/accuracy/top1"), (["--raw-weights"], "accuracy/top1")):
        res = subprocess.run([sys.executable, "evaluate.py", "--data", str(data / "val"),
                              "--checkpoint", str(path), "--json", "--workers", "0",
                              "--batch-size", "4", *flag], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["top1"] == pytest.approx(last[key]), flag
        assert ("EMA weights used" in res.stderr) == (not flag)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mmpretrain", "torchvision-v2"])
def test_presets_run_under_torchrun(tmp_path, recipe):
    import subprocess
    data = _tiny_data(tmp_path / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--data", str(data), "--work-dir", str(tmp_path / "w"), "--recipe",
           recipe, "--epochs", "3", "--batch-size", "4", "--workers", "0",
           "--img-size", "32"]
    if recipe == "torchvision-v2":  # the preset at demo size: 3 epochs, 1 of warmup
        cmd += ["--warmup-epochs", "1", "--train-crop-size", "32", "--val-resize-size", "40",
                "--val-crop-size", "32", "--model-ema-steps", "1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    header = log[0]["args"]
    assert header["recipe"] == recipe and log[0]["world_size"] == 2
    epochs = [r for r in log if r["type"] == "epoch"]
    assert len(epochs) == 3 and epochs[-1]["val_images"] == 6
    if recipe == "torchvision-v2":
        assert header["label_smoothing"] == 0.1 and header["ra_reps"] == 4
        assert "ema/accuracy/top1" in epochs[-1]
    print(recipe, [(r["accuracy/top1"], r.get("ema/accuracy/top1")) for r in epochs])


# --- TensorBoard -------------------------------------------------------------------------------

@pytest.mark.slow
def test_tensorboard_holds_the_logs_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = _tiny_data(tmp_path / "data")
    work = tmp_path / "w"
    _train_in_process(["--data", data, "--img-size", "32", "--batch-size", "4", "--workers",
                       "0", "--epochs", "2", "--log-interval", "2", "--work-dir", work,
                       "--tensorboard"])
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()  # TensorBoard's own reader: an independent read of what was written
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    epochs = [r for r in records if r["type"] == "epoch"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    top1 = events.Scalars("epoch/accuracy/top1")
    assert [(e.step, e.value) for e in top1] == [
        (r["epoch"], pytest.approx(r["accuracy/top1"], rel=1e-6)) for r in epochs]
    assert {"epoch/train_loss", "epoch/val_loss", "epoch/lr", "epoch/images_per_s",
            "train/lr"} <= set(events.Tags()["scalars"])


def test_tensorboard_missing_is_one_line(monkeypatch):
    sys.path.insert(0, str(REPO))
    import train
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(resnext.errors.MissingDependencyError, match=r'pip install -e "\.\['
                       r'tensorboard\]"'):
        train.tensorboard_writer()
