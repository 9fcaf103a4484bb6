"""Training-recipe parts beside mmpretrain's: parameter groups with their own weight decay,
SGD or AdamW, a cosine schedule with linear warmup, and batch mixing (MixUp / CutMix), each
built from torch and torchvision as torchvision's references/classification does.

The default recipe (mmpretrain configs/_base_/schedules/imagenet_bs256.py) uses none of this:
SGD on all parameters with one weight decay and lr x0.1 at epochs 30/60/90; train.py builds
it exactly as before when no option here is given.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .datasets import sample_seed
from .errors import ConfigError

__all__ = ["NORM_CLASSES", "parameter_groups", "build_optimizer", "build_scheduler",
           "BatchMixer", "with_lr_multipliers", "inverse_frequency_weights", "ema_decay",
           "ModelEMA", "unwrap", "PRESETS"]

# Module types whose parameters count as normalisation (torchvision references'
# utils.set_weight_decay default).
NORM_CLASSES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, weight_decay: float,
                     norm_weight_decay: float | None = None,
                     bias_weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups with their own weight decay (torchvision's rule).

    Biases (parameters named `bias`) get `bias_weight_decay` when given; other parameters of
    normalisation modules (NORM_CLASSES, found by module type) get `norm_weight_decay` when
    given; everything else gets `weight_decay`. Frozen parameters (requires_grad False) are
    left out. With neither option, one group holds every trainable parameter.

    Args:
        model: the model (unwrapped).
        weight_decay, norm_weight_decay, bias_weight_decay: L2 factors.
    Returns:
        [{'params': [...], 'weight_decay': w, 'name': 'other' | 'norm' | 'bias'}, ...], the
        non-empty groups in that order.
    """
    groups: dict[str, list[nn.Parameter]] = {"other": [], "norm": [], "bias": []}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if bias_weight_decay is not None and name == "bias":
                groups["bias"].append(param)
            elif norm_weight_decay is not None and isinstance(module, NORM_CLASSES):
                groups["norm"].append(param)
            else:
                groups["other"].append(param)
    decay = {"other": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    return [{"params": params, "weight_decay": decay[key], "name": key}
            for key, params in groups.items() if params]


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (mmpretrain's and torchvision's ResNet recipes) or AdamW.

    Args:
        name: 'sgd' or 'adamw'.
        params: parameters or parameter groups (parameter_groups); a group's own
            weight_decay wins over `weight_decay`.
        lr: learning rate (for the run's total batch); momentum: SGD only.
        fused: the fused kernel (CUDA; also on CPU in recent torch).
    Raises:
        ConfigError (a ValueError): an unknown name.
    """
    extra = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               **extra)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)
    raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int,
                    milestones: Sequence[int] = (30, 60, 90), gamma: float = 0.1,
                    warmup_epochs: int = 0, warmup_lr_factor: float = 0.01,
                    min_lr: float = 0.0):
    """The lr schedule, stepped once per epoch (after it), as torchvision's reference does.

    'step': lr x gamma at each milestone epoch (MultiStepLR; mmpretrain's imagenet_bs256).
    'cosine': cosine annealing from the base lr to min_lr over the epochs after warmup
    (CosineAnnealingLR, T_max = epochs - warmup_epochs). Either can start with a linear
    warmup from base lr x warmup_lr_factor to the base lr over warmup_epochs (LinearLR, then
    SequentialLR): epoch e < warmup_epochs runs at lr x (f + (1 - f) x e / warmup_epochs).
    Milestones stay absolute epochs with a warmup.

    Raises:
        ConfigError (a ValueError): an unknown kind, or warmup not shorter than the run.
    """
    if kind not in ("step", "cosine"):
        raise ConfigError(f"lr scheduler must be 'step' or 'cosine', got {kind!r}")
    if warmup_epochs and warmup_epochs >= epochs:
        raise ConfigError(f"--warmup-epochs {warmup_epochs} must be below --epochs {epochs}")
    sched = torch.optim.lr_scheduler
    if kind == "step":
        shifted = [m - warmup_epochs for m in milestones]
        main = sched.MultiStepLR(optimizer, shifted if warmup_epochs else list(milestones),
                                 gamma)
    else:
        main = sched.CosineAnnealingLR(optimizer, T_max=epochs - warmup_epochs, eta_min=min_lr)
    if not warmup_epochs:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=warmup_lr_factor, total_iters=warmup_epochs)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


class BatchMixer:
    """MixUp and/or CutMix on whole batches (torchvision.transforms.v2), one of the two
    chosen per batch with equal chance when both are on (torchvision's reference).

    Runs in the training loop, after the batch reached the device, with torch's RNG seeded
    from (seed, epoch, batch index, rank): the mixing is the same whatever the number of
    loader workers and after a resume.

    Args:
        num_classes: classifier outputs (the targets become (N, num_classes) float).
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters; 0 turns one off.
        seed: the run's --seed.
    Call: (images (N, 3, H, W) float, labels (N,) int64, epoch, batch index, rank) ->
        (mixed images, soft targets (N, num_classes) float32, rows summing to 1).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 seed: int = 0):
        from torchvision.transforms import v2  # training only
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ConfigError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix: Callable = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, index: int,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(sample_seed(self.seed, epoch, index * 4096 + rank))
        return self.mix(images, labels)


def with_lr_multipliers(groups: list[dict], model: nn.Module, lr: float,
                        head_lr_mult: float = 1.0, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Split parameter groups into classifier (`fc.*`) and backbone parts, each with its own
    lr: lr x head_lr_mult for the head, lr x backbone_lr_mult for the rest (fine-tuning:
    a fresh head learns faster than pretrained features). Schedules scale each group's lr.

    Args:
        groups: parameter_groups' output (each group keeps its weight decay).
        model: the model they came from (to find the head's parameters).
        lr: the base learning rate.
    Returns:
        Groups with 'lr' and a name such as 'head/other' or 'backbone/norm'; empty ones left
        out.
    """
    head = {id(p) for p in model.fc.parameters()}
    out = []
    for group in groups:
        for part, mult in (("backbone", backbone_lr_mult), ("head", head_lr_mult)):
            params = [p for p in group["params"] if (id(p) in head) == (part == "head")]
            if params:
                out.append({**group, "params": params, "lr": lr * mult,
                            "name": f"{part}/{group['name']}"})
    return out


def inverse_frequency_weights(targets, num_classes: int) -> torch.Tensor:
    """Cross-entropy class weights for an imbalanced training set: N / (C x n_c), so that
    every class weighs the same in the loss and the mean weight over the samples is 1
    (scikit-learn's 'balanced' rule). A class without images gets weight 0.

    Returns:
        (num_classes,) float32.
    """
    counts = torch.bincount(torch.as_tensor(list(targets)), minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), 0.0)
    return weights.float()


def ema_decay(decay: float, update_every: int, world_size: int, batch_size: int,
              epochs: int) -> float:
    """The per-update EMA decay torchvision's reference uses: the per-image decay `decay`
    (0.99998 in the V2 recipe) adjusted for the images between updates and the run's length,
    alpha = min(1, (1 - decay) x world_size x batch_size x update_every / epochs), decay =
    1 - alpha (references/classification/train.py).

    Args:
        decay: the nominal decay; update_every: optimizer steps between updates;
        world_size, batch_size: processes and images per process; epochs: the run's epochs.
    Returns:
        The decay applied at each update, in [0, 1).
    """
    alpha = min(1.0, (1.0 - decay) * world_size * batch_size * update_every / epochs)
    return 1.0 - alpha


class ModelEMA(torch.optim.swa_utils.AveragedModel):
    """Exponential moving average of a model's parameters and buffers (BatchNorm statistics
    too), torchvision's ExponentialMovingAverage: avg <- decay x avg + (1 - decay) x current;
    the first update copies the model.

    Args:
        model: the (unwrapped) model to average; a deep copy is kept in `.module`.
        decay: the per-update decay (ema_decay).
    """

    def __init__(self, model: nn.Module, decay: float):
        def average(averaged, current, num_averaged):
            return decay * averaged + (1.0 - decay) * current

        super().__init__(model, avg_fn=average, use_buffers=True)
        self.decay = decay


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's and DDP's wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


#: Named recipes (train.py --recipe): flag defaults, overridden by explicit flags.
#: 'torchvision-v2' is the command torchvision published for its IMAGENET1K_V2 ResNet-50 and
#: ResNeXt weights (references/classification/README.md): 8 GPUs x 128, lr 0.5 for that
#: total batch of 1024.
PRESETS: dict[str, dict] = {
    "mmpretrain": {},
    "torchvision-v2": dict(
        batch_size=128, lr=0.5, lr_reference_batch=1024, lr_scheduler="cosine",
        warmup_epochs=5, warmup_lr_factor=0.01, epochs=600, auto_augment="ta_wide",
        random_erase=0.1, label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0,
        weight_decay=2e-5, norm_weight_decay=0.0, model_ema=True, model_ema_steps=32,
        model_ema_decay=0.99998, train_crop_size=176, val_resize_size=232, val_crop_size=224,
        ra_reps=4),
}
