"""Parameter and multiply-accumulate (MAC) counts, comparable with mmpretrain's table.

mmpretrain's "Flops (G)" column comes from mmcv's counter (mmcv/cnn/utils/flops_counter.py),
which counts multiply-accumulates of convolutions and linear layers and, on top, BatchNorm as
2 per input element (affine), ReLU as 1 per output element and pooling as 1 per input element.
torch.utils.flop_counter counts convolutions and matmuls only. We report both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Complexity", "get_complexity"]


@dataclass(frozen=True)
class Complexity:
    """Model size and cost for one image.

    Attributes:
        params: number of parameters (all, trainable or not).
        conv_fc_macs: multiply-accumulates of convolutions and linear layers for one image
            (what torch.utils.flop_counter reports, divided by 2).
        macs: conv_fc_macs plus mmcv's BatchNorm (2/element), ReLU and pooling (1/element)
            terms: the number mmpretrain's metafile gives as "FLOPs".
        input_size: (H, W) in pixels the counts were measured at.
    """
    params: int
    conv_fc_macs: int
    macs: int
    input_size: tuple[int, int]


def get_complexity(model: nn.Module, input_size: int | tuple[int, int] = 224) -> Complexity:
    """Count parameters and MACs of `model` on one (1, 3, H, W) input.

    Runs one forward pass in eval mode under torch.no_grad, with hooks on every leaf module;
    a module used several times (the shared ReLU of a block) is counted at each call.

    Args:
        model: any module taking (1, 3, H, W) float images; left in its original mode.
        input_size: H = W in pixels, or (H, W). Default 224, mmpretrain's test crop.
    Returns:
        Complexity with params, conv_fc_macs and macs as Python ints.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    conv_fc = 0
    other = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal conv_fc, other
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            # MACs per output element: kernel area * input channels of one group.
            k = module.kernel_size[0] * module.kernel_size[1]
            conv_fc += output.numel() * k * module.in_channels // module.groups
            if module.bias is not None:
                other += output.numel()
        elif isinstance(module, nn.Linear):
            conv_fc += x.numel() * module.out_features  # mmcv adds nothing for the bias
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            other += x.numel() * (2 if module.affine else 1)
        elif isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.PReLU)):
            other += output.numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                 nn.AdaptiveMaxPool2d)):
            other += x.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not list(m.children())]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w, dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return Complexity(params, conv_fc, conv_fc + other, (h, w))
