"""ResNeXt for PyTorch: the model, mmpretrain/torchvision checkpoints, and the image pipeline."""
from .checkpoint import (RELEASED_WEIGHTS, Checkpoint, LoadReport, ReleasedWeights,
                         convert_state_dict, download_weights, export_openmmlab, get_model,
                         load_weights, read_checkpoint, save_checkpoint)
from .complexity import Complexity, get_complexity
from .data import (IMAGENET_MEAN, IMAGENET_STD, FastTrainTransform, eval_transform,
                   imagenet_class_names, imagenet_wnids, load_image, train_transform)
from .inference import fuse_bn, inference_model
from .model import (Bottleneck, ResNeXt, list_models, resnext50_32x4d, resnext101_32x4d,
                    resnext101_32x8d, resnext101_64x4d, resnext152_32x4d)

__all__ = [
    "Bottleneck", "ResNeXt", "list_models",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d",
    "resnext101_64x4d",
    "Complexity", "get_complexity",
    "RELEASED_WEIGHTS", "ReleasedWeights", "Checkpoint", "LoadReport", "read_checkpoint",
    "convert_state_dict", "load_weights", "get_model", "download_weights", "export_openmmlab",
    "save_checkpoint",
    "IMAGENET_MEAN", "IMAGENET_STD", "load_image", "eval_transform", "train_transform",
    "imagenet_wnids", "imagenet_class_names", "FastTrainTransform",
    "inference_model", "fuse_bn",
]
