"""int8 post-training static quantization for CPU, with torch's own stack: FX graph mode
(torch.ao.quantization.quantize_fx), which torch 2.6-2.14 ship without extra packages
(deprecated in 2.14 in favour of torchao's pt2e flow; docs/export.md).

What is quantized and how (int8_recipe):
  * weights: int8, per output channel, symmetric (torch's default for x86);
  * activations: uint8 with ranges from histogram observers on calibration photos, all 8 bits
    on a CPU with AVX512-VNNI, where torch's oneDNN qconfig also uses them; 7 bits (reduce_range,
    torch's x86 default) otherwise, because fbgemm's AVX2 kernels sum pairs of u8*s8
    products in int16, which full-range activations can overflow;
  * conv + BN + ReLU fused; the layers named in float_layers stay float32: by default the
    classifier head (`fc`: 0.05% of resnext50_32x4d's multiply-adds at 1000 classes, and
    where rounding noise of the pooled features goes straight into the logits); 'stem' adds
    the 7x7 conv (conv1, bn1, relu, maxpool), which sees the raw pixels.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .runtime import quiet_torch

__all__ = ["FLOAT_LAYERS", "cpu_has_vnni", "int8_recipe", "quantize_int8"]

#: float_layers choices -> the ResNeXt submodules they keep in float32.
FLOAT_LAYERS = {"head": ("fc",), "stem": ("conv1", "bn1", "relu", "maxpool")}


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI, by torch's own check (torch.cpu._is_vnni_supported,
    which does not yet count AVX-VNNI; False where torch lacks the check)."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check and check())


def int8_recipe(backend: str = "x86", float_layers: Sequence[str] = ("head",),
                full_range: bool | None = None) -> dict:
    """How quantize_int8 quantizes with these arguments, as plain JSON (for an int8 file's
    meta['quantization']).

    Args:
        backend: the quantized engine: 'x86' (fbgemm + oneDNN), the one measured and tested
            here (qnnpack, ARM's, has other defaults this recipe does not describe).
        float_layers: FLOAT_LAYERS keys kept in float32.
        full_range: 8-bit activations; None: cpu_has_vnni() (module docstring).
    Returns:
        {'dtype': 'int8', 'backend', 'activation_bits' (8 or 7), 'float_layers' (list),
         'method'}.
    Raises:
        ConfigError: another backend, or an unknown float_layers name.
    """
    if backend != "x86":
        raise ConfigError(f"int8 export supports the 'x86' quantized engine, not {backend!r}")
    unknown = sorted(set(float_layers) - set(FLOAT_LAYERS))
    if unknown:
        raise ConfigError(f"unknown float layer {', '.join(unknown)}; known: "
                          f"{', '.join(FLOAT_LAYERS)}")
    full = cpu_has_vnni() if full_range is None else full_range
    return {"dtype": "int8", "backend": backend, "activation_bits": 8 if full else 7,
            "float_layers": [name for name in FLOAT_LAYERS if name in float_layers],
            "method": "torch.ao.quantization FX post-training static, per-channel int8 "
                      "weights, histogram-observed uint8 activations"}


def _qconfig_mapping(recipe: dict):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import (HistogramObserver,
                                                default_per_channel_weight_observer)

    mapping = get_default_qconfig_mapping(recipe["backend"])
    if recipe["activation_bits"] == 8:
        # The global qconfig covers every op of a ResNeXt (conv, linear, add, pooling);
        # torch's per-type entries for ops it lacks (ConvTranspose, LayerNorm, ...) stay.
        mapping.set_global(QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                                   weight=default_per_channel_weight_observer))
    for layer in recipe["float_layers"]:
        for name in FLOAT_LAYERS[layer]:
            mapping.set_module_name(name, None)
    return mapping


def quantize_int8(model: nn.Module, calibration_batches: Iterable[torch.Tensor],
                  backend: str = "x86", float_layers: Sequence[str] = ("head",),
                  full_range: bool | None = None) -> nn.Module:
    """Post-training static int8 quantization for CPU (prepare_fx, calibration, convert_fx),
    as int8_recipe(backend, float_layers, full_range) describes.

    Args:
        model: the eval-mode float32 ResNeXt (not modified: a copy is quantized).
        calibration_batches: (B, 3, crop, crop) float32 images prepared with the weights'
            preprocessing; the observers record activation ranges over all of them (tens of
            photos from the deployment's domain are enough).
        backend: the quantized engine, 'x86' (fbgemm + oneDNN; int8_recipe); set as
            torch.backends.quantized.engine, which must also be the engine of the process
            that runs the result (resnext.artifacts sets it from the file's meta).
        float_layers, full_range: see int8_recipe.
    Returns:
        A torch.fx.GraphModule: float32 (N, 3, crop, crop) in, float32 logits out, int8 in
        between; resnext.export.export_torchscript saves it.
    Raises:
        ConfigError: no calibration batch, a backend other than x86 or one this torch build
            lacks, an unknown float layer, or a torch without torch.ao.quantization's FX mode.
    """
    recipe = int8_recipe(backend, float_layers, full_range)
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"this torch build has no {backend!r} quantized engine (it has "
                          f"{', '.join(torch.backends.quantized.supported_engines)})")
    with quiet_torch():
        try:
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
            mapping = _qconfig_mapping(recipe)
        except ImportError as e:
            raise ConfigError(f"torch {torch.__version__} has no FX graph mode quantization "
                              f"(torch.ao.quantization.quantize_fx): {e}") from None
        torch.backends.quantized.engine = backend
        batches = iter(calibration_batches)
        first = next(batches, None)
        if first is None:
            raise ConfigError("int8 calibration needs at least one image")
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, example_inputs=(first,))
        with torch.no_grad():
            prepared(first)
            for batch in batches:
                prepared(batch)
        return convert_fx(prepared)
