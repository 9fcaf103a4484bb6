"""ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks",
CVPR 2017, arXiv:1611.05431), as trained by mmpretrain (configs/resnext/*_8xb32_in1k.py).

The whole network lives here: the grouped bottleneck, the ResNeXt class (stem, four stages,
pooled linear head) and one factory per released depth/cardinality/width. Module names equal
torchvision's ResNet (conv1, bn1, layer1..layer4, fc), so our state-dict keys are torchvision's
and mmpretrain's minus its `backbone.` / `head.` prefixes. Torch only, no I/O: a factory
given pretrained= hands the build to resnext.weights (imported then), which reads the file.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "Bottleneck", "ResNeXt", "list_models",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d",
    "resnext101_64x4d",
]

# Blocks per stage by depth (He et al. 2016, Table 1; mmpretrain ResNet.arch_settings).
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_CHANNELS = (256, 512, 1024, 2048)  # output channels of stages 1..4 (expansion 4)
STEM_CHANNELS = 64


class Bottleneck(nn.Module):
    """ResNeXt block: 1x1 reduce -> grouped 3x3 -> 1x1 expand, plus shortcut (paper Fig. 3c).

    The stride sits on the grouped 3x3 conv ("pytorch style" in mmpretrain, a.k.a. ResNet
    v1.5), not on the first 1x1 conv as in the original Caffe models.

    Args:
        in_channels: channels of the input map.
        width: inner channels of the grouped 3x3 conv (groups * width per group).
        out_channels: channels of the output map.
        stride: spatial stride of the 3x3 conv (1 or 2).
        groups: cardinality, the number of groups of the 3x3 conv; must divide width.
        downsample: projection of the shortcut (1x1 conv + BN) or None for identity.

    Attributes in_channels, mid_channels (= width), out_channels, stride and groups are kept,
    as mmpretrain's Bottleneck has them.

    Input (N, in_channels, H, W) float; output (N, out_channels, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1,
                 groups: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.in_channels, self.mid_channels, self.out_channels = in_channels, width, out_channels
        self.stride, self.groups = stride, groups
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))    # (N, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, width, H/s, W/s)
        out = self.bn3(self.conv3(out))             # (N, out_channels, H/s, W/s)
        out += x if self.downsample is None else self.downsample(x)  # in place: no extra map
        return self.relu(out)


class ResNeXt(nn.Module):
    """ResNeXt classifier: stem, four stages of grouped bottlenecks, pooled linear head.

    Args:
        depth: 50, 101 or 152; sets the blocks per stage (3,4,6,3) / (3,4,23,3) / (3,8,36,3).
        groups: cardinality C, groups of every 3x3 conv (32 in "32x4d"). groups=1 builds
            a plain ResNet (inner widths 64/128/256/512, width_per_group ignored), as
            mmpretrain's ResNeXt does.
        width_per_group: channels per group in stage 1 (4 in "32x4d"); stage i (0-based) has
            inner width groups * width_per_group * 2**i (mmpretrain resnext.py).
        num_classes: classifier outputs; 0 means no classifier (forward returns pooled
            features of shape (N, 2048)).
        out_indices: stages (0..3) whose maps `extract_feat` returns, as mmpretrain's backbone
            option; default the last stage only.
        frozen_stages: stages to freeze, mmpretrain semantics: -1 none, 0 the stem, k the stem
            and stages 1..k. Frozen parts get requires_grad=False and their BN stays in eval.
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) in train().
        zero_init_residual: zero the last BN (weight and bias) of every block, so each block
            starts as identity (mmpretrain default, Goyal et al. 2017).

    Raises:
        ValueError: for a depth other than 50/101/152, non-positive groups or width_per_group,
            negative num_classes, out_indices outside 0..3, frozen_stages outside -1..4.

    Attributes:
        weights_info: None for a random model; after loading (resnext.weights.load_weights,
            or a factory's pretrained=) an immutable resnext.weights.WeightsInfo: the file,
            class names, preprocessing and load report. `class_names` and `preprocessing`
            read it.

    Input (N, 3, H, W) float images normalised with the ImageNet mean/std; output
    (N, num_classes) logits. H and W of at least 32 keep the last map non-empty.
    """

    def __init__(self, depth: int = 50, groups: int = 32, width_per_group: int = 4,
                 num_classes: int = 1000, out_indices: Sequence[int] = (3,),
                 frozen_stages: int = -1, norm_eval: bool = False,
                 zero_init_residual: bool = True):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNeXt depth must be one of {sorted(STAGE_BLOCKS)}, got {depth!r}")
        for name, value in (("groups", groups), ("width_per_group", width_per_group)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no classifier), "
                             f"got {num_classes!r}")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of (0, 1, 2, 3), "
                             f"got {out_indices!r}")
        if frozen_stages not in range(-1, 5):
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages!r}")
        self.depth, self.groups, self.width_per_group = depth, groups, width_per_group
        self.num_classes, self.out_indices = num_classes, out_indices
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.zero_init_residual = zero_init_residual
        self.num_features = STAGE_CHANNELS[-1]
        # Set by resnext.weights.load_weights: an immutable record of the file the weights
        # came from, their class names, preprocessing and load report (None: random init).
        self.weights_info = None

        # Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (He et al. 2016, Table 1).
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        in_channels = STEM_CHANNELS
        for i, (blocks, out_channels) in enumerate(zip(STAGE_BLOCKS[depth], STAGE_CHANNELS)):
            # e.g. 128/256/512/1024 for 32x4d; groups=1 is ResNet's out/4 (mmpretrain resnext.py)
            width = groups * width_per_group * 2**i if groups > 1 else out_channels // 4
            stride = 1 if i == 0 else 2              # stage 1 keeps the max-pooled size
            stage = self._make_stage(in_channels, width, out_channels, blocks, stride, groups)
            self.add_module(f"layer{i + 1}", stage)
            in_channels = out_channels

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.init_weights()
        self._freeze_stages()

    @property
    def class_names(self) -> list[str] | None:
        """Class names of the classifier, from the weights (weights_info); None for a
        random model or weights without names."""
        names = self.weights_info.class_names if self.weights_info is not None else None
        return list(names) if names is not None else None

    @property
    def preprocessing(self):
        """The resnext.transforms.Preprocessing the weights expect (weights_info); None for
        a random model (the standard one: resize 256, crop 224)."""
        return self.weights_info.preprocessing if self.weights_info is not None else None

    @property
    def arch_name(self) -> str:
        """Factory-style name of this architecture, e.g. 'resnext50_32x4d' ('resnet50' for
        groups=1)."""
        if self.groups == 1:
            return f"resnet{self.depth}"
        return f"resnext{self.depth}_{self.groups}x{self.width_per_group}d"

    @staticmethod
    def _make_stage(in_channels: int, width: int, out_channels: int, blocks: int,
                    stride: int, groups: int) -> nn.Sequential:
        # Every stage's first block projects the shortcut (channels change even in stage 1).
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        layers = [Bottleneck(in_channels, width, out_channels, stride, groups, downsample)]
        layers += [Bottleneck(out_channels, width, out_channels, 1, groups)
                   for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        """mmpretrain's initialisation for training from scratch (differs from torchvision's).

        Convs: Kaiming normal, fan_out, ReLU gain (mmcv kaiming_init). BN: weight 1, bias 0;
        with the constructor's zero_init_residual the last BN of each block gets weight 0 and
        bias 0. Classifier: Normal(0, 0.01) weight, zero bias (mmpretrain LinearClsHead
        init_cfg). The constructor calls it; calling it again re-draws a random model, except
        on a model whose weights were loaded from a file, which it leaves unchanged with a
        warning (as mmengine's BaseModule does once initialised), so that a framework that
        calls init_weights() on its modules never silently discards a checkpoint.
        """
        if self.weights_info is not None:
            warnings.warn(f"init_weights() skipped: the weights were loaded from "
                          f"{self.weights_info.source}", stacklevel=2)
            return
        if self.conv1.weight.is_meta:
            return  # built on the meta device to receive a file's tensors: nothing to draw
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                    nn.init.zeros_(m.bn3.bias)

    def stages(self) -> list[nn.Sequential]:
        """The four stages, layer1..layer4."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + self.stages()[:self.frozen_stages]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "ResNeXt":
        """Set train/eval mode, keeping frozen stages (and all BN with norm_eval) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 64, H/2, W/2)
        return self.maxpool(x)                  # (N, 64, H/4, W/4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> last stage map (N, 2048, H/32, W/32)."""
        x = self._stem(x)
        x = self.layer1(x)  # (N, 256, H/4, W/4)
        x = self.layer2(x)  # (N, 512, H/8, W/8)
        x = self.layer3(x)  # (N, 1024, H/16, W/16)
        return self.layer4(x)  # (N, 2048, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, 2048, h, w) map -> (N, num_classes) logits, or pooled (N, 2048) if pre_logits."""
        x = torch.flatten(self.avgpool(x), 1)  # (N, 2048)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) logits ((N, 2048) if no fc)."""
        return self.forward_head(self.forward_features(x))

    def extract_feat(self, x: torch.Tensor,
                     stage: str = "neck") -> tuple[torch.Tensor, ...] | torch.Tensor:
        """Intermediate features, as mmpretrain's ImageClassifier.extract_feat.

        Args:
            x: (N, 3, H, W) normalised images.
            stage: 'backbone' -> the stage maps for out_indices, stage i of shape
                (N, STAGE_CHANNELS[i], H/2**(i+2), W/2**(i+2)); 'neck' -> each of those
                globally average-pooled to (N, C_i); 'pre_logits' -> the classifier's input,
                pooled (N, 2048) of the last stage, as a tensor (mmpretrain's
                ImageClassifier returns the head's pre_logits unwrapped).
        Returns:
            A tuple of float tensors ('backbone', 'neck') or one tensor ('pre_logits').
        Raises:
            ValueError: for any other stage.
        """
        if stage not in ("backbone", "neck", "pre_logits"):
            raise ValueError(f"stage must be 'backbone', 'neck' or 'pre_logits', got {stage!r}")
        if stage == "pre_logits":
            return self.forward_head(self.forward_features(x), pre_logits=True)
        outs = []
        x = self._stem(x)
        for i, layer in enumerate(self.stages()):
            x = layer(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= max(self.out_indices):
                break  # later stages are not needed
        if stage == "neck":
            outs = [torch.flatten(self.avgpool(o), 1) for o in outs]
        return tuple(outs)


# Factories: one per released depth/cardinality/width ------------------------------------

def _build(name: str, arch: dict, pretrained, weights: str | None, num_classes: int | None,
           reset_head: bool, dtype: torch.dtype | None, verbose: bool, kwargs: dict) -> ResNeXt:
    for key, value in arch.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{name} fixes {key}={value}; got {key}={kwargs[key]!r}. "
                             f"Use ResNeXt(...) or another factory for other sizes.")
        kwargs.pop(key, None)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, "
                         f"got {dtype!r}")
    if (pretrained is not False and pretrained is not None) or weights is not None:
        from .weights import build_pretrained  # lazy: only a build with weights reads files
        return build_pretrained(name, arch["depth"], arch["groups"], arch["width_per_group"],
                                pretrained, num_classes=num_classes, reset_head=reset_head,
                                dtype=dtype, verbose=verbose, weights=weights, **kwargs)
    if reset_head:
        raise ValueError("reset_head=True only makes sense with pretrained=")
    model = ResNeXt(**arch, num_classes=1000 if num_classes is None else num_classes, **kwargs)
    return model if dtype is None else model.to(dtype)


def resnext50_32x4d(*, pretrained: bool | str | os.PathLike = False,
                    weights: str | None = None, num_classes: int | None = None,
                    reset_head: bool = False, dtype: torch.dtype | None = None,
                    verbose: bool = False, **kwargs) -> ResNeXt:
    """ResNeXt-50, cardinality 32, 4 channels per group (paper Table 1; mmpretrain config
    resnext50-32x4d_8xb32_in1k).

    Args:
        pretrained: False (random, mmpretrain's init), True (the released OpenMMLab weights,
            downloaded once into torch.hub's cache), or a path/URL of any supported
            checkpoint (resnext.checkpoint; a read Checkpoint works too).
        weights: a published weight set instead, by registry name: 'tv2_in1k' (torchvision's
            V2), 'tv_in1k', 'mmpretrain_in1k' (resnext.list_weights() lists them).
        num_classes: classifier outputs (0: none, forward gives pooled features). Default
            1000, or with pretrained= the file's classifier size.
        reset_head: with pretrained=, leave the file's classifier out and start a new
            num_classes one (fine-tuning on other classes).
        dtype: the model's floating dtype (default float32, whatever dtype a file holds).
        verbose: when a file does not fit, list every key (default: the first ones).
        **kwargs: ResNeXt's backbone options: out_indices, frozen_stages, norm_eval,
            zero_init_residual.
    Returns:
        Model mapping (N, 3, H, W) normalised float images to (N, num_classes) logits;
        25,028,904 parameters at 1000 classes. With weights, `model.weights_info` records
        the file, class names and preprocessing.
    Raises:
        ValueError: kwargs try to change depth, groups or width_per_group; a non-floating
            dtype; reset_head without pretrained.
        resnext.errors.CheckpointError, CheckpointNotFoundError, DownloadError: the weights
            cannot be read or do not fit (see resnext.load_weights).
    """
    return _build("resnext50_32x4d", dict(depth=50, groups=32, width_per_group=4), pretrained,
                  weights, num_classes, reset_head, dtype, verbose, kwargs)


def resnext101_32x4d(*, pretrained: bool | str | os.PathLike = False,
                     weights: str | None = None, num_classes: int | None = None,
                     reset_head: bool = False, dtype: torch.dtype | None = None,
                     verbose: bool = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 32x4d (mmpretrain resnext101-32x4d_8xb32_in1k); 44,177,704 parameters.

    Same arguments, returns and errors as resnext50_32x4d.
    """
    return _build("resnext101_32x4d", dict(depth=101, groups=32, width_per_group=4),
                  pretrained, weights, num_classes, reset_head, dtype, verbose, kwargs)


def resnext101_32x8d(*, pretrained: bool | str | os.PathLike = False,
                     weights: str | None = None, num_classes: int | None = None,
                     reset_head: bool = False, dtype: torch.dtype | None = None,
                     verbose: bool = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 32x8d (mmpretrain resnext101-32x8d_8xb32_in1k); 88,791,336 parameters.

    Same arguments, returns and errors as resnext50_32x4d.
    """
    return _build("resnext101_32x8d", dict(depth=101, groups=32, width_per_group=8),
                  pretrained, weights, num_classes, reset_head, dtype, verbose, kwargs)


def resnext152_32x4d(*, pretrained: bool | str | os.PathLike = False,
                     weights: str | None = None, num_classes: int | None = None,
                     reset_head: bool = False, dtype: torch.dtype | None = None,
                     verbose: bool = False, **kwargs) -> ResNeXt:
    """ResNeXt-152 32x4d (mmpretrain resnext152-32x4d_8xb32_in1k); 59,951,400 parameters.

    Same arguments, returns and errors as resnext50_32x4d.
    """
    return _build("resnext152_32x4d", dict(depth=152, groups=32, width_per_group=4),
                  pretrained, weights, num_classes, reset_head, dtype, verbose, kwargs)


def resnext101_64x4d(*, pretrained: bool | str | os.PathLike = False,
                     weights: str | None = None, num_classes: int | None = None,
                     reset_head: bool = False, dtype: torch.dtype | None = None,
                     verbose: bool = False, **kwargs) -> ResNeXt:
    """ResNeXt-101 64x4d (torchvision's builder; no OpenMMLab release); 83,455,272 parameters.

    Same arguments, returns and errors as resnext50_32x4d.
    """
    return _build("resnext101_64x4d", dict(depth=101, groups=64, width_per_group=4),
                  pretrained, weights, num_classes, reset_head, dtype, verbose, kwargs)


#: Factory name -> factory.
FACTORIES: dict[str, Callable[..., ResNeXt]] = {
    f.__name__: f for f in (resnext50_32x4d, resnext101_32x4d, resnext101_32x8d,
                            resnext152_32x4d, resnext101_64x4d)
}


def list_models() -> list[str]:
    """Names of the model factories, e.g. ['resnext101_32x4d', ..., 'resnext50_32x4d']."""
    return sorted(FACTORIES)
