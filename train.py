"""Train a ResNeXt on ImageNet-style data: mmpretrain's recipe in one plain loop.

    torchrun --standalone --nproc_per_node=8 train.py --data /data/imagenet --model resnext50_32x4d --work-dir work_dirs/rx50
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 train.py --data /data/imagenet ...
    python train.py --data ../shared/data/hymenoptera_data --img-size 112 --epochs 5 --auto-scale-lr

Defaults are configs/_base_/schedules/imagenet_bs256.py: 32 images per process on 8 processes
(a total batch of 256), SGD lr 0.1 momentum 0.9 weight decay 1e-4 on all parameters, lr x0.1
at epochs 30/60/90, 100 epochs, RandomResizedCrop 224 + flip, validation every epoch.
`--data` holds train/ and val/ class folders, or mmpretrain's meta/train.txt and meta/val.txt
(paths relative to train/ and val/), which are used when present.

Sections, in reading order: args -> distributed setup -> data -> model -> optimizer/scheduler
-> resume -> epoch loop -> cleanup. Work dir: last.pth (every epoch), best.pth (best val
top-1), log.jsonl (header, interval and epoch records). `--resume auto` continues from
last.pth if there is one, which is what `torchrun --max-restarts=N` needs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from evaluate import build_loader, evaluate
from resnext.checkpoint import get_model, load_weights, read_checkpoint, save_checkpoint
from resnext.data import (FastTrainTransform, build_dataset, eval_transform,
                          imagenet_class_names, load_image, train_transform)
from resnext.distributed import cleanup_distributed, init_distributed
from resnext.inference import autocast, maybe_compile, resolve_amp


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ResNeXt training (mmpretrain imagenet_bs256 recipe)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="root with train/ and val/ (and optionally "
                   "meta/train.txt, meta/val.txt)")
    p.add_argument("--model", default="resnext50_32x4d")
    p.add_argument("--batch-size", type=int, default=32, help="images per process")
    p.add_argument("--workers", type=int, default=4, help="data loading processes per rank")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate for a total batch "
                   "of 256 (used as is unless --auto-scale-lr)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 60, 90],
                   help="epochs at which lr is multiplied by --gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale lr linearly by total batch / 256 (mmpretrain auto_scale_lr)")
    p.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches per optimizer step (total batch = batch-size x "
                        "processes x accum-steps)")
    p.add_argument("--img-size", type=int, default=224, help="train crop; validation "
                   "resizes to img-size/0.875 and centre-crops img-size")
    p.add_argument("--val-interval", type=int, default=1, help="validate every N epochs")
    p.add_argument("--log-interval", type=int, default=100, help="steps between log records")
    p.add_argument("--work-dir", default=None, help="default work_dirs/<model>")
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue a run from its checkpoint; 'auto': work-dir/last.pth if it "
                        "exists, else start fresh")
    p.add_argument("--load-from", default=None, help="initialise weights from any supported "
                   "checkpoint (the head is reset if the class count differs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (bitwise-reproducible runs, slower on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda; default cuda if present")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16"], default=None,
                   help="autocast dtype (fp16 uses a GradScaler); auto: bf16 where the device "
                        "runs it natively, else fp32 (CPU) / fp16 (older GPUs)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fast-decode", action="store_true",
                   help="training images: decode JPEGs at reduced scale when the crop allows "
                        "and crop as uint8 tensors (same random crops/flips, ~1.5x faster per "
                        "worker; resnext.data.FastTrainTransform)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes "
                   "(the recipe uses per-process BN)")
    p.add_argument("--dist-timeout", type=float, default=1800,
                   help="seconds before a collective waiting on a dead peer fails")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # torch.distributed.launch compatibility
    return p


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message gives epoch, step and learning rate."""


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
    """Hold SIGTERM/SIGINT back for the block (checkpoint writes), then act on them."""
    _signals["held"] = True
    try:
        yield
    finally:
        _signals["held"] = False
    if _signals["pending"] is not None:
        raise Stopped(_signals["pending"])


def seed_epoch(seed: int, rank: int, epoch: int) -> int:
    """Seed Python and torch for one (rank, epoch): augmentation and shuffling depend only
    on --seed, rank and epoch, so a resumed run replays an epoch exactly."""
    s = seed + 1_000_003 * epoch + 7919 * rank
    random.seed(s)
    torch.manual_seed(s)
    return s


def plain(value):
    """args values as plain Python types (weights-only loadable)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def build_datasets(root: Path, img_size: int, fast_decode: bool = False):
    """train/val datasets from class folders, or meta/train.txt + meta/val.txt if present."""
    ann_train, ann_val = root / "meta" / "train.txt", root / "meta" / "val.txt"
    # FastTrainTransform decodes from the path itself; the reference decodes with load_image.
    train_tf, train_loader = ((FastTrainTransform(img_size), str) if fast_decode
                              else (train_transform(img_size), load_image))
    if ann_train.is_file() and ann_val.is_file():
        train_ds = build_dataset(root / "train", ann_train, train_tf, loader=train_loader)
        num_classes = max(train_ds.targets) + 1
        classes = [str(i) for i in range(num_classes)]
        if num_classes == 1000:
            classes = imagenet_class_names()
        val_ds = build_dataset(root / "val", ann_val, eval_transform(img_size))
    else:
        train_ds = build_dataset(root / "train", None, train_tf, loader=train_loader)
        classes = list(train_ds.classes)
        val_ds = build_dataset(root / "val", None, eval_transform(img_size), class_names=classes)
    return train_ds, val_ds, classes


def main(args: argparse.Namespace) -> dict:
    # --- distributed setup -------------------------------------------------------------------
    info = init_distributed(args.device, args.dist_timeout, args.local_rank)
    rank, world_size, device, is_main = info.rank, info.world_size, info.device, info.is_main
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(args.amp, device)
    work_dir = Path(args.work_dir or Path("work_dirs") / args.model)
    log_file = work_dir / "log.jsonl"

    def log(record: dict) -> None:
        if is_main:
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    try:
        if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint (use "
                                    f"--resume auto to start fresh when there is none)")
        if is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
            for stale in work_dir.glob(".*.pth.*.tmp"):  # left by a kill during a save
                stale.unlink()

        # --- data --------------------------------------------------------------------------
        train_ds, val_ds, classes = build_datasets(Path(args.data), args.img_size,
                                                   args.fast_decode)
        train_sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank,
                                           shuffle=True, seed=args.seed, drop_last=True)
        loader_rng = torch.Generator()
        train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=train_sampler,
                                  num_workers=args.workers, drop_last=True,
                                  pin_memory=device.type == "cuda", generator=loader_rng,
                                  persistent_workers=False)
        val_loader = build_loader(val_ds, args.batch_size, args.workers, rank, world_size,
                                  pin_memory=device.type == "cuda")
        steps_per_epoch = len(train_loader) // args.accum_steps
        if steps_per_epoch == 0:
            raise ValueError(f"{args.data}: {len(train_ds)} training images are fewer than one "
                             f"step of {args.batch_size} x {world_size} x {args.accum_steps}")

        # --- model -------------------------------------------------------------------------
        seed_epoch(args.seed, 0, -1)  # the same initial weights on every rank
        model = get_model(args.model, num_classes=len(classes))
        if args.load_from:
            ckpt = read_checkpoint(args.load_from)
            head = ckpt.state_dict.get("fc.weight")
            other_head = head is None or head.shape[0] != len(classes)
            report = load_weights(model, ckpt, reset_head=other_head)
            if is_main:
                print(f"init: {report}")
        model.class_names = classes
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.sync_bn and world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model  # unwrapped: what checkpoints store (no module. prefix)
        if world_size > 1:
            # Per-process BN statistics as the recipe (mmpretrain broadcast_buffers=False).
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        broadcast_buffers=False)
        if args.compile:
            model = maybe_compile(model, device, announce=is_main)

        # --- optimizer and schedule --------------------------------------------------------
        total_batch = args.batch_size * world_size * args.accum_steps
        lr = args.lr * total_batch / 256 if args.auto_scale_lr else args.lr
        optimizer = torch.optim.SGD(raw_model.parameters(), lr=lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)  # all params, BN included
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, args.gamma)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        criterion = torch.nn.CrossEntropyLoss()

        # --- resume ------------------------------------------------------------------------
        start_epoch, best_top1 = 0, -1.0
        resume = args.resume
        if resume == "auto":
            resume = str(work_dir / "last.pth") if (work_dir / "last.pth").is_file() else None
        if resume:
            state = read_checkpoint(resume).raw
            raw_model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, best_top1 = state["epoch"], state["best_top1"]
            if is_main:
                print(f"resumed from {resume}: next epoch {start_epoch + 1}, best top-1 "
                      f"{best_top1:.2f}")
        log({"type": "header", "args": {k: plain(v) for k, v in vars(args).items()},
             "world_size": world_size, "total_batch": total_batch, "lr": lr, "amp": amp,
             "start_epoch": start_epoch, "torch": str(torch.__version__), "device": str(device),
             "num_train": len(train_ds), "num_val": len(val_ds), "classes": len(classes)})
        if is_main:
            print(f"{args.model}: {len(train_ds)} train / {len(val_ds)} val images, "
                  f"{len(classes)} classes; {world_size} process(es) x {args.batch_size} x "
                  f"{args.accum_steps} accum = total batch {total_batch}, lr {lr:g}"
                  f"{' (auto-scaled)' if args.auto_scale_lr else ''}; device {device}")

        # --- epoch loop --------------------------------------------------------------------
        result = {}
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.perf_counter()
            loader_rng.manual_seed(seed_epoch(args.seed, rank, epoch))
            train_sampler.set_epoch(epoch)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, c1, c5, n
            interval = {"loss": 0.0, "n": 0, "data": 0.0, "start": time.perf_counter()}
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not is_main, leave=False)
            data_start = time.perf_counter()
            for micro, (images, labels) in enumerate(train_loader):
                if micro >= steps_per_epoch * args.accum_steps:
                    break
                step, boundary = divmod(micro, args.accum_steps)
                boundary = boundary == args.accum_steps - 1
                interval["data"] += time.perf_counter() - data_start
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # Skip DDP's gradient all-reduce on micro-batches that do not step.
                sync = model.no_sync() if (world_size > 1 and not boundary) else nullcontext()
                with sync:
                    with autocast(device, amp):
                        logits = model(images)
                        loss = criterion(logits.float(), labels)
                    scaler.scale(loss / args.accum_steps).backward()
                finite = torch.isfinite(loss.detach()).float()
                if world_size > 1:  # every rank stops together, none waits on a dead peer
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() == 0:
                    bar.close()
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step "
                        f"{step + 1}, lr {optimizer.param_groups[0]['lr']:g}; stopping. "
                        f"{work_dir / 'last.pth'} still holds the last completed epoch")
                if boundary:
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    n = labels.numel()
                    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
                    sums += torch.stack([loss.detach().double() * n, top5[:, 0].sum(),
                                         top5.any(1).sum(), torch.tensor(n, device=device)])
                interval["loss"] += loss.item() * n
                interval["n"] += n
                if boundary:
                    bar.update()
                    global_step = epoch * steps_per_epoch + step + 1
                    if (step + 1) % args.log_interval == 0 or step + 1 == steps_per_epoch:
                        elapsed = time.perf_counter() - interval["start"]
                        steps = interval["n"] / (args.batch_size * args.accum_steps)
                        record = {"type": "train", "epoch": epoch + 1, "iter": step + 1,
                                  "step": global_step, "lr": optimizer.param_groups[0]["lr"],
                                  "loss": interval["loss"] / interval["n"],
                                  "time": elapsed / steps, "data_time": interval["data"] / steps,
                                  "images_per_s": interval["n"] * world_size / elapsed}
                        log(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                        img_s=f"{record['images_per_s']:.1f}")
                        interval = {"loss": 0.0, "n": 0, "data": 0.0,
                                    "start": time.perf_counter()}
                data_start = time.perf_counter()
            bar.close()
            scheduler.step()
            if world_size > 1:
                dist.all_reduce(sums)
            loss_sum, c1, c5, n = sums.tolist()
            train_time = time.perf_counter() - epoch_start
            order = list(train_sampler)  # rank's sample order this epoch, fingerprinted
            record = {"type": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / n,
                      "sample_order_crc32": zlib.crc32(str(order).encode()),
                      "train_top1": 100 * c1 / n, "train_top5": 100 * c5 / n,
                      "train_images": int(n), "images_per_s": n / train_time,
                      "lr": optimizer.param_groups[0]["lr"]}

            if (epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs:
                if world_size > 1 and not args.sync_bn:
                    # Validate with rank 0's BN statistics: what last.pth stores, so this
                    # equals evaluate.py on the saved checkpoint.
                    for buffer in raw_model.buffers():
                        dist.broadcast(buffer, src=0)
                result = evaluate(raw_model, val_loader, device, amp, args.channels_last,
                                  progress=is_main)
                record.update({"accuracy/top1": result["top1"], "accuracy/top5": result["top5"],
                               "val_loss": result["loss"], "val_images": result["num_images"]})
            record["epoch_time"] = time.perf_counter() - epoch_start
            is_best = "accuracy/top1" in record and record["accuracy/top1"] > best_top1
            if is_best:
                best_top1 = record["accuracy/top1"]

            # Checkpoint: rank 0, epoch ends only, written atomically.
            if is_main:
                checkpoint = {
                    "state_dict": raw_model.state_dict(),
                    "meta": {"model": args.model, "classes": classes, "epoch": epoch + 1,
                             "img_size": args.img_size, "top1": record.get("accuracy/top1"),
                             "torch_version": str(torch.__version__)},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    # Per-epoch reseeding (seed_epoch) makes resume exact; kept for inspection.
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                    "epoch": epoch + 1,  # the next epoch to run (0-based)
                    "best_top1": best_top1,
                    "args": {k: plain(v) for k, v in vars(args).items()},
                }
                with signals_held():
                    save_checkpoint(checkpoint, work_dir / "last.pth")
                    if is_best:
                        save_checkpoint(checkpoint, work_dir / "best.pth")
                    log(record)
                val = (f"  val top-1 {record['accuracy/top1']:.2f} top-5 "
                       f"{record['accuracy/top5']:.2f} ({record['val_images']} images)"
                       if "accuracy/top1" in record else "")
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} "
                      f"top-1 {record['train_top1']:.2f}{val}  lr {record['lr']:.3g}  "
                      f"{record['images_per_s']:.1f} img/s  {record['epoch_time']:.1f}s",
                      flush=True)
        return {"best_top1": best_top1, **result}
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        main(arguments)
    except Stopped as e:
        print(f"train.py: {e}; checkpoints are written only at epoch ends, so last.pth holds "
              f"the last completed epoch", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (NonFiniteLoss, ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
