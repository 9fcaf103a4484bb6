"""Train a ResNeXt on ImageNet-style data: mmpretrain's recipe in one plain loop.

    torchrun --standalone --nproc_per_node=8 train.py --data /data/imagenet --model resnext50_32x4d --work-dir work_dirs/rx50
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 train.py --data /data/imagenet ...
    python train.py --data hymenoptera_data --img-size 112 --epochs 5 --auto-scale-lr

Defaults are configs/_base_/schedules/imagenet_bs256.py: 32 images per process on 8 processes
(a total batch of 256), SGD lr 0.1 momentum 0.9 weight decay 1e-4 on all parameters, lr x0.1
at epochs 30/60/90, 100 epochs, RandomResizedCrop 224 + flip, validation every epoch.
`--data` holds train/ and val/ class folders, or mmpretrain's meta/train.txt and meta/val.txt
(paths relative to train/ and val/), which are used when present.

Sections, in reading order: args -> data -> one epoch -> checkpoints -> main (distributed
setup, model, optimizer/schedule, resume, epoch loop, cleanup). Work dir: last.pth (every
epoch), best.pth (best val top-1), log.jsonl (header, interval and epoch records).
`--resume auto` continues from last.pth if there is one, which is what
`torchrun --max-restarts=N` needs. Exit status: 0; 1 when the loss diverged; 2 for a usage or
setup error (one line on stderr); 128 + the signal number when stopped by SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import inspect
import json
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from resnext.artifacts import artifact_format
from resnext.checkpoint import read_checkpoint, save_checkpoint
from resnext.classes import imagenet_class_names
from resnext.cli import (EXIT_FAILED, HelpFormatter, add_common_args, check_output_path,
                         positive_int, printable, run_cli)
from resnext.datasets import (BalancedDistributedSampler, EpochTaggedSampler,
                              RepeatedAugmentationSampler, SeededAugmentation, build_dataset)
from resnext.distributed import cleanup_distributed, init_distributed
from resnext import recipes
from resnext.errors import (CheckpointError, CheckpointNotFoundError, ConfigError, DatasetError,
                            MissingDependencyError, ResNeXtError)
from resnext.evaluation import build_loader, count_topk, evaluate, topk_for
from resnext.images import load_image, pixel_limit_worker_init, set_max_image_pixels
from resnext.inference import InferenceModel
from resnext.recipes import BatchMixer, ModelEMA, ema_decay, parameter_groups, unwrap
from resnext.runtime import (amp_name, autocast, fit_loader_to_shared_memory, maybe_compile,
                             resolve_amp, select_kernels)
from resnext.transforms import FastTrainTransform, Normalize, Preprocessing, train_transform
from resnext.weights import RELEASED_WEIGHTS, get_model, list_weights, load_weights


class RecipeParser(argparse.ArgumentParser):
    """An ArgumentParser whose --recipe preset sets the defaults of the flags it names, so
    that flags given explicitly override the preset (two passes: find --recipe, then parse
    with its defaults)."""

    def parse_known_args(self, args=None, namespace=None):
        if namespace is None:
            if not hasattr(self, "_own_defaults"):
                keys = {k for preset in recipes.PRESETS.values() for k in preset}
                self._own_defaults = {k: self.get_default(k) for k in keys}
            probe, _ = super().parse_known_args(args, argparse.Namespace(
                **self._own_defaults, recipe=self.get_default("recipe")))
            self.set_defaults(**{**self._own_defaults, **recipes.PRESETS[probe.recipe]})
        return super().parse_known_args(args, namespace)


def get_args_parser() -> argparse.ArgumentParser:
    p = RecipeParser(description="ResNeXt training (mmpretrain imagenet_bs256 recipe)",
                     formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="root with train/ and val/ (and optionally "
                   "meta/train.txt, meta/val.txt)")
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs to train")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate for a total batch "
                   "of 256 (used as is unless --auto-scale-lr)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="SGD weight decay, on all parameters (BN and biases included)")
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 60, 90],
                   help="epochs at which lr is multiplied by --gamma")
    p.add_argument("--gamma", type=float, default=0.1, help="lr factor at each milestone")
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale lr linearly by total batch / 256 (mmpretrain auto_scale_lr)")
    p.add_argument("--accum-steps", type=positive_int, default=1,
                   help="micro-batches per optimizer step (total batch = batch-size x "
                        "processes x accum-steps)")
    p.add_argument("--val-interval", type=positive_int, default=1, help="validate every N epochs")
    p.add_argument("--log-interval", type=positive_int, default=100,
                   help="optimizer steps between log records (and loss / NaN checks)")
    p.add_argument("--work-dir", default=None, help="default: work_dirs/<model>")
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue a run from its checkpoint; 'auto': work-dir/last.pth if it "
                        "exists, else start fresh")
    p.add_argument("--load-from", default=None, help="initialise weights from any supported "
                   "checkpoint (the head is reset if the class count differs)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order and "
                   "augmentation (drawn per sample from seed, epoch and sample index)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (bitwise-reproducible runs, slower on GPU)")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--fast-decode", action="store_true",
                   help="training images: decode JPEGs at reduced scale when the crop allows, "
                        "crop as uint8 tensors and normalise whole batches on the device (same "
                        "random crops/flips; resnext.transforms.FastTrainTransform)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes "
                   "(the recipe uses per-process BN)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write log.jsonl's scalars (loss, lr, top-1/top-k, images/s) to "
                        "work-dir/tensorboard (needs: pip install -e \".[tensorboard]\")")
    p.add_argument("--dist-timeout", type=float, default=1800,
                   help="seconds before a collective waiting on a dead peer fails")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # torch.distributed.launch compatibility
    add_common_args(p, training=True)
    add_recipe_args(p)
    return p


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """Options beside mmpretrain's recipe, with torchvision's references' meanings; none is
    on by default, so the default run is mmpretrain's."""
    g = p.add_argument_group("recipe options (torchvision references/classification)")
    g.add_argument("--recipe", choices=sorted(recipes.PRESETS), default="mmpretrain",
                   help="a preset of the flags below and of batch, lr, epochs and weight "
                        "decay; explicit flags override it. torchvision-v2: 8 x 128, lr 0.5 "
                        "for that total batch of 1024, cosine, 5 warmup epochs, 600 epochs, "
                        "TrivialAugment, random erasing 0.1, label smoothing 0.1, mixup 0.2, "
                        "cutmix 1.0, wd 2e-5 (0 on norm layers), EMA, crop 176, val resize "
                        "232, repeated augmentation 4")
    g.add_argument("--lr-reference-batch", type=positive_int, default=256,
                   help="the total batch --lr is for (--auto-scale-lr scales by total batch "
                        "/ this)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd (momentum --momentum) or adamw")
    g.add_argument("--lr-scheduler", choices=["step", "cosine"], default="step",
                   help="step: x --gamma at --milestones; cosine: to --min-lr over the epochs "
                        "after warmup; both stepped once per epoch")
    g.add_argument("--warmup-epochs", type=int, default=0,
                   help="linear lr warmup, from lr x --warmup-lr-factor, over these epochs")
    g.add_argument("--warmup-lr-factor", type=float, default=0.01,
                   help="the warmup's first-epoch lr as a fraction of the lr")
    g.add_argument("--min-lr", type=float, default=0.0, help="cosine's final lr")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing (0.1 in torchvision's V2 recipe)")
    g.add_argument("--mixup-alpha", type=float, default=0.0,
                   help="MixUp Beta(alpha, alpha) on batches; with --cutmix-alpha one of the "
                        "two per batch")
    g.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix Beta(alpha, alpha)")
    g.add_argument("--auto-augment", choices=["ta_wide", "ra", "imagenet"], default=None,
                   help="TrivialAugmentWide, RandAugment or AutoAugment (ImageNet policy)")
    g.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                   help="RandomErasing probability")
    g.add_argument("--norm-weight-decay", type=float, default=None,
                   help="weight decay of normalisation layers (default: --weight-decay)")
    g.add_argument("--bias-weight-decay", type=float, default=None,
                   help="weight decay of biases (default: --weight-decay)")
    g.add_argument("--model-ema", action="store_true",
                   help="keep an exponential moving average of the weights, validate it each "
                        "epoch beside the raw ones and save it in the checkpoint")
    g.add_argument("--model-ema-steps", type=positive_int, default=32,
                   help="optimizer steps between EMA updates")
    g.add_argument("--model-ema-decay", type=float, default=0.99998,
                   help="EMA decay, adjusted for batch, world size and steps as torchvision's "
                        "reference does")
    g.add_argument("--ra-reps", type=positive_int, default=1,
                   help="repeated augmentation: copies of each image per epoch, spread over "
                        "the ranks (1: off)")
    g.add_argument("--train-crop-size", type=positive_int, default=None,
                   help="training crop in pixels (default: --img-size, else 224)")
    g.add_argument("--val-crop-size", type=positive_int, default=None,
                   help="validation centre crop (default: the training crop)")
    g.add_argument("--val-resize-size", type=positive_int, default=None,
                   help="validation short side before the crop (default: crop / 0.875)")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--pretrained", action="store_true",
                   help="start from the released weights of --model (the head is reset when "
                        "the class count differs); --load-from FILE for any other weights")
    f.add_argument("--frozen-stages", type=int, default=-1, choices=range(-1, 5),
                   metavar="N", help="mmpretrain's meaning: -1 none, 0 the stem, k the stem "
                   "and stages 1..k (no gradients, BatchNorm kept in eval)")
    f.add_argument("--head-lr-mult", type=float, default=1.0,
                   help="the classifier's lr is lr x this")
    f.add_argument("--backbone-lr-mult", type=float, default=1.0,
                   help="the backbone's lr is lr x this")
    f.add_argument("--class-balance", choices=["sampler", "loss"], default=None,
                   help="imbalanced classes: draw classes uniformly (a weighted sampler, "
                        "sharded across ranks) or weight the loss by inverse class frequency")


def resolve_recipe(args: argparse.Namespace) -> None:
    """Fill the derived sizes in `args` (the log header records the resolved values) and
    refuse combinations that cannot work.

    Raises:
        ConfigError (a ValueError): --fast-decode with an augmentation it does not do.
    """
    args.train_crop_size = args.train_crop_size or args.img_size or 224
    args.val_crop_size = args.val_crop_size or args.train_crop_size
    Preprocessing(args.val_crop_size, args.val_resize_size)  # checks the sizes
    if args.fast_decode and (args.auto_augment or args.random_erase):
        raise ConfigError("--fast-decode does the default recipe's crop and flip only; drop "
                          "it to use --auto-augment / --random-erase")
    if args.ra_reps > 1 and args.class_balance == "sampler":
        raise ConfigError("--ra-reps and --class-balance sampler both choose the samples: "
                          "use one (or --class-balance loss)")
    if args.pretrained:
        if args.load_from:
            raise ConfigError("--pretrained and --load-from both give initial weights: pick one")
        release = RELEASED_WEIGHTS.get(args.model)
        if release is None:
            known = ", ".join(r.name for r in list_weights(args.model)) or "none"
            raise ConfigError(f"--pretrained: {args.model} has no released weights of its "
                              f"own name (published for it: {known}; give --model one of "
                              f"those); or use --load-from FILE")
        args.load_from = release.url


class NonFiniteLoss(ResNeXtError, RuntimeError):
    """The loss became NaN or infinite; the message gives epoch, step and learning rate."""

    exit_status = EXIT_FAILED


class Stopped(BaseException):
    """SIGTERM/SIGINT arrived (also what torchrun sends survivors when it restarts a group)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_signals = {"held": False, "pending": None}


def _on_signal(signum, frame):
    # While checkpoints are written the signal waits until the files are complete and
    # renamed: interrupting torch.save would only turn a clean exit into a serializer error.
    if _signals["held"]:
        _signals["pending"] = signum
    else:
        raise Stopped(signum)


@contextmanager
def signals_held():
    """Hold SIGTERM/SIGINT back for the block (checkpoint writes), then act on them.

    SIGCHLD too: a signal sent to the whole process group (Ctrl-C, torchrun stopping a group)
    also ends the persistent loader workers, and torch's SIGCHLD handler would raise in the
    middle of the write; the dead workers are still noticed at the next batch."""
    _signals["held"] = True
    sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, sigchld)
        _signals["held"] = False
    if _signals["pending"] is not None:
        raise Stopped(_signals["pending"])


def plain(value):
    """args values as plain Python types (weights-only loadable)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


# --- data ------------------------------------------------------------------------------------

def build_datasets(root: Path, img_size: int, fast_decode: bool = False,
                   preprocessing: Preprocessing | None = None, auto_augment: str | None = None,
                   random_erase: float = 0.0):
    """train/val datasets from class folders, or meta/train.txt + meta/val.txt if present.

    img_size is the training crop; preprocessing the validation one (default: crop img_size,
    resize img_size / 0.875). Returns (train dataset, val dataset, class names, validation
    Preprocessing)."""
    ann_train, ann_val = root / "meta" / "train.txt", root / "meta" / "val.txt"
    # FastTrainTransform decodes from the path itself and hands over uint8 crops, which
    # train_one_epoch normalises on the device; the reference decodes with load_image and
    # normalises in the worker, as torchvision does. Validation crops are uint8 either way
    # (InferenceModel normalises them, bitwise as evaluate.py does).
    train_tf, train_loader = (
        (FastTrainTransform(img_size, normalize=False), str) if fast_decode else
        (train_transform(img_size, auto_augment, random_erase), load_image))
    preprocessing = preprocessing or Preprocessing(crop_size=img_size)
    val_tf = preprocessing.transform(normalize=False)
    if ann_train.is_file() and ann_val.is_file():
        train_ds = build_dataset(root / "train", ann_train, train_tf, loader=train_loader)
        num_classes = max(train_ds.targets) + 1
        classes = [str(i) for i in range(num_classes)]
        if num_classes == 1000:
            classes = imagenet_class_names()
        val_ds = build_dataset(root / "val", ann_val, val_tf)
    else:
        for split in ("train", "val"):
            _check_split(root, split)
        train_ds = build_dataset(root / "train", None, train_tf, loader=train_loader)
        classes = list(train_ds.classes)
        val_ds = build_dataset(root / "val", None, val_tf, class_names=classes)
    if len(classes) < 2:
        raise DatasetError(f"{root / 'train'}: {len(classes)} class ({', '.join(classes)}); a "
                           f"classifier needs at least 2 classes (with one, the loss is 0 and "
                           f"accuracy 100% from the first step, whatever the model learns)")
    return train_ds, val_ds, classes, preprocessing


def _check_split(root: Path, split: str) -> None:
    """train.py's layout, said in its own words: root/train/<class>/<image> and
    root/val/<class>/<image> (a root one level too deep or too high is named)."""
    if (root / split).is_dir():
        return
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    deeper = [name for name in found if (root / name / split).is_dir()]
    hint = (f"; did you mean --data {root / deeper[0]}?" if deeper else
            f"; {root} is itself the {root.name} split: give its parent" if root.name in (
                "train", "val") else f"; it holds {', '.join(found[:10]) or 'no folders'}")
    raise DatasetError(f"--data {root}: no {split}/ folder. train.py expects "
                       f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (or "
                       f"meta/train.txt and meta/val.txt beside them){hint}")


def build_train_loader(dataset, args, rank: int, world_size: int, pin_memory: bool):
    """Shuffled, sharded, drop_last loader whose workers live for the whole run; returns
    (loader, its EpochTaggedSampler, optimizer steps per epoch).

    Each sample's augmentation is drawn from a generator seeded by (seed, epoch, sample
    index) (SeededAugmentation), so an epoch replays exactly on resume whatever the number
    of workers, and the workers need no reseeding between epochs."""
    if getattr(args, "class_balance", None) == "sampler":
        shards = BalancedDistributedSampler(dataset.targets, world_size, rank, args.seed)
    elif getattr(args, "ra_reps", 1) > 1:
        shards = RepeatedAugmentationSampler(len(dataset), world_size, rank, args.seed,
                                             args.ra_reps)
    else:
        shards = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                    seed=args.seed, drop_last=True)
    sampler = EpochTaggedSampler(shards)
    # uint8 crops with --fast-decode, else float32 (4 bytes a value) from the reference path
    crop_bytes = 3 * (args.train_crop_size or args.img_size or 224) ** 2 * (
        1 if args.fast_decode else 4)
    workers, prefetch, note = fit_loader_to_shared_memory(args.workers, 4,
                                                          args.batch_size * crop_bytes)
    if note and rank == 0:
        print(f"train.py: warning: {note}", file=sys.stderr)
    loader = DataLoader(SeededAugmentation(dataset, args.seed), batch_size=args.batch_size,
                        sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=prefetch if workers > 0 else None,
                        worker_init_fn=pixel_limit_worker_init())
    steps = len(loader) // args.accum_steps
    if steps == 0:
        raise DatasetError(f"{args.data}: {len(dataset)} training images are fewer than one "
                           f"step of {args.batch_size} x {world_size} x {args.accum_steps}")
    return loader, sampler, steps


# --- one epoch -------------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, criterion, epoch: int, steps: int,
                    args, device: torch.device, amp: torch.dtype | None, world_size: int,
                    log, is_main: bool, mixer: BatchMixer | None = None,
                    rank: int = 0, ema: ModelEMA | None = None) -> dict:
    """One pass over `loader`: `steps` optimizer steps of `args.accum_steps` micro-batches.
    With a mixer (MixUp/CutMix), the loss is taken on its soft targets and the top-k on the
    batch's own labels. With an EMA, it is updated every --model-ema-steps optimizer steps
    (from the first), and during warmup epochs it restarts from the model at each update, as
    torchvision's reference does.

    The loss, the top-k hits and a non-finite counter stay on the device; they are read on
    the host once per `--log-interval` steps (one synchronisation), where a NaN/inf loss on
    any rank stops every rank together (NonFiniteLoss) before anything is saved.

    Returns:
        {'train_loss', 'train_top1', 'train_top{k}', 'train_images'}, summed over ranks.
    """
    model.train()
    batches = iter(loader)
    num_classes = None
    epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, c1, ck
    interval = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, n, non-finite
    images_seen, data_time, start = 0, 0.0, time.perf_counter()
    normalize = Normalize()  # for --fast-decode's uint8 batches
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main,
               leave=False)
    for step in range(steps):
        for micro in range(args.accum_steps):
            wait = time.perf_counter()
            images, labels = next(batches)
            data_time += time.perf_counter() - wait
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if images.dtype == torch.uint8:
                images = normalize(images)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels, epoch,
                                        step * args.accum_steps + micro, rank)
            # Skip DDP's gradient all-reduce on micro-batches that do not step.
            last_micro = micro == args.accum_steps - 1
            sync = model.no_sync() if world_size > 1 and not last_micro else nullcontext()
            with sync:
                with autocast(device, amp):
                    logits = model(images)
                loss = criterion(logits.float(), targets)
                scaler.scale(loss / args.accum_steps).backward()
            with torch.no_grad():
                num_classes = logits.shape[1]
                n = labels.shape[0]
                loss = loss.detach().double()
                epoch_sums[0] += loss * n
                epoch_sums[1:] += count_topk(logits.detach(), labels, topk_for(num_classes))
                interval += torch.stack([loss * n, torch.ones_like(loss) * n,
                                         (~torch.isfinite(loss)).double()])
            images_seen += n
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and step % args.model_ema_steps == 0:
            ema.update_parameters(unwrap(model))
            if epoch < args.warmup_epochs:
                ema.n_averaged.fill_(0)  # the next update copies the model again
        bar.update()
        if (step + 1) % args.log_interval == 0 or step + 1 == steps:
            if world_size > 1:  # every rank learns of a NaN anywhere, and stops with the others
                dist.all_reduce(interval)
            loss_sum, n, nonfinite = interval.tolist()  # the one host synchronisation
            lr = optimizer.param_groups[0]["lr"]
            if nonfinite:
                bar.close()
                raise NonFiniteLoss(
                    f"non-finite loss ({loss_sum / n}) at epoch {epoch + 1}, step {step + 1} "
                    f"or before, lr {lr:g}; stopping. last.pth still holds the last completed "
                    f"epoch")
            elapsed = time.perf_counter() - start
            record = {"type": "train", "epoch": epoch + 1, "iter": step + 1,
                      "step": epoch * steps + step + 1, "lr": lr, "loss": loss_sum / n,
                      "time": elapsed / (images_seen / (args.batch_size * args.accum_steps)),
                      "data_time": data_time * args.batch_size * args.accum_steps / images_seen,
                      "images_per_s": images_seen * world_size / elapsed}
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}",
                            img_s=f"{record['images_per_s']:.1f}")
            interval.zero_()
            images_seen, data_time, start = 0, 0.0, time.perf_counter()
    bar.close()
    if world_size > 1:
        dist.all_reduce(epoch_sums)
    loss_sum, c1, ck = epoch_sums.tolist()
    n = steps * args.accum_steps * args.batch_size * world_size
    k = topk_for(num_classes)
    return {"train_loss": loss_sum / n, "train_top1": 100 * c1 / n,
            f"train_top{k}": 100 * ck / n, "train_images": n}


# --- checkpoints -----------------------------------------------------------------------------

def resume_from(path: str, model, optimizer, scheduler, scaler, total_batch: int,
                args, ema: ModelEMA | None = None) -> tuple[int, float, str]:
    """Restore a run. The rule (mmpretrain's): the checkpoint's optimizer state wins, so the
    lr and schedule continue as saved whatever --lr / --auto-scale-lr say now; a changed total
    batch is announced, not silently rescaled.

    Returns (next epoch, best top-1, a line saying what was resumed and the lr in use)."""
    state = read_checkpoint(path).raw
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved_ema = state.get("ema")
    if ema is not None and saved_ema:
        ema.module.load_state_dict(saved_ema["state_dict"])
        ema.n_averaged.fill_(saved_ema["n_averaged"])
    saved_scaler = state.get("scaler") or {}  # {} when the run had no fp16 GradScaler
    if scaler.is_enabled() and saved_scaler:
        scaler.load_state_dict(saved_scaler)
    lr = optimizer.param_groups[0]["lr"]
    note = (f"resumed from {path}: next epoch {state['epoch'] + 1}, best top-1 "
            f"{state['best_top1']:.2f}, lr {lr:g} (from the checkpoint")
    saved_amp = state.get("args", {}).get("amp")
    if scaler.is_enabled() != bool(saved_scaler) or saved_amp != args.amp:
        note += (f"; --amp was {saved_amp or 'fp32'} and is now {args.amp or 'fp32'}"
                 + ("; the fp16 GradScaler starts fresh" if scaler.is_enabled()
                    and not saved_scaler else ""))
    saved_batch = state.get("meta", {}).get("total_batch")
    if saved_batch is not None and saved_batch != total_batch:
        note += (f"; warning: the total batch was {saved_batch} and is now {total_batch}, "
                 f"the lr is not rescaled on resume")
    elif args.lr != state.get("args", {}).get("lr", args.lr):
        note += "; --lr is ignored on resume"
    if ema is not None and not saved_ema:
        note += "; the checkpoint has no EMA: it starts from the resumed weights"
    return state["epoch"], state["best_top1"], note + ")"


def checkpoint_state(model, optimizer, scheduler, scaler, epoch: int, best_top1: float,
                     record: dict, classes, preprocessing: Preprocessing, total_batch: int,
                     args, ema: ModelEMA | None = None) -> dict:
    """Our checkpoint layout: plain Python types and tensors only (weights-only loadable).
    With an EMA, 'ema' holds its state dict (read by the loader in place of the raw weights
    unless asked otherwise) and meta['best_weights'] says which scored higher this epoch."""
    extra = {}
    if ema is not None:
        extra["ema"] = {"state_dict": ema.module.state_dict(), "decay": ema.decay,
                        "n_averaged": int(ema.n_averaged)}
    return {**extra,
        "state_dict": model.state_dict(),
        "meta": {"model": args.model, "classes": classes,
                 "preprocessing": preprocessing.to_dict(), "total_batch": total_batch,
                 "top1": record.get("accuracy/top1"), "torch_version": str(torch.__version__),
                 "ema_top1": record.get("ema/accuracy/top1"),
                 "best_weights": record.get("best_weights", "raw")},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch + 1,  # the next epoch to run (0-based)
        "best_top1": best_top1,
        "args": {k: plain(v) for k, v in vars(args).items()},
    }


def wrap_ddp(model, device: torch.device):
    """DDP with per-process BN statistics, as the recipe (mmpretrain broadcast_buffers=False).
    torch 2.14 renamed the option forward_sync_buffers (its buffers are still synced once at
    init, which changes nothing here: every rank starts from the same weights)."""
    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    return DDP(model, device_ids=ids, broadcast_buffers=False)


# --- setup ------------------------------------------------------------------------------------

class JsonLog:
    """Appends one JSON record per line to `path` (global rank 0 only) and, with a
    TensorBoard writer, the same scalars there: interval records at their global step
    ('train/loss', 'train/lr', 'train/images_per_s'), epoch records at the epoch
    ('epoch/<key>' for the losses, top-1/top-k, EMA top-1, lr and images/s)."""

    def __init__(self, path: Path, enabled: bool, tensorboard=None):
        self.path, self.enabled, self.writer = path, enabled, tensorboard

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None or record.get("type") not in ("train", "epoch"):
            return
        step = record["step"] if record["type"] == "train" else record["epoch"]
        prefix = "train/" if record["type"] == "train" else "epoch/"
        for key, value in record.items():
            if key not in ("type", "epoch", "iter", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer():
    """torch.utils.tensorboard's SummaryWriter class, imported on every rank before any work.

    Raises:
        MissingDependencyError (an ImportError): the tensorboard package is missing.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingDependencyError('--tensorboard needs the tensorboard package: pip install '
                                     '-e ".[tensorboard]" (or pip install tensorboard)') from None
    return SummaryWriter


def prepare_work_dir(args, work_dir: Path, is_main: bool, world_size: int = 1) -> str | None:
    """Create the work dir, remove a temporary file a killed save left, and return the
    checkpoint to resume from (--resume auto: last.pth when there is one). Rank 0 decides
    and every rank takes its answer: with node-local work dirs, ranks could see different
    files and one node would resume while another starts fresh.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): an explicit --resume path does not
            exist (never a fresh start).
        CheckpointError: an explicit --resume path is an exported file (export.py's), which
            holds no optimizer state; refused before the work dir is made.
        ConfigError (a ValueError): the work dir cannot take a new file (checked before any
            work).
    """
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise CheckpointNotFoundError(f"--resume {args.resume}: no such checkpoint (use "
                                      f"--resume auto to start fresh when there is none)")
    if args.resume and args.resume != "auto" and artifact_format(args.resume):
        raise CheckpointError(f"--resume {args.resume}: an exported model "
                              f"({artifact_format(args.resume)}), not a training checkpoint; "
                              f"resume from the work dir's last.pth")
    if is_main:
        check_output_path(work_dir / "last.pth")
        for stale in work_dir.glob(".*.pth.*.tmp"):
            stale.unlink()
    resume = args.resume
    if resume == "auto":
        resume = str(work_dir / "last.pth") if (work_dir / "last.pth").is_file() else None
    if world_size > 1:
        decision = [resume]
        dist.broadcast_object_list(decision, src=0)
        resume = decision[0]
    return resume


def configure(args) -> None:
    """Signals, kernel selection and the image-size limit for this process."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    select_kernels(args.deterministic)
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)


def build_model(args, classes: list[str], device: torch.device, world_size: int,
                is_main: bool):
    """The model to train (DDP-wrapped and compiled as asked) and the raw module that
    checkpoints store (no `module.` prefix). Initial weights: mmpretrain's init from --seed,
    the same on every rank, or --load-from (head reset when the class count differs)."""
    torch.manual_seed(args.seed)
    model = get_model(args.model, num_classes=len(classes),
                      frozen_stages=getattr(args, "frozen_stages", -1))
    if args.load_from:
        ckpt = read_checkpoint(args.load_from)
        head = ckpt.state_dict.get("fc.weight")
        other_head = head is None or head.shape[0] != len(classes)
        report = load_weights(model, ckpt, reset_head=other_head, verbose=args.verbose)
        if is_main:
            print(f"init: {report}")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    if world_size > 1:
        model = wrap_ddp(model, device)
    if args.compile:
        kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
        model = maybe_compile(model, device, announce=is_main, **kwargs)
    return model, raw_model


def build_optimizer(args, raw_model, total_batch: int, amp, device: torch.device,
                    fused: bool | None = None):
    """SGD on all parameters (BN and biases included, as mmpretrain's imagenet_bs256), lr x
    gamma at each milestone epoch, and a GradScaler enabled for fp16 autocast. With
    --auto-scale-lr the lr is scaled by total_batch / 256 (mmpretrain auto_scale_lr). The
    recipe options (--optimizer, --lr-scheduler, warmup, --norm/--bias-weight-decay) swap
    in resnext.recipes' parts.

    fused: the fused SGD kernel; None: on CUDA only. It takes the GradScaler's inf check on
    the device, where the unfused step reads it on the host after every step. Both give the
    same weights to a few ulps (tested on CPU, where torch has the fused kernel too)."""
    option = vars(args).get  # recipe options absent (a hand-made args): the default recipe
    reference = option("lr_reference_batch") or 256
    lr = args.lr * total_batch / reference if args.auto_scale_lr else args.lr
    fused = device.type == "cuda" if fused is None else fused
    norm_wd, bias_wd = option("norm_weight_decay"), option("bias_weight_decay")
    mults = (option("head_lr_mult") or 1.0, option("backbone_lr_mult") or 1.0)
    params = (raw_model.parameters() if norm_wd is None and bias_wd is None else
              parameter_groups(raw_model, args.weight_decay, norm_wd, bias_wd))
    if mults != (1.0, 1.0):
        params = recipes.with_lr_multipliers(
            parameter_groups(raw_model, args.weight_decay, norm_wd, bias_wd), raw_model, lr,
            *mults)
    optimizer = recipes.build_optimizer(option("optimizer") or "sgd", params, lr,
                                        args.momentum, args.weight_decay, fused)
    scheduler = recipes.build_scheduler(optimizer, option("lr_scheduler") or "step",
                                        args.epochs, args.milestones, args.gamma,
                                        option("warmup_epochs") or 0,
                                        option("warmup_lr_factor") or 0.01,
                                        option("min_lr") or 0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return optimizer, scheduler, scaler


def validate(raw_model, val_loader, device, amp, preprocessing, classes, args,
             world_size: int, is_main: bool) -> dict:
    """resnext.evaluation.evaluate on the raw model. With per-process BN, rank 0's statistics are
    broadcast first: what last.pth stores, so this equals evaluate.py on the checkpoint."""
    if world_size > 1 and not args.sync_bn:
        for buffer in raw_model.buffers():
            dist.broadcast(buffer, src=0)
    evaluator = InferenceModel(raw_model, device, amp, args.channels_last, preprocessing,
                               classes, len(classes), args.model)
    return evaluate(evaluator, val_loader, progress=is_main)


def validate_ema(ema: ModelEMA, val_loader, device, amp, preprocessing, classes, args,
                 world_size: int, is_main: bool) -> dict:
    """The EMA weights validated as the raw ones are; returns the epoch record's 'ema/...'
    entries and 'best_weights': 'ema' when the EMA's top-1 beats the raw one's."""
    result = validate(ema.module, val_loader, device, amp, preprocessing, classes, args,
                      world_size, is_main)
    out = {f"ema/accuracy/{key}": value for key, value in result.items()
           if key.startswith("top")}
    out["ema/val_loss"] = result["loss"]
    return out


def announce(args, log, is_main: bool, **facts) -> None:
    """The log's header record and the start line: what this run trains with (the lr is the
    one the next step uses, after any resume)."""
    log({"type": "header", "args": {k: plain(v) for k, v in vars(args).items()}, **facts})
    if is_main:
        scaled = " (auto-scaled)" if args.auto_scale_lr and not facts["resumed"] else ""
        print(f"{args.model}: {facts['num_train']} train / {facts['num_val']} val images, "
              f"{facts['classes']} classes; {facts['world_size']} process(es) x "
              f"{args.batch_size} x {args.accum_steps} accum = total batch "
              f"{facts['total_batch']}, lr {facts['lr']:g}{scaled}; {facts['amp']} on "
              f"{facts['device']}")
        print(fine_tuning_line(args, facts["groups"]))
        decays = [m for m in args.milestones if facts["start_epoch"] < m < args.epochs]
        if (args.lr_scheduler == "step" and args.milestones and not decays
                and facts["start_epoch"] < args.epochs):
            print(f"note: no lr milestone ({', '.join(map(str, args.milestones))}) falls "
                  f"before epoch {args.epochs}: the lr stays {facts['lr']:g} for the whole "
                  f"run (e.g. --milestones {max(1, args.epochs * 3 // 10)} "
                  f"{max(2, args.epochs * 6 // 10)} {max(3, args.epochs * 9 // 10)} scales "
                  f"the recipe's 30/60/90 of 100)")


def fine_tuning_line(args, groups: list[dict]) -> str:
    """What is frozen, how classes are balanced, and the lr of each parameter group."""
    stages = args.frozen_stages
    frozen = ("nothing frozen" if stages < 0 else "frozen: the stem" + (
        f" and stages 1-{stages}" if stages > 1 else " and stage 1" if stages == 1 else "")
        + " (no gradients, BatchNorm in eval)")
    balance = f"; class balance: {args.class_balance}" if args.class_balance else ""
    parts = ", ".join(f"{g['name']} lr {g['lr']:g} wd {g['weight_decay']:g} "
                      f"({g['parameters']:,} parameters)" for g in groups)
    return f"{frozen}{balance}; optimizer groups: {parts}"


def epoch_line(record: dict, epochs: int) -> str:
    """The line printed at each epoch end."""
    val = ""
    if "val_images" in record:
        val = f"  val top-1 {record['accuracy/top1']:.2f}"
        for key, value in record.items():  # top-5, or top-k with fewer than 5 classes
            if key.startswith("accuracy/top") and key != "accuracy/top1":
                val += f" top-{key[len('accuracy/top'):]} {value:.2f}"
        val += f" ({record['val_images']} images)"
        if "ema/accuracy/top1" in record:
            val += f"  EMA top-1 {record['ema/accuracy/top1']:.2f}"
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
            f"top-1 {record['train_top1']:.2f}{val}  lr {record['lr']:.3g}  "
            f"{record['images_per_s']:.1f} img/s  {record['epoch_time']:.1f}s")


def final_line(work_dir: Path, best_top1: float, best_epoch: tuple[int, str | None] | None,
               start_epoch: int, epochs: int) -> str:
    """The run's last line: the best checkpoint, its val top-1, its epoch and (with an EMA)
    which weights scored it."""
    if start_epoch >= epochs:
        return (f"nothing to train: the run already finished its {epochs} epochs "
                f"(raise --epochs to continue); {work_dir / 'best.pth'} holds val top-1 "
                f"{best_top1:.2f}")
    if best_top1 < 0:
        return f"done; no validation ran: the weights are in {work_dir / 'last.pth'}"
    if best_epoch is None:
        return (f"done; best: {work_dir / 'best.pth'}, val top-1 {best_top1:.2f} (an epoch "
                f"before the resume)")
    epoch, weights = best_epoch
    which = f", {weights.upper() if weights == 'ema' else weights} weights" if weights else ""
    return (f"done; best: {work_dir / 'best.pth'}, val top-1 {best_top1:.2f} (epoch "
            f"{epoch}{which})")


def main(args: argparse.Namespace) -> dict:
    # --- distributed setup -------------------------------------------------------------------
    info = init_distributed(args.device, args.dist_timeout, args.local_rank)
    rank, world_size, device, is_main = info.rank, info.world_size, info.device, info.is_main
    configure(args)
    amp = resolve_amp(args.amp, device)
    args.model = args.model or "resnext50_32x4d"
    resolve_recipe(args)
    work_dir = Path(args.work_dir or Path("work_dirs") / args.model)
    summary_writer = tensorboard_writer() if args.tensorboard else None  # fails before work
    log = JsonLog(work_dir / "log.jsonl", enabled=is_main)

    try:
        resume = prepare_work_dir(args, work_dir, is_main, world_size)
        if summary_writer is not None and is_main:
            log.writer = summary_writer(str(work_dir / "tensorboard"))

        # --- data --------------------------------------------------------------------------
        train_ds, val_ds, classes, preprocessing = build_datasets(
            Path(args.data), args.train_crop_size, args.fast_decode,
            Preprocessing(args.val_crop_size, args.val_resize_size), args.auto_augment,
            args.random_erase)
        empty = getattr(train_ds, "empty_classes", [])
        if empty and is_main:  # a class without training images still gets its output
            print(f"train.py: warning: {len(empty)} class folders hold no training images: "
                  f"{printable(', '.join(empty[:10]))}", file=sys.stderr)
        pin = device.type == "cuda"
        train_loader, train_sampler, steps_per_epoch = build_train_loader(
            train_ds, args, rank, world_size, pin)
        val_loader = build_loader(val_ds, args.batch_size, args.workers, rank, world_size, pin,
                                  sample_bytes=3 * preprocessing.crop_size ** 2)  # uint8

        # --- model -------------------------------------------------------------------------
        model, raw_model = build_model(args, classes, device, world_size, is_main)

        # --- optimizer and schedule --------------------------------------------------------
        total_batch = args.batch_size * world_size * args.accum_steps
        optimizer, scheduler, scaler = build_optimizer(args, raw_model, total_batch, amp,
                                                       device)
        class_weights = (recipes.inverse_frequency_weights(train_ds.targets, len(classes))
                         .to(device) if args.class_balance == "loss" else None)
        criterion = torch.nn.CrossEntropyLoss(weight=class_weights,
                                              label_smoothing=args.label_smoothing)
        mixer = (BatchMixer(len(classes), args.mixup_alpha, args.cutmix_alpha, args.seed)
                 if args.mixup_alpha > 0 or args.cutmix_alpha > 0 else None)
        ema = (ModelEMA(raw_model, ema_decay(args.model_ema_decay, args.model_ema_steps,
                                             world_size, args.batch_size, args.epochs))
               if args.model_ema else None)

        # --- resume ------------------------------------------------------------------------
        start_epoch, best_top1, best_epoch = 0, -1.0, None
        if resume:
            start_epoch, best_top1, note = resume_from(resume, raw_model, optimizer, scheduler,
                                                       scaler, total_batch, args, ema)
            if is_main:
                print(note)
        announce(args, log, is_main, world_size=world_size, total_batch=total_batch,
                 lr=optimizer.param_groups[0]["lr"], amp=amp_name(amp), start_epoch=start_epoch,
                 torch=str(torch.__version__), device=str(device), num_train=len(train_ds),
                 num_val=len(val_ds), classes=len(classes), resumed=bool(resume),
                 groups=[{"name": g.get("name", "all"), "lr": g["lr"],
                          "weight_decay": g["weight_decay"],
                          "parameters": sum(p.numel() for p in g["params"] if p.requires_grad)}
                         for g in optimizer.param_groups])

        # --- epoch loop --------------------------------------------------------------------
        result = {}
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.perf_counter()
            train_sampler.set_epoch(epoch)
            record = {"type": "epoch", "epoch": epoch + 1}
            record.update(train_one_epoch(model, train_loader, optimizer, scaler, criterion,
                                          epoch, steps_per_epoch, args, device, amp,
                                          world_size, log, is_main, mixer, rank, ema))
            record["images_per_s"] = record["train_images"] / (time.perf_counter() - epoch_start)
            record["lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step()

            if (epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs:
                result = validate(raw_model, val_loader, device, amp, preprocessing, classes,
                                  args, world_size, is_main)
                record.update({f"accuracy/{key}": value for key, value in result.items()
                               if key.startswith("top")})
                record.update({"val_loss": result["loss"], "val_images": result["num_images"]})
                if ema is not None:
                    record.update(validate_ema(ema, val_loader, device, amp, preprocessing,
                                               classes, args, world_size, is_main))
                    better = record["ema/accuracy/top1"] > record["accuracy/top1"]
                    record["best_weights"] = "ema" if better else "raw"
            record["epoch_time"] = time.perf_counter() - epoch_start
            top1 = max(record.get("accuracy/top1", -1.0), record.get("ema/accuracy/top1", -1.0))
            is_best = "accuracy/top1" in record and top1 > best_top1
            if is_best:
                best_top1, best_epoch = top1, (epoch + 1, record.get("best_weights"))

            # Checkpoint: rank 0, epoch ends only, written atomically.
            if is_main:
                state = checkpoint_state(raw_model, optimizer, scheduler, scaler, epoch,
                                         best_top1, record, classes, preprocessing,
                                         total_batch, args, ema)
                with signals_held():  # last.pth, best.pth and the log record land together
                    save_checkpoint(state, work_dir / "last.pth")
                    if is_best:
                        save_checkpoint(state, work_dir / "best.pth")
                    log(record)
                print(epoch_line(record, args.epochs), flush=True)
        if is_main:
            print(final_line(work_dir, best_top1, best_epoch, start_epoch, args.epochs))
        return {"best_top1": best_top1, **result}
    finally:
        log.close()
        cleanup_distributed()


if __name__ == "__main__":
    try:
        run_cli("train.py", main, get_args_parser().parse_args())
    except Stopped as e:
        print(f"train.py: {e}; checkpoints are written only at epoch ends, so last.pth holds "
              f"the last completed epoch", file=sys.stderr)
        sys.exit(128 + e.signum)
