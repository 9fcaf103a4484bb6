"""ResNeXt for PyTorch: the model, mmpretrain/torchvision checkpoints, and the image pipeline.

`import resnext` imports torch and Pillow only; torchvision is imported where training
transforms and datasets are built.
"""
from .checkpoint import (Checkpoint, convert_state_dict, detect_architecture, export_openmmlab,
                         read_checkpoint, save_checkpoint)
from .classes import imagenet_class_names, imagenet_wnids
from .complexity import Complexity, get_complexity
from .errors import (CheckpointError, CheckpointNotFoundError, CheckpointWriteError,
                     ConfigError, DatasetError, DownloadError, ImageReadError, ResNeXtError)
from .hub import download_weights
from .images import load_image
from .inference import InferenceModel, fuse_bn, inference_model, load_for_inference
from .model import (Bottleneck, ResNeXt, list_models, resnext50_32x4d, resnext101_32x4d,
                    resnext101_32x8d, resnext101_64x4d, resnext152_32x4d)
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, FastTrainTransform, Normalize,
                         Preprocessing, eval_transform, train_transform)
from .weights import (RELEASED_WEIGHTS, LoadReport, ReleasedWeights, WeightsInfo, get_model,
                      list_weights, load_weights, preprocessing_of)

__all__ = [
    "Bottleneck", "ResNeXt", "list_models",
    "resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext152_32x4d",
    "resnext101_64x4d",
    "Complexity", "get_complexity",
    "RELEASED_WEIGHTS", "ReleasedWeights", "WeightsInfo", "get_model", "list_weights",
    "preprocessing_of",
    "Checkpoint", "LoadReport", "read_checkpoint", "convert_state_dict", "detect_architecture",
    "load_weights", "download_weights", "export_openmmlab", "save_checkpoint",
    "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "load_image", "eval_transform",
    "train_transform", "imagenet_wnids", "imagenet_class_names", "FastTrainTransform",
    "Normalize",
    "InferenceModel", "load_for_inference", "inference_model", "fuse_bn",
    "ResNeXtError", "ImageReadError", "CheckpointError", "CheckpointNotFoundError",
    "CheckpointWriteError",
    "DownloadError", "DatasetError", "ConfigError",
]
