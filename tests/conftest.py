"""Shared fixtures: where the real photos live, and random-but-realistic weights."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # the photos the tests read (see its README.md)
DEMO = REPO / "demo"  # the four demo photos
HYMENOPTERA = DATA / "hymenoptera"  # ants/bees, train/ and val/ in ImageFolder layout


def count_files(folder: Path) -> int:
    """Files under `folder`, recursively: the expected number of images, counted without
    our package (the data folders hold photos only)."""
    return sum(len(files) for _, _, files in os.walk(folder))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BN buffer random values (BN statistics too, so that eval
    mode really differs from train mode); scale kept near 1 so deep nets stay finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1 and ("bn" in name or "downsample.1" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                t.copy_(base + torch.randn(t.shape, generator=g) * 0.1)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else t.numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def _fit_head(model: torch.nn.Module, img_size: int = 64, steps: int = 300) -> None:
    """Fit the classifier of a random-backbone model on hymenoptera train features, so that
    its predictions on val photos vary and are decisive (a tiny trained model)."""
    from torchvision import datasets, transforms as T
    tf = T.Compose([T.Resize(img_size), T.CenterCrop(img_size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(str(HYMENOPTERA / "train"), tf)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    w = torch.zeros(2, feats.shape[1], requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(((feats - mean) / std) @ w.T + b, y)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into fc, scale up to be decisive
        model.fc.weight.copy_(w / std * 4)
        model.fc.bias.copy_((b - (w * mean / std).sum(1)) * 4)


@pytest.fixture(scope="session")
def ants_bees_checkpoint(tmp_path_factory):
    """Our checkpoint layout: a resnext50_32x4d with random (BN-randomised) backbone and a
    head fitted on hymenoptera train at 64 px; class names ['ants', 'bees']."""
    import resnext
    torch.manual_seed(0)
    model = randomize_(resnext.resnext50_32x4d(num_classes=2), seed=7)
    _fit_head(model)
    path = tmp_path_factory.mktemp("ckpt") / "ants_bees.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": "resnext50_32x4d", "classes": ["ants", "bees"]}}, path)
    return path


@pytest.fixture(scope="session")
def checkpoint_at_64(ants_bees_checkpoint, tmp_path_factory):
    """The same model saved as train.py saves one trained at 64 px: its preprocessing
    (crop 64, resize 73) stored in meta."""
    from resnext import Preprocessing
    raw = torch.load(ants_bees_checkpoint, weights_only=True)
    raw["meta"]["preprocessing"] = Preprocessing(64).to_dict()
    path = tmp_path_factory.mktemp("ckpt64") / "at64.pth"
    torch.save(raw, path)
    return path
