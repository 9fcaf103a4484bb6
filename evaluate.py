"""Top-1 / top-5 accuracy on an ImageNet-style validation set.

    python evaluate.py --data /data/imagenet/val --model resnext50_32x4d        # released weights
    python evaluate.py --data /data/imagenet/val --checkpoint work_dirs/rx50/best.pth
    python evaluate.py --data /data/imagenet/val --ann-file /data/imagenet/meta/val.txt
    torchrun --standalone --nproc_per_node=8 evaluate.py --data /data/imagenet/val --checkpoint ...
    python evaluate.py --data /data/imagenet/val --checkpoint ... --report work_dirs/rx50/report
    python evaluate.py --data /data/imagenet/val --checkpoint work_dirs/rx50/best.int8.torchscript.pt

Layouts: class folders (wnid folders map to ImageNet indices; a train.py model's own class
names are matched by name), or a folder plus an mmpretrain annotation file (`path label`).
Preprocessing is the weights' own (train.py stores it in the checkpoint; else resize 256,
centre crop 224, the released models'); a file export.py wrote runs on CPU with the
preprocessing and classes stored in it (resnext.artifacts). Each image is counted
exactly once, also under torchrun, and only rank 0 prints. The evaluation itself
(resnext.evaluation.evaluate) is what train.py validates with. --report DIR adds per-class
precision/recall/F1, the confusion matrix and the top confusions (resnext.report): a table on
stdout, DIR/report.json and DIR/confusion.csv, and DIR/confusion.png when matplotlib is
installed (pip install -e ".[plot]"; resnext.plot).
Exit status: 0, 1 when an image cannot be read, 2 for a usage or setup error, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from resnext.artifacts import artifact_device
from resnext.cli import (HelpFormatter, add_common_args, check_output_path, print_load_notes,
                         printable, run_cli)
from resnext.datasets import build_dataset
from resnext.distributed import cleanup_distributed, init_distributed
from resnext.errors import ConfigError, DatasetError, MissingDependencyError
from resnext.evaluation import build_loader, describe_mapping, evaluate, format_accuracy
from resnext.images import set_max_image_pixels
from resnext.inference import load_for_inference
from resnext.plot import plot_confusion
from resnext.report import build_report, format_report, write_report
from resnext.runtime import select_kernels


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ResNeXt top-1/top-5 evaluation",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="validation folder (class folders, or the "
                   "image folder that --ann-file paths are relative to)")
    p.add_argument("--ann-file", default=None, help="mmpretrain annotation file of "
                   "'relative/path label' lines")
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, any supported "
                   "format) or a file export.py wrote (run on CPU); default: the released "
                   "OpenMMLab weights of --model")
    p.add_argument("--resize-size", type=int, default=None,
                   help="short side before cropping; default: the weights' (img-size/0.875)")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the convs on CPU (same numbers to float rounding)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print {top1, top5, k, num_images, model, checkpoint} as JSON on "
                        "stdout (or write it to PATH); with k < 5 classes the key is top{k}")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write per-image predictions (JSON list) here")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write per-class precision/recall/F1 and the confusion matrix to "
                        "DIR/report.json and DIR/confusion.csv, and print the table; with "
                        "matplotlib also the picture DIR/confusion.png")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (bitwise-reproducible runs, slower on GPU)")
    add_common_args(p)
    return p


def _print_and_write(args: argparse.Namespace, result: dict, seconds: float, info, model,
                     dataset) -> None:
    """Rank 0's output: the accuracy line, --json, --out and --report."""
    k = result["k"]
    summary = {"top1": result["top1"], f"top{k}": result[f"top{k}"], "k": k,
               "num_images": result["num_images"],
               "model": model.arch_name if model.exported else args.model or model.arch_name,
               "checkpoint": args.checkpoint or "released"}
    text_out = sys.stderr if args.json == "-" else sys.stdout  # stdout is the JSON's
    print(f"{format_accuracy(result)}  images: {result['num_images']}  "
          f"({result['num_images'] / seconds:.1f} images/s on {info.world_size} x "
          f"{info.device.type})", file=text_out)
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
    if args.report:
        report = build_report(result, dataset, model.class_names)
        write_report(report, args.report)
        print(format_report(report, args.report), file=text_out)
        try:
            drawn = plot_confusion(report, Path(args.report) / "confusion.png")
        except MissingDependencyError as e:
            print(f"evaluate.py: confusion.png skipped: {e}", file=sys.stderr)
        else:
            print(f"picture: {printable(drawn['path'])}", file=text_out)


def main(args: argparse.Namespace) -> dict:
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    outputs = [args.out, None if args.json in (None, "-") else args.json]
    if args.report:
        if Path(args.report).exists() and not Path(args.report).is_dir():
            raise ConfigError(f"{args.report}: --report needs a folder, and this is a file")
        outputs += [Path(args.report) / name
                    for name in ("report.json", "confusion.csv", "confusion.png")]
    for path in outputs:
        if path:
            check_output_path(path)  # before the work, not after it
    rank0 = int(os.environ.get("RANK", "0")) == 0  # before the process group: torchrun's RANK
    info = init_distributed(artifact_device(args.checkpoint, args.device, announce=rank0))
    select_kernels(args.deterministic)
    try:
        model = load_for_inference(args.model, args.checkpoint, info.device, amp=args.amp,
                                   fuse=args.fuse_bn, channels_last=args.channels_last,
                                   compile=args.compile, img_size=args.img_size,
                                   resize_size=args.resize_size, verbose=args.verbose,
                                   announce=info.is_main, use_ema=not args.raw_weights)
        if info.is_main:
            print_load_notes("evaluate.py", model.load_report, args.verbose)
        dataset = build_dataset(args.data, args.ann_file, model.preprocessing.transform(False),
                                model.class_names, model.num_classes)
        if len(dataset) == 0:
            raise DatasetError(f"{args.data}: no images to evaluate (every class folder is "
                               f"empty or holds no image files)")
        model.pad_to = min(args.batch_size, len(dataset))  # a compiled model's one batch size
        note = describe_mapping(dataset, model)
        if note and info.is_main:
            print(f"evaluate.py: {printable(note)}", file=sys.stderr)
        empty = getattr(dataset, "empty_classes", [])
        if empty and info.is_main:
            print(f"evaluate.py: {len(empty)} class folders hold no images and are not counted: "
                  f"{printable(', '.join(empty[:10]))}{', ...' if len(empty) > 10 else ''}",
                  file=sys.stderr)
        loader = build_loader(dataset, args.batch_size, args.workers, info.rank,
                              info.world_size, pin_memory=info.device.type == "cuda",
                              sample_bytes=3 * model.preprocessing.crop_size ** 2)
        start = time.perf_counter()
        result = evaluate(model, loader, progress=info.is_main,
                          return_predictions=bool(args.out), confusion=bool(args.report))
        seconds = time.perf_counter() - start
        if info.is_main:
            _print_and_write(args, result, seconds, info, model, dataset)
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli("evaluate.py", main, get_args_parser().parse_args())
