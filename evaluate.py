"""Top-1 / top-5 accuracy on an ImageNet-style validation set.

    python evaluate.py --data /data/imagenet/val --model resnext50_32x4d        # released weights
    python evaluate.py --data /data/imagenet/val --checkpoint work_dirs/rx50/best.pth
    python evaluate.py --data /data/imagenet/val --ann-file /data/imagenet/meta/val.txt
    torchrun --standalone --nproc_per_node=8 evaluate.py --data /data/imagenet/val --checkpoint ...

Layouts: class folders (wnid folders map to ImageNet indices; a train.py model's own class
names are matched by name), or a folder plus an mmpretrain annotation file (`path label`).
Preprocessing is the weights' own (train.py stores it in the checkpoint; else resize 256,
centre crop 224, the released models'). Each image is counted
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

from resnext.data import (UnpaddedDistributedSampler, build_dataset, imagenet_wnids,
                          set_max_image_pixels)
from resnext.distributed import cleanup_distributed, init_distributed
from resnext.inference import InferenceModel, load_for_inference
from resnext.runtime import HelpFormatter, add_common_args, run_cli, select_kernels


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ResNeXt top-1/top-5 evaluation",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="validation folder (class folders, or the "
                   "image folder that --ann-file paths are relative to)")
    p.add_argument("--ann-file", default=None, help="mmpretrain annotation file of "
                   "'relative/path label' lines")
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, any supported "
                   "format); default: the released OpenMMLab weights of --model")
    p.add_argument("--resize-size", type=int, default=None,
                   help="short side before cropping; default: the weights' (img-size/0.875)")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the convs on CPU (same numbers to float rounding)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print {top1, top5, k, num_images, model, checkpoint} as JSON on "
                        "stdout (or write it to PATH); with k < 5 classes the key is top{k}")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write per-image predictions (JSON list) here")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (bitwise-reproducible runs, slower on GPU)")
    add_common_args(p)
    return p


def count_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Hits at 1 and at k for a batch, on the logits' device (no host synchronisation).

    Args:
        logits: (N, C) scores; labels: (N,) int64; k: <= C.
    Returns:
        (2,) float64 tensor [correct@1, correct@k].
    """
    hits = logits.topk(k, dim=1).indices == labels[:, None]  # (N, k)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


def topk_for(num_classes: int) -> int:
    """The k of "top-5": 5, or the number of classes when there are fewer (where top-5 would
    always read 100%)."""
    return min(5, num_classes)


@torch.inference_mode()
def evaluate(model: InferenceModel, loader: DataLoader, progress: bool = False,
             return_predictions: bool = False) -> dict:
    """Top-1/top-k of `model` over `loader`, summed across processes when distributed.

    The loader must visit every image once over all ranks (UnpaddedDistributedSampler): the
    counts are all-reduced, so the result equals a single-process run.

    Args:
        model: an InferenceModel (converts its input, runs autocast); put in eval mode.
        loader: yields ((N, 3, H, W) uint8 crops or float normalised images, (N,) int64
            labels).
        progress: show a tqdm bar (rank 0).
        return_predictions: also gather per-image results to every rank.
    Returns:
        {'top1': %, 'top5': % (key 'top{k}' with k = min(5, classes)), 'k': k,
        'num_images': int, 'loss': mean cross-entropy} plus 'predictions' (sorted by dataset
        index: index, label, pred_label, pred_score, topk) if asked.
    """
    model.eval()
    device = model.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@k, n, loss
    indices = list(loader.sampler) if return_predictions else None
    predictions = []
    seen = 0
    k = 1
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        k = topk_for(logits.shape[1])
        sums[:2] += count_topk(logits, labels, k)
        sums[2] += labels.numel()
        sums[3] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        if return_predictions:
            scores = logits.softmax(dim=1)
            top = logits.topk(k, dim=1).indices
            for j in range(labels.numel()):
                predictions.append({
                    "index": indices[seen + j], "label": int(labels[j]),
                    "pred_label": int(top[j, 0]), "pred_score": float(scores[j, top[j, 0]]),
                    "topk": [int(t) for t in top[j]]})
        seen += labels.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        if return_predictions:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
    if model.num_classes:
        k = topk_for(model.num_classes)
    c1, ck, n, loss = sums.tolist()
    result = {"top1": 100.0 * c1 / max(n, 1), f"top{k}": 100.0 * ck / max(n, 1), "k": k,
              "num_images": int(n), "loss": loss / max(n, 1)}
    if return_predictions:
        result["predictions"] = sorted(predictions, key=lambda p: p["index"])
    return result


def format_accuracy(result: dict) -> str:
    """mmpretrain's 'accuracy/top1: 77.9000  accuracy/top5: 93.6600' line (top-k with fewer
    than 5 classes)."""
    k = result["k"]
    text = f"accuracy/top1: {result['top1']:.4f}"
    return text + (f"  accuracy/top{k}: {result[f'top{k}']:.4f}" if k > 1 else "")


def build_loader(dataset, batch_size: int, workers: int, rank: int, world_size: int,
                 pin_memory: bool = False) -> DataLoader:
    """Validation loader: in order, unpadded shards under torchrun; workers persist across
    calls (train.py validates every epoch)."""
    sampler = UnpaddedDistributedSampler(len(dataset), world_size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0)


def describe_mapping(dataset, model: InferenceModel) -> str | None:
    """A warning when folder classes were not matched to the model's classes by name (or
    ImageNet wnid), saying how they were mapped; None when they were."""
    class_to_idx = getattr(dataset, "class_to_idx", None)
    if not class_to_idx or model.class_names is not None:
        return None
    if set(class_to_idx) <= set(imagenet_wnids()) and model.num_classes == 1000:
        return None
    pairs = ", ".join(f"{folder} -> {label}" for folder, label in list(class_to_idx.items())[:10])
    more = ", ..." if len(class_to_idx) > 10 else ""
    return (f"warning: the weights carry no class names, so the {len(class_to_idx)} class "
            f"folders were mapped to labels by sorted order ({pairs}{more}); if the folders "
            f"are a subset of the model's classes, the accuracy is meaningless")


def main(args: argparse.Namespace) -> dict:
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    info = init_distributed(args.device)
    select_kernels(args.deterministic)
    try:
        model = load_for_inference(args.model, args.checkpoint, info.device, amp=args.amp,
                                   fuse=args.fuse_bn, channels_last=args.channels_last,
                                   compile=args.compile, img_size=args.img_size,
                                   resize_size=args.resize_size, verbose=args.verbose,
                                   announce=info.is_main)
        dataset = build_dataset(args.data, args.ann_file, model.preprocessing.transform(False),
                                model.class_names, model.num_classes)
        if len(dataset) == 0:
            raise ValueError(f"{args.data}: no images to evaluate (every class folder is empty "
                             f"or holds no image files)")
        model.pad_to = min(args.batch_size, len(dataset))  # a compiled model's one batch size
        note = describe_mapping(dataset, model)
        if note and info.is_main:
            print(f"evaluate.py: {note}", file=sys.stderr)
        empty = getattr(dataset, "empty_classes", [])
        if empty and info.is_main:
            print(f"evaluate.py: {len(empty)} class folders hold no images and are not counted: "
                  f"{', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}", file=sys.stderr)
        loader = build_loader(dataset, args.batch_size, args.workers, info.rank,
                              info.world_size, pin_memory=info.device.type == "cuda")
        start = time.perf_counter()
        result = evaluate(model, loader, progress=info.is_main,
                          return_predictions=bool(args.out))
        seconds = time.perf_counter() - start
        if info.is_main:
            k = result["k"]
            summary = {"top1": result["top1"], f"top{k}": result[f"top{k}"], "k": k,
                       "num_images": result["num_images"],
                       "model": args.model or model.arch_name,
                       "checkpoint": args.checkpoint or "released"}
            print(f"{format_accuracy(result)}  images: {result['num_images']}  "
                  f"({result['num_images'] / seconds:.1f} images/s on {info.world_size} x "
                  f"{info.device.type})", file=sys.stderr if args.json == "-" else sys.stdout)
            if args.json == "-":
                print(json.dumps(summary))
            elif args.json:
                Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
            if args.out:
                names = model.class_names
                for p in result["predictions"]:
                    p["path"] = dataset.samples[p["index"]][0]
                    if names:
                        p["pred_class"] = names[p["pred_label"]]
                Path(args.out).write_text(json.dumps(result["predictions"], indent=1) + "\n")
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli("evaluate.py", main, get_args_parser().parse_args())
