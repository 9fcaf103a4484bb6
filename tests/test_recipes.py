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
    from PIL import Image
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
