"""Top-1 / top-5 accuracy on an ImageNet-style validation set.

    python evaluate.py --data /data/imagenet/val --model resnext50_32x4d        # released weights
    python evaluate.py --data /data/imagenet/val --checkpoint work_dirs/rx50/best.pth
    python evaluate.py --data /data/imagenet/val --ann-file /data/imagenet/meta/val.txt
    torchrun --standalone --nproc_per_node=8 evaluate.py --data /data/imagenet/val --checkpoint ...

Layouts: class folders (wnid folders map to ImageNet indices; a train.py model's own class
names are matched by name), or a folder plus an mmpretrain annotation file (`path label`).
Preprocessing is the released models' (resize 256, centre crop 224). Each image is counted
exactly once, also under torchrun, and only rank 0 prints. `evaluate()` is what train.py
validates with.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from resnext.data import UnpaddedDistributedSampler, build_dataset, eval_transform
from resnext.distributed import cleanup_distributed, init_distributed
from resnext.inference import autocast, load_for_inference


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ResNeXt top-1/top-5 evaluation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="validation folder (class folders, or the "
                   "image folder that --ann-file paths are relative to)")
    p.add_argument("--ann-file", default=None, help="mmpretrain annotation file of "
                   "'relative/path label' lines")
    p.add_argument("--model", default=None, help="factory or seed name; default: the "
                   "checkpoint's own, else resnext50_32x4d")
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, any supported "
                   "format); default: the released OpenMMLab weights of --model")
    p.add_argument("--batch-size", type=int, default=32, help="images per process")
    p.add_argument("--workers", type=int, default=4, help="data loading processes per rank")
    p.add_argument("--img-size", type=int, default=None, help="centre-crop size (pixels); "
                   "default: the size train.py stored in the checkpoint, else 224")
    p.add_argument("--resize-size", type=int, default=None,
                   help="short side before cropping; default img-size/0.875 (256 for 224)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda if present")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16"], default=None,
                   help="autocast dtype (opt-in; default fp32, the reference numbers); auto: "
                        "bf16 where the device runs it natively, else fp32")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the convs (same numbers to float rounding, faster)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (pays off on large sets; needs a C++ compiler)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (same results to float tolerance)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write {top1, top5, num_images, model, checkpoint} here")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write per-image predictions (JSON list) here")
    return p


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             amp: str | None = None, channels_last: bool = True,
             progress: bool = False, return_predictions: bool = False) -> dict:
    """Top-1/top-5 of `model` over `loader`, summed across processes when distributed.

    The loader must visit every image once over all ranks (UnpaddedDistributedSampler): the
    counts are all-reduced, so the result equals a single-process run.

    Args:
        model: classifier; put in eval mode (BN running statistics, no dropout).
        loader: yields ((N, 3, H, W) float images, (N,) int64 labels).
        device: where the model lives.
        amp: None (fp32), 'bf16' or 'fp16'.
        channels_last: feed channels_last tensors.
        progress: show a tqdm bar (rank 0).
        return_predictions: also gather per-image results to every rank.
    Returns:
        {'top1': %, 'top5': %, 'num_images': int, 'loss': mean cross-entropy} plus
        'predictions' (sorted by dataset index: index, label, pred_label, pred_score, top5)
        if asked.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, n, loss
    indices = list(loader.sampler) if return_predictions else None
    predictions = []
    seen = 0
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += labels.numel()
        sums[3] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        if return_predictions:
            scores = logits.softmax(dim=1)
            for j in range(labels.numel()):
                predictions.append({
                    "index": indices[seen + j], "label": int(labels[j]),
                    "pred_label": int(top[j, 0]), "pred_score": float(scores[j, top[j, 0]]),
                    "top5": [int(t) for t in top[j]]})
        seen += labels.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        if return_predictions:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
    c1, c5, n, loss = sums.tolist()
    result = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1),
              "num_images": int(n), "loss": loss / max(n, 1)}
    if return_predictions:
        result["predictions"] = sorted(predictions, key=lambda p: p["index"])
    return result


def build_loader(dataset, batch_size: int, workers: int, rank: int, world_size: int,
                 pin_memory: bool = False) -> DataLoader:
    """Validation loader: in order, unpadded shards under torchrun."""
    sampler = UnpaddedDistributedSampler(len(dataset), world_size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False)


def main(args: argparse.Namespace) -> dict:
    info = init_distributed(args.device)
    try:
        setup = load_for_inference(args.model, args.checkpoint, info.device,
                                   img_size=args.img_size, amp=args.amp, fuse=args.fuse_bn,
                                   channels_last=args.channels_last, compile=args.compile,
                                   announce=info.is_main)
        dataset = build_dataset(args.data, args.ann_file,
                                eval_transform(setup.img_size, args.resize_size),
                                setup.class_names, setup.num_classes)
        loader = build_loader(dataset, args.batch_size, args.workers, info.rank,
                              info.world_size, pin_memory=info.device.type == "cuda")
        start = time.perf_counter()
        result = evaluate(setup.model, loader, info.device, setup.amp, args.channels_last,
                          progress=info.is_main, return_predictions=bool(args.out))
        seconds = time.perf_counter() - start
        if info.is_main:
            print(f"accuracy/top1: {result['top1']:.4f}  accuracy/top5: {result['top5']:.4f}  "
                  f"images: {result['num_images']}  ({result['num_images'] / seconds:.1f} "
                  f"images/s on {info.world_size} x {info.device.type})")
            summary = {"top1": result["top1"], "top5": result["top5"],
                       "num_images": result["num_images"],
                       "model": args.model or setup.arch_name,
                       "checkpoint": args.checkpoint or "released"}
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
            if args.out:
                names = setup.class_names
                for p in result["predictions"]:
                    p["path"] = dataset.samples[p["index"]][0]
                    if names:
                        p["pred_class"] = names[p["pred_label"]]
                Path(args.out).write_text(json.dumps(result["predictions"], indent=1) + "\n")
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        main(arguments)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
