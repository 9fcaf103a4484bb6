"""Classify images with a ResNeXt: paths in, top-k classes and probabilities out.

    python predict.py bird.JPEG                         # resnext50_32x4d, released weights
    python predict.py photos/ a.png --topk 3 --checkpoint work_dirs/rx50/best.pth --json

Folders are walked for images (resnext.data.list_images: hidden entries skipped, symlinks
followed). Images are prepared as the weights expect (the checkpoint's stored preprocessing,
else resize 256 / crop 224). A file that cannot be read is reported on stderr with its path
and reason; the others are still answered, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from resnext.data import (IMAGE_EXTENSIONS, ImageReadError, list_images, load_image,
                          set_max_image_pixels)
from resnext.inference import load_for_inference
from resnext.runtime import add_common_args, default_device, positive_int


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ResNeXt image classification",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, any supported "
                   "format); default: the released OpenMMLab weights of --model")
    p.add_argument("--topk", type=positive_int, default=5,
                   help="classes to show (capped at the number of classes)")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the convs on CPU (same numbers to float rounding)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="one JSON object per image, on stdout (or written to PATH)")
    add_common_args(p, batch_size=16)
    return p


def collect_paths(inputs: list[str]) -> tuple[list[Path], Counter]:
    """Files as given, folders expanded to the images inside (resnext.data.list_images). A
    missing path is kept so that it is reported like any other unreadable file. Returns the
    paths and the entries skipped in folders, counted by reason."""
    paths: list[Path] = []
    skipped: Counter = Counter()
    for item in inputs:
        path = Path(item)
        paths.extend(list_images(path, skipped) if path.is_dir() else [path])
    return paths, skipped


def _json_target(args: argparse.Namespace):
    if args.json in (None, "-"):
        return sys.stdout
    target = Path(args.json)
    # `--json photo.jpg` most likely meant the photo as an input: never overwrite it.
    if target.is_dir() or target.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--json {args.json}: that looks like an input image or folder; put "
                         f"inputs first or write --json=- for stdout")
    return open(target, "w")


def main(args: argparse.Namespace) -> int:
    """Run predictions; returns the exit status (0 all answered, 1 some files failed)."""
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    device = default_device(args.device)
    out = _json_target(args)
    model = load_for_inference(args.model, args.checkpoint, device, amp=args.amp,
                               fuse=args.fuse_bn, channels_last=args.channels_last,
                               compile=args.compile, img_size=args.img_size,
                               verbose=args.verbose)
    names = model.class_names
    transform = model.preprocessing.transform()
    paths, skipped = collect_paths(args.inputs)
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
        print(f"predict.py: skipped {sum(skipped.values())} entries in folders ({reasons})",
              file=sys.stderr)
    if not paths:
        print(f"predict.py: no images found in {' '.join(args.inputs)}", file=sys.stderr)
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
                    print(json.dumps({"path": str(path), "error": str(e)}), file=out, flush=True)
        if not tensors:
            continue
        scores = model.classify(torch.stack(tensors))
        top_scores, top_labels = scores.topk(min(args.topk, scores.shape[1]), dim=1)
        for path, ts, tl in zip(good, top_scores.tolist(), top_labels.tolist()):
            topk = [{"label": label, "class": names[label] if names else str(label),
                     "score": score} for label, score in zip(tl, ts)]
            if args.json:
                print(json.dumps({"path": str(path), "pred_label": tl[0],
                                  "pred_score": ts[0], "pred_class": topk[0]["class"],
                                  "topk": topk}), file=out, flush=True)
            else:
                print(path)
                for t in topk:
                    print(f"  {t['score']:.4f}  {t['class']} ({t['label']})")
    if out is not sys.stdout:
        out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        sys.exit(main(arguments))
    except BrokenPipeError:
        # `predict.py ... | head`: the reader left. Point stdout at devnull so that Python's
        # final flush does not raise again, and end quietly as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        sys.exit(2)
