"""Shared fixtures: where the real photos live, and random-but-realistic weights."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path:
    candidates = [os.environ.get("RESNEXT_SHARED_DATA"), REPO.parent / "shared" / "data",
                  "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "demo" / "bird.JPEG").is_file():
            return Path(c)
    raise RuntimeError(f"real test photos not found in any of {candidates}; "
                       "set RESNEXT_SHARED_DATA to the shared/data folder")


DATA = _find_shared_data()


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
