"""Classify images: mmpretrain's inference_model, and the prepared model predict.py and
evaluate.py run (InferenceModel: knows its device, memory format, autocast dtype and the
preprocessing its weights expect)."""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from PIL import Image
from torch import nn

from .artifacts import ArtifactNet, exported_file
from .checkpoint import read_checkpoint
from .images import load_image, to_rgb8
from .errors import ConfigError, ImageReadError, ResNeXtWarning
from .runtime import autocast, maybe_compile, resolve_amp
from .transforms import Normalize, Preprocessing
from .weights import factory_name, get_model

__all__ = ["InferenceModel", "load_for_inference", "inference_model", "fuse_bn"]


def fuse_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference with every BatchNorm folded into the conv before it.

    conv -> BN in eval mode is one affine map, so the folded conv (with a bias) gives the
    same outputs to float rounding while skipping a full pass over every activation map.
    Only for eval: the copy has no BN to train. The original model is left untouched.
    It pays off on CPU and is slower on CUDA eager (docs/performance.md), so
    load_for_inference folds on CPU only.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    pairs = [(fused, "conv1", "bn1")]
    for block in fused.modules():
        if hasattr(block, "conv3") and hasattr(block, "bn3"):  # Bottleneck
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())
    return fused


def _is_compiled(net: nn.Module) -> bool:
    # torch.compile(module) returns a wrapper with _orig_mod; module.compile() compiles in place.
    return hasattr(net, "_orig_mod") or getattr(net, "_compiled_call_impl", None) is not None


class InferenceModel(nn.Module):
    """A classifier prepared for inference, with everything needed to feed it.

    Holds the (possibly folded, channels_last, compiled) network and converts its input
    itself: callers pass plain (N, 3, H, W) images on any device, either float32 normalised
    ones or the uint8 crops of `preprocessing.transform(normalize=False)`, which are moved
    to the device first and normalised there (a quarter of the bytes to copy; on CPU the
    logits are bitwise those of the float32 input, tested).

    A compiled network is specialised to the batch size it first runs; a smaller batch (a
    dataset's last one) would compile again, with a dynamic batch dimension, which costs as
    long as the first compilation. Smaller batches are therefore padded with zeros to
    `pad_to` and the padding's logits dropped (eval mode: rows do not affect each other).

    Attributes:
        net: the module that runs.
        device: where it runs.
        amp: autocast dtype (torch.bfloat16/float16) or None for fp32.
        channels_last: whether inputs are converted to channels_last.
        preprocessing: how images must be prepared (resnext.transforms.Preprocessing).
        class_names: from the weights (or ImageNet's for 1000 classes), else None.
        num_classes: classifier outputs (None without a classifier).
        arch_name: e.g. 'resnext50_32x4d'.
        load_report: what loading the weights did (resnext.checkpoint.LoadReport), or None.
        exported: for an exported file (resnext.artifacts), what it is, e.g. 'int8 TorchScript
            file (resnext50_32x4d, 2 classes)'; None for a checkpoint's network.
        pad_to: for a compiled network, the batch size smaller batches are padded to; the
            scripts set their --batch-size, else it is the largest batch seen so far.
            Ignored when the network is not compiled.
    """

    def __init__(self, net: nn.Module, device: torch.device, amp: torch.dtype | None = None,
                 channels_last: bool = True, preprocessing: Preprocessing | None = None,
                 class_names: list[str] | None = None, num_classes: int | None = None,
                 arch_name: str = ""):
        super().__init__()
        self.net = net
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.preprocessing = preprocessing or Preprocessing()
        self.class_names, self.num_classes, self.arch_name = class_names, num_classes, arch_name
        self.load_report = None
        self.exported: str | None = None
        self._normalize = None  # built for the current preprocessing on first uint8 input
        self.pad_to: int | None = None
        self._pads = _is_compiled(net)
        # Without autocast, inputs take the weights' dtype (a model built with dtype=); an
        # exported file (no parameters here) takes float32.
        weight = next(net.parameters(), None)
        self.input_dtype = weight.dtype if amp is None and weight is not None else torch.float32
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float32 normalised images, or uint8 crops -> (N, num_classes) float32
        logits."""
        # Asynchronous only towards a GPU: a copy back to the host must be complete before
        # the host reads it.
        non_blocking = self.device.type == "cuda"
        if images.dtype == torch.uint8:  # copy the 1-byte pixels, normalise on the device
            images = self.normalizer()(images.to(self.device, non_blocking=non_blocking))
        images = images.to(self.device, self.input_dtype, non_blocking=non_blocking)
        n = images.shape[0]
        if self._pads:
            if self.pad_to is None or n > self.pad_to:
                self.pad_to = n
            elif n < self.pad_to:
                images = torch.cat([images, images.new_zeros(self.pad_to - n,
                                                             *images.shape[1:])])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            logits = self.net(images)
        # A copy for compiled nets: with CUDA graphs the output buffer is reused by the next
        # call, and .float() does not copy fp32 logits.
        return logits[:n].to(torch.float32, copy=self._pads)

    def normalizer(self) -> Normalize:
        """uint8 crops -> float32 input with `preprocessing`'s mean and std."""
        p = self.preprocessing
        if self._normalize is None or (self._normalize.mean, self._normalize.std) != (p.mean,
                                                                                     p.std):
            self._normalize = p.normalizer()
        return self._normalize

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float32 normalised images or uint8 crops -> (N, num_classes) float32
        softmax scores."""
        self.eval()
        return self(images).softmax(dim=1)


def load_for_inference(name: str | None, checkpoint: str | os.PathLike | None,
                       device: torch.device, *, amp: str | torch.dtype | None = None,
                       fuse: bool = False, channels_last: bool = True, compile: bool = False,
                       img_size: int | None = None, resize_size: int | None = None,
                       verbose: bool = False, announce: bool = True,
                       use_ema: bool = True) -> InferenceModel:
    """Build and load the model predict.py and evaluate.py use.

    Args:
        name: factory or seed name; None: the checkpoint's own, else resnext50_32x4d.
        checkpoint: path/URL of any supported format; None: the released weights of `name`.
        device: where to run.
        amp: None (fp32), 'auto', 'bf16', 'fp16' or a dtype (see runtime.resolve_amp).
        fuse: fold BatchNorm into the convs (fuse_bn); done on CPU only, where it helps.
        channels_last: run in channels_last memory format.
        compile: torch.compile where available (runtime.maybe_compile).
        img_size, resize_size: override the crop / resize size (pixels) that the weights'
            preprocessing gives (see weights.preprocessing_of).
        verbose: list every key when the weights do not fit the model.
        announce: warn (ResNeXtWarning) when an option falls back.
        use_ema: a train.py checkpoint's EMA weights when it has them, else the raw ones.
    An exported file (resnext.artifacts.artifact_format: TorchScript, int8 TorchScript,
    ExportedProgram, ONNX) runs as it was exported, on CPU, with the classes and preprocessing
    stored in it; `resize_size` still applies, a different `img_size` is refused, and the
    options that would change the network are ignored with a ResNeXtWarning.
    Returns:
        InferenceModel, its `load_report` set from the weights (None for an exported file).
    Raises:
        The loader's errors (resnext.errors: CheckpointError, CheckpointNotFoundError,
        DownloadError, ConfigError, MissingDependencyError for ONNX without onnxruntime).
    """
    exported = exported_file(checkpoint)
    if exported:
        ignored = {"--amp": amp, "--fuse-bn": fuse, "--compile": compile,
                   "--raw-weights": not use_ema, f"--device {device}": device.type != "cpu"}
        return _prepare_artifact(ArtifactNet(*exported), name, img_size, resize_size,
                                 [k for k, on in ignored.items() if on], announce)
    pretrained = read_checkpoint(checkpoint, use_ema=use_ema) if checkpoint else True
    model = get_model(name, pretrained=pretrained, verbose=verbose).to(device)
    preprocessing = model.preprocessing  # from the released table or the file's meta
    if img_size or resize_size:
        preprocessing = Preprocessing(img_size or preprocessing.crop_size, resize_size,
                                      preprocessing.interpolation, preprocessing.mean,
                                      preprocessing.std)
    net: nn.Module = model
    if fuse and device.type == "cpu":
        net = fuse_bn(net)
    elif fuse and announce:
        warnings.warn(f"--fuse-bn ignored on {device.type}: folded BN is slower there",
                      ResNeXtWarning, stacklevel=2)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:
        net = maybe_compile(net, device, announce)
    prepared = InferenceModel(net, device, resolve_amp(amp, device), channels_last,
                              preprocessing, model.class_names, model.num_classes or None,
                              model.arch_name)
    prepared.load_report = model.weights_info.load_report
    return prepared


def _prepare_artifact(net: ArtifactNet, name: str | None, img_size: int | None,
                      resize_size: int | None, ignored: list[str],
                      announce: bool) -> InferenceModel:
    """load_for_inference for an exported file: its preprocessing (resize_size may change),
    class names and network, on CPU; with `announce`, a warning names the options ignored."""
    pre = net.preprocessing
    if img_size and img_size != pre.crop_size:
        raise ConfigError(f"{net.path} was exported for {pre.crop_size} px crops; --img-size "
                          f"{img_size} cannot change that")
    if resize_size:
        pre = Preprocessing(pre.crop_size, resize_size, pre.interpolation, pre.mean, pre.std)
    # A registry or mmpretrain name stands for its factory ('resnext50_32x4d.tv2_in1k').
    wanted = factory_name(name) if name else None
    if wanted and net.arch_name and wanted != net.arch_name:
        ignored = [f"--model {name}"] + ignored
    if ignored and announce:
        warnings.warn(f"{', '.join(ignored)} ignored: {net.path} is an exported "
                      f"{net.description}, which fixes its network and dtype and runs on CPU",
                      ResNeXtWarning, stacklevel=3)
    prepared = InferenceModel(net, torch.device("cpu"), None, False, pre, net.class_names,
                              net.num_classes, net.arch_name)
    prepared.exported = net.description
    return prepared


def inference_model(model: nn.Module | str, image: str | os.PathLike | Image.Image,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """Classify one image, returning mmpretrain's result dict.

    Args:
        model: a model (ResNeXt, or InferenceModel), or a name for get_model(name,
            pretrained=True) (released weights).
        image: a path or a PIL image; decoded to RGB with EXIF orientation and prepared with
            the model's own `preprocessing` (the one its weights were trained or evaluated
            with; mmpretrain's resize 256 / crop 224 when it has none), exactly as predict.py.
        device: where to run; default the model's device.
    Returns:
        {'pred_scores': (num_classes,) float32 softmax tensor on CPU, 'pred_label': int,
         'pred_score': float, 'pred_class': str (only when the model has class names)}.
    Raises:
        resnext.errors.ImageReadError: the image cannot be read (the message names it).
    """
    if isinstance(model, str):
        model = get_model(model, pretrained=True)
    if not isinstance(model, InferenceModel):
        if device is not None:
            model = model.to(device)
        device = next(model.parameters()).device
        model = InferenceModel(model, device, None, False,
                               getattr(model, "preprocessing", None),
                               getattr(model, "class_names", None))
    pil = to_rgb8(image) if isinstance(image, Image.Image) else load_image(image)
    try:
        x = model.preprocessing.transform()(pil).unsqueeze(0)
    except ImageReadError as e:
        raise ImageReadError(f"{image if not isinstance(image, Image.Image) else '<image>'}: "
                             f"{e}") from None
    scores = model.classify(x)[0].cpu()
    label = int(scores.argmax())
    result = {"pred_scores": scores, "pred_label": label, "pred_score": float(scores[label])}
    if model.class_names:
        result["pred_class"] = model.class_names[label]
    return result
