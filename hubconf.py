"""torch.hub entry points: `torch.hub.load('<owner>/resnext', 'resnext50_32x4d', ...)`.

Each entry takes the factory's keyword arguments (num_classes, pretrained=..., ...).
"""
dependencies = ["torch"]

from resnext import (resnext50_32x4d, resnext101_32x4d,  # noqa: E402,F401
                     resnext101_32x8d, resnext101_64x4d, resnext152_32x4d)
