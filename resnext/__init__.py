"""ResNeXt for PyTorch: the model, mmpretrain/torchvision checkpoints, and the image pipeline."""
from .complexity import Complexity, get_complexity
from .model import (Bottleneck, ResNeXt, list_models, resnext50_32x4d, resnext101_32x4d,
                    resnext101_32x8d, resnext101_64x4d, resnext152_32x4d)

__all__ = [
    "Bottleneck", "ResNeXt", "list_models",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d",
    "resnext101_64x4d",
    "Complexity", "get_complexity",
]
