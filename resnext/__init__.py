"""ResNeXt for PyTorch: the model, mmpretrain/torchvision checkpoints, and the image pipeline.

`import resnext` imports torch and Pillow only; torchvision is imported where training
transforms are built.
"""
from .checkpoint import (Checkpoint, LoadReport, convert_state_dict, download_weights,
                         export_openmmlab, load_weights, read_checkpoint, save_checkpoint)
from .complexity import Complexity, get_complexity
from .data import (IMAGENET_MEAN, IMAGENET_STD, FastTrainTransform, Normalize, Preprocessing,
                   eval_transform, imagenet_class_names, imagenet_wnids, load_image,
                   train_transform)
from .inference import InferenceModel, fuse_bn, inference_model, load_for_inference
from .model import Bottleneck, ResNeXt, list_models
from .pretrained import (RELEASED_WEIGHTS, ReleasedWeights, get_model, preprocessing_of,
                         resnext50_32x4d, resnext101_32x4d, resnext101_32x8d,
                         resnext101_64x4d, resnext152_32x4d)

__all__ = [
    "Bottleneck", "ResNeXt", "list_models",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d",
    "resnext101_64x4d",
    "Complexity", "get_complexity",
    "RELEASED_WEIGHTS", "ReleasedWeights", "get_model", "preprocessing_of",
    "Checkpoint", "LoadReport", "read_checkpoint", "convert_state_dict", "load_weights",
    "download_weights", "export_openmmlab", "save_checkpoint",
    "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "load_image", "eval_transform",
    "train_transform", "imagenet_wnids", "imagenet_class_names", "FastTrainTransform",
    "Normalize",
    "InferenceModel", "load_for_inference", "inference_model", "fuse_bn",
]
