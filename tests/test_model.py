"""The network: sizes from the paper/mmpretrain, parity with torchvision, backbone options."""
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.models.resnet import Bottleneck as TVBottleneck, ResNet as TVResNet

import resnext
from resnext import ResNeXt, get_complexity, list_models
from conftest import DEMO, randomize_

# Parameter counts at 1000 classes: mmpretrain's metafile / REFERENCE.md (torchvision's
# documentation for 101_64x4d).
PARAMS = {
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "resnext101_32x8d": 88_791_336,
    "resnext152_32x4d": 59_951_400,
    "resnext101_64x4d": 83_455_272,
}
# (depth blocks, groups, width per group) as the paper names each model.
SPEC = {
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
    "resnext152_32x4d": ((3, 8, 36, 3), 32, 4),
    "resnext101_64x4d": ((3, 4, 23, 3), 64, 4),
}


def torchvision_twin(name: str) -> torch.nn.Module:
    """torchvision's own model of the same architecture (its ResNet class where it has no
    builder)."""
    if name == "resnext50_32x4d":
        return torchvision.models.resnext50_32x4d()
    if name == "resnext101_32x8d":
        return torchvision.models.resnext101_32x8d()
    if name == "resnext101_64x4d":
        return torchvision.models.resnext101_64x4d()
    layers, groups, width = SPEC[name]
    return TVResNet(TVBottleneck, list(layers), groups=groups, width_per_group=width)


def test_list_models():
    assert list_models() == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_blocks_and_inner_widths(name):
    # Counts and shapes only: built on the meta device, no weights drawn (4 s less).
    with torch.device("meta"):
        model, tv = getattr(resnext, name)(), torchvision_twin(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    layers, groups, width = SPEC[name]
    assert [len(s) for s in model.stages()] == list(layers)
    for i, stage in enumerate(model.stages()):
        conv2 = stage[0].conv2
        # Inner width groups * width * 2**i (paper Table 1: 128/256/512/1024 for 32x4d).
        assert conv2.in_channels == conv2.out_channels == groups * width * 2**i
        assert conv2.groups == groups
        assert conv2.stride == ((1, 1) if i == 0 else (2, 2))  # stride on the 3x3 ("v1.5")
        assert stage[0].conv1.stride == (1, 1)
    # Same keys and shapes as torchvision's module tree.
    assert {k: v.shape for k, v in model.state_dict().items()} == \
           {k: v.shape for k, v in tv.state_dict().items()}


def test_stage_output_shapes_224_and_feature_api():
    model = resnext.resnext50_32x4d(out_indices=(0, 1, 2, 3)).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        maps = model.extract_feat(x, stage="backbone")
        assert [tuple(m.shape) for m in maps] == [
            (2, 256, 56, 56), (2, 512, 28, 28), (2, 1024, 14, 14), (2, 2048, 7, 7)]
        pooled = model.extract_feat(x)
        assert [tuple(p.shape) for p in pooled] == [(2, 256), (2, 512), (2, 1024), (2, 2048)]
        # The pooled features are the spatial means of the maps.
        torch.testing.assert_close(pooled[2], maps[2].mean(dim=(2, 3)))
        feats = model.forward_features(x)
        assert feats.shape == (2, 2048, 7, 7)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
        torch.testing.assert_close(model.extract_feat(x, stage="pre_logits"), pre)
        torch.testing.assert_close(model(x), pre @ model.fc.weight.T + model.fc.bias)
    with pytest.raises(ValueError, match="stage"):
        model.extract_feat(x, stage="head")


def test_num_classes_zero_and_new_head():
    headless = resnext.resnext50_32x4d(num_classes=0).eval()
    assert not any(k.startswith("fc.") for k in headless.state_dict())
    with torch.no_grad():
        assert headless(torch.rand(1, 3, 64, 64)).shape == (1, 2048)
    assert resnext.resnext50_32x4d(num_classes=2).fc.weight.shape == (2, 2048)


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": 34}, "50, 101, 152"),
    ({"depth": 18}, "50, 101, 152"),
    ({"groups": 0}, "groups"),
    ({"width_per_group": -4}, "width_per_group"),
    ({"num_classes": -1}, "num_classes"),
    ({"out_indices": (4,)}, "out_indices"),
    ({"frozen_stages": 5}, "frozen_stages"),
])
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNeXt(**kwargs)


def test_factory_rejects_conflicting_sizes():
    with pytest.raises(ValueError, match="groups=32"):
        resnext.resnext50_32x4d(groups=64)
    with pytest.raises(ValueError, match="depth=50"):
        resnext.resnext50_32x4d(depth=101)
    assert resnext.resnext50_32x4d(groups=32).groups == 32  # agreeing value is fine


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_factory_small_input_backward(name):
    model = getattr(resnext, name)(num_classes=10)
    randomize_(model)  # zero-init residual BN would leave some gradients zero by design
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_mmpretrain_init():
    torch.manual_seed(0)
    model = resnext.resnext50_32x4d()
    for block in model.modules():
        if isinstance(block, resnext.Bottleneck):
            assert block.bn3.weight.abs().sum() == 0 and block.bn3.bias.abs().sum() == 0
            assert (block.bn2.weight == 1).all() and (block.bn2.bias == 0).all()
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    w = model.layer3[0].conv1.weight  # 1x1, 512 outputs
    assert abs(w.std().item() - (2 / 512) ** 0.5) < 0.05 * (2 / 512) ** 0.5
    assert abs(model.fc.weight.std().item() - 0.01) < 0.0005
    assert (model.fc.bias == 0).all()
    plain = resnext.resnext50_32x4d(zero_init_residual=False)
    assert (plain.layer1[0].bn3.weight == 1).all()


def _photo_batch() -> torch.Tensor:
    """bird.JPEG through torchvision's own transforms (independent of our pipeline)."""
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with Image.open(DEMO / "bird.JPEG") as im:
        return tf(im.convert("RGB")).unsqueeze(0)


def _assert_close_rel(a, b, tol=1e-5):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs diff {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("name", [
    "resnext50_32x4d",
    pytest.param("resnext101_32x8d", marks=pytest.mark.slow),
    pytest.param("resnext101_32x4d", marks=pytest.mark.slow),
    pytest.param("resnext152_32x4d", marks=pytest.mark.slow),
])
def test_parity_with_torchvision(name):
    ours, tv = getattr(resnext, name)(), torchvision_twin(name)
    randomize_(ours, seed=1)
    tv.load_state_dict(ours.state_dict())
    ours.eval(), tv.eval()
    photo = _photo_batch()
    noise = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for x in (photo, noise):
            _assert_close_rel(ours(x), tv(x))
    # Train mode: batch statistics, outputs and every gradient agree too.
    ours.train(), tv.train()
    x = torch.cat([photo, photo.flip(-1)])
    out_ours, out_tv = ours(x), tv(x)
    _assert_close_rel(out_ours, out_tv)
    out_ours.square().mean().backward()
    out_tv.square().mean().backward()
    tv_params = dict(tv.named_parameters())
    for pname, p in ours.named_parameters():
        _assert_close_rel(p.grad, tv_params[pname].grad, tol=1e-4)
    # Running statistics were updated identically.
    tv_state = tv.state_dict()
    for k, v in ours.state_dict().items():
        if "running" in k:
            _assert_close_rel(v, tv_state[k])


def test_frozen_stages_and_norm_eval():
    model = resnext.resnext50_32x4d(frozen_stages=2)
    model.train()
    frozen = [model.conv1, model.bn1, model.layer1, model.layer2]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not b.training for b in m.modules())
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert model.layer3.training
    # BN statistics of frozen stages do not move in a training forward pass.
    before = model.layer2[0].bn1.running_mean.clone()
    after3 = model.layer3[0].bn1.running_mean.clone()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert torch.equal(model.layer2[0].bn1.running_mean, before)
    assert not torch.equal(model.layer3[0].bn1.running_mean, after3)
    assert model.layer2[0].conv2.weight.grad is None
    assert model.layer3[0].conv2.weight.grad is not None

    ne = resnext.resnext50_32x4d(norm_eval=True).train()
    bns = [m for m in ne.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert ne.layer4.training  # only the norms stay in eval


@pytest.mark.slow
def test_complexity_matches_independent_counts():
    from torch.utils.flop_counter import FlopCounterMode
    # mmpretrain's metafile (3 significant figures, GMACs at 224x224).
    seed_table = {"resnext50_32x4d": 4.27, "resnext101_32x4d": 8.03,
                  "resnext101_32x8d": 16.5, "resnext152_32x4d": 11.8}
    for name, gmacs in seed_table.items():
        model = getattr(resnext, name)()
        c = get_complexity(model, 224)
        assert c.params == PARAMS[name]
        assert float(f"{c.macs / 1e9:.3g}") == gmacs, (name, c.macs)
        if name == "resnext50_32x4d":
            # torch's own counter: convolutions and matmuls only, in FLOPs (2 per MAC).
            model.eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.zeros(1, 3, 224, 224))
            assert c.conv_fc_macs * 2 == counter.get_total_flops()
            assert round(c.conv_fc_macs / 1e9, 2) == 4.23
    # Hand count for the stem conv alone at 224: 112*112 outputs * 64 ch * 7*7*3.
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False))
    assert get_complexity(stem, 224).conv_fc_macs == 112 * 112 * 64 * 147


def test_torch_hub_local():
    from conftest import REPO
    model = torch.hub.load(str(REPO), "resnext50_32x4d", source="local", num_classes=3)
    assert isinstance(model, ResNeXt) and model.fc.out_features == 3
    import importlib.util
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    for name in PARAMS:
        assert getattr(hub, name) is getattr(resnext, name)
