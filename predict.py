"""Classify images with a ResNeXt: paths in, top-k classes and probabilities out.

    python predict.py bird.JPEG                         # resnext50_32x4d, released weights
    python predict.py photos/ a.png --topk 3 --checkpoint work_dirs/rx50/best.pth --json

Folders are walked for images (extensions matched case-insensitively). A file that cannot be
read is reported on stderr with its path and reason; the others are still answered, and the
exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from resnext.data import IMAGE_EXTENSIONS, ImageReadError, eval_transform, find_images, load_image
from resnext.inference import classify, load_for_inference


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ResNeXt image classification",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--model", default=None, help="factory or seed name; default: the "
                   "checkpoint's own, else resnext50_32x4d")
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, ours or "
                   "OpenMMLab); default: the released OpenMMLab weights of --model")
    p.add_argument("--topk", type=int, default=5, help="classes to show (capped at the "
                   "number of classes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=None, help="centre-crop size (pixels); "
                   "default: the size train.py stored in the checkpoint, else 224")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; default cuda if present")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16"], default=None,
                   help="autocast dtype (opt-in; default fp32); auto: bf16 where native")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the convs (same numbers to float rounding, faster)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    return p


def collect_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to the images inside (sorted). A missing path is
    kept so that it is reported like any other unreadable file."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(find_images(path) if path.is_dir() else [path])
    return paths


def main(args: argparse.Namespace) -> int:
    """Run predictions; returns the exit status (0 all answered, 1 some files failed)."""
    if args.topk < 1:
        raise ValueError("--topk must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = load_for_inference(args.model, args.checkpoint, device, img_size=args.img_size,
                               amp=args.amp, fuse=args.fuse_bn,
                               channels_last=args.channels_last)
    names = setup.class_names
    transform = eval_transform(setup.img_size)
    paths = collect_paths(args.inputs)
    if not paths:
        print(f"predict.py: no images found in {args.inputs} (extensions: "
              f"{' '.join(IMAGE_EXTENSIONS)})", file=sys.stderr)
        return 1
    failed = 0
    for start in range(0, len(paths), args.batch_size):
        good, tensors = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                tensors.append(transform(load_image(path)))
                good.append(path)
            except ImageReadError as e:
                failed += 1
                print(f"predict.py: {e}", file=sys.stderr)
                if args.json:
                    print(json.dumps({"path": str(path), "error": str(e)}), flush=True)
        if not tensors:
            continue
        scores = classify(setup.model, torch.stack(tensors).to(device), setup.amp,
                          args.channels_last)
        top_scores, top_labels = scores.topk(min(args.topk, scores.shape[1]), dim=1)
        for path, ts, tl in zip(good, top_scores.tolist(), top_labels.tolist()):
            topk = [{"label": label, "class": names[label] if names else str(label),
                     "score": score} for label, score in zip(tl, ts)]
            if args.json:
                print(json.dumps({"path": str(path), "pred_label": tl[0],
                                  "pred_score": ts[0], "pred_class": topk[0]["class"],
                                  "topk": topk}), flush=True)
            else:
                print(path)
                for t in topk:
                    print(f"  {t['score']:.4f}  {t['class']} ({t['label']})")
    return 1 if failed else 0


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        sys.exit(main(arguments))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        sys.exit(2)
