"""Classify images with a ResNeXt: paths in, top-k classes and probabilities out.

    python predict.py bird.JPEG                         # resnext50_32x4d, released weights
    python predict.py photos/ a.png --topk 3 --checkpoint work_dirs/rx50/best.pth --json
    python predict.py bird.JPEG --cam cams/               # + cams/bird_cam.png (Grad-CAM)
    python predict.py bird.JPEG --checkpoint best.int8.torchscript.pt   # an export.py file

Folders are walked for images (resnext.images.list_images: hidden entries skipped, symlinks
followed). Images are prepared as the weights expect (the checkpoint's stored preprocessing,
else resize 256 / crop 224). A file export.py wrote (TorchScript, int8, ExportedProgram, ONNX; a
path or URL) runs on CPU with the classes and preprocessing stored in it (resnext.artifacts).
--cam DIR also writes, per image, the crop with the Grad-CAM heat map of its top class over it
and the class and score written on it (DIR/<stem>_cam.png; resnext.cam). A file that cannot be
read is reported on stderr with its path and reason; the others are still answered, and the exit
status is then 1. Exit status 2: a usage or setup error (one line on stderr); 130: interrupted
(answers so far kept).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from resnext.artifacts import artifact_device, exported_file
from resnext.cam import cam_file_names, grad_cam, overlay
from resnext.cli import (EXIT_FAILED, HelpFormatter, add_common_args, check_output_path,
                         positive_int, print_load_notes, printable, run_cli)
from resnext.errors import ConfigError, ImageReadError
from resnext.images import (IMAGE_EXTENSIONS, list_images, load_image, pixel_limit_worker_init,
                            set_max_image_pixels)
from resnext.inference import load_for_inference
from resnext.runtime import default_device, fit_loader_to_shared_memory

LOADER_TIMEOUT_S = 600  # per batch; decoding 16 images at the pixel limit takes far less


def get_args_parser() -> argparse.ArgumentParser:
    """predict.py's flags: inputs, --checkpoint, --topk, --fuse-bn, --json and the shared ones
    (resnext.cli.add_common_args)."""
    p = argparse.ArgumentParser(description="ResNeXt image classification",
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, any supported "
                   "format) or a file export.py wrote (run on CPU); default: the released "
                   "OpenMMLab weights of --model")
    p.add_argument("--topk", type=positive_int, default=5,
                   help="classes to show (capped at the number of classes)")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold BatchNorm into the convs on CPU (same numbers to float rounding)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="one JSON object per image, on stdout (or written to PATH)")
    p.add_argument("--cam", default=None, metavar="DIR",
                   help="also write each image's crop with the Grad-CAM heat map of its top "
                        "class (last stage) and the class and score to DIR/<stem>_cam.png")
    add_common_args(p, batch_size=16)
    return p


def collect_paths(inputs: list[str]) -> tuple[list[Path], Counter]:
    """Files as given, folders expanded to the images inside (resnext.images.list_images). A
    missing path is kept so that it is reported like any other unreadable file. Returns the
    paths and the entries skipped in folders, counted by reason."""
    paths: list[Path] = []
    skipped: Counter = Counter()
    for item in inputs:
        path = Path(item)
        paths.extend(list_images(path, skipped) if path.is_dir() else [path])
    return paths, skipped


def _check_json_target(path: str | None) -> None:
    # `--json photo.jpg` most likely meant the photo as an input: never overwrite it.
    if path not in (None, "-") and (Path(path).is_dir()
                                    or Path(path).suffix.lower() in IMAGE_EXTENSIONS):
        raise ConfigError(f"--json {path}: that looks like an input image or folder; put "
                          f"inputs first or write --json=- for stdout")
    if path not in (None, "-"):
        check_output_path(path)


def _check_cam_target(folder: str | None) -> None:
    if folder is None:
        return
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"{folder}: --cam needs a folder, and this is a file")
    check_output_path(Path(folder) / "image_cam.png")  # creates the folder; can it take files?


def cam_network(model, args: argparse.Namespace) -> torch.nn.Module:
    """The plain network for Grad-CAM: the prepared one unless --fuse-bn or --compile made
    another of it, in which case the weights are loaded again, unfolded and uncompiled."""
    if not (args.fuse_bn or args.compile):
        return model.net
    return load_for_inference(args.model, args.checkpoint, model.device, fuse=False,
                              compile=False, channels_last=args.channels_last,
                              img_size=args.img_size, announce=False,
                              use_ema=not args.raw_weights).net  # the weights predicted with


def write_cams(net, model, crops: list[torch.Tensor], labels: torch.Tensor,
               scores: torch.Tensor, targets: list[Path]) -> None:
    """Grad-CAM of each (3, H, W) uint8 crop for its class in `labels`, drawn over the crop
    with the class name and score, saved to `targets`."""
    x = model.normalizer()(torch.stack(crops).to(model.device)).to(model.input_dtype)
    cams = grad_cam(net, x, labels.to(model.device))  # (N, H, W) in [0, 1]
    names = model.class_names
    for crop, cam, label, score, target in zip(crops, cams, labels.tolist(), scores.tolist(),
                                               targets):
        name = names[label] if names else str(label)
        overlay(crop, cam, f"{printable(name)} {score:.2f}").save(target)


class DecodedImages(Dataset):
    """(index, (3, H, W) uint8 crop or None, error message or None) per path, so that a
    DataLoader's workers decode in parallel and unreadable files are answered in order (the
    model normalises the crops on its device)."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = load_image(path)
        except ImageReadError as e:  # names the file
            return index, None, str(e)
        try:
            return index, self.transform(image), None
        except ImageReadError as e:  # the transform's rule (e.g. the resize bound)
            return index, None, f"{path}: {e}"


def answer(path: Path, error: str | None, top: list[tuple[float, int]] | None, names,
           as_json: bool, out) -> None:
    """Print one image's result (or its error) as text lines or one JSON object."""
    if error is not None:
        print(f"predict.py: {printable(error)}", file=sys.stderr)
        if as_json:
            print(json.dumps({"path": str(path), "error": error}), file=out, flush=True)
        return
    topk = [{"label": label, "class": names[label] if names else str(label), "score": score}
            for score, label in top]
    if as_json:
        print(json.dumps({"path": str(path), "pred_label": topk[0]["label"],
                          "pred_score": topk[0]["score"], "pred_class": topk[0]["class"],
                          "topk": topk}), file=out, flush=True)
        return
    print(printable(path))  # names from files and folders cannot forge a line or move the cursor
    for t in topk:
        print(f"  {t['score']:.4f}  {printable(t['class'])}"
              + (f" ({t['label']})" if names else ""))


def main(args: argparse.Namespace) -> int:
    """Run predictions; returns the exit status (0 all answered, 1 some files failed).

    Raises:
        resnext.errors.ResNeXtError: the model cannot be set up (the message says why:
            unknown name, unreadable or unfitting checkpoint, failed download).
    """
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    _check_json_target(args.json)
    device = artifact_device(args.checkpoint, args.device)
    if args.cam and device == "cpu" and exported_file(args.checkpoint):
        raise ConfigError(f"--cam needs the network's gradients, which an exported file does "
                          f"not give: pass the checkpoint {printable(args.checkpoint)} was "
                          f"exported from")
    _check_cam_target(args.cam)
    model = load_for_inference(args.model, args.checkpoint, default_device(device),
                               amp=args.amp, fuse=args.fuse_bn,
                               channels_last=args.channels_last, compile=args.compile,
                               img_size=args.img_size, verbose=args.verbose,
                               use_ema=not args.raw_weights)
    print_load_notes("predict.py", model.load_report, args.verbose)
    cam_net = cam_network(model, args) if args.cam else None
    paths, skipped = collect_paths(args.inputs)
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
        print(f"predict.py: skipped {sum(skipped.values())} entries in folders ({reasons})",
              file=sys.stderr)
    if not paths:
        print(f"predict.py: no images found in {printable(' '.join(args.inputs))}",
              file=sys.stderr)
        return EXIT_FAILED
    cam_names = cam_file_names(paths) if args.cam else []
    model.pad_to = min(args.batch_size, len(paths))  # a compiled model's one batch size
    # Worker processes only pay off from the second batch on (starting one costs ~0.1 s).
    workers = min(args.workers, (len(paths) - 1) // args.batch_size)
    crop = model.preprocessing.crop_size
    workers, prefetch, note = fit_loader_to_shared_memory(workers, 2,
                                                          args.batch_size * 3 * crop * crop)
    if note:
        print(f"predict.py: warning: {note}", file=sys.stderr)
    # A worker that cannot hand a batch over must end the run, not stall it: bounded wait.
    loader = DataLoader(DecodedImages(paths, model.preprocessing.transform(False)),
                        batch_size=args.batch_size, num_workers=workers, collate_fn=list,
                        prefetch_factor=prefetch if workers else None,
                        timeout=LOADER_TIMEOUT_S if workers else 0,
                        worker_init_fn=pixel_limit_worker_init())
    failed = 0
    with (open(args.json, "w") if args.json not in (None, "-") else nullcontext(sys.stdout)) as out:
        for items in loader:
            tensors = [t for _, t, _ in items if t is not None]
            top = iter([])
            if tensors:
                scores = model.classify(torch.stack(tensors))
                values, labels = scores.topk(min(args.topk, scores.shape[1]), dim=1)
                top = iter([list(zip(v, l)) for v, l in zip(values.tolist(), labels.tolist())])
                if cam_net is not None:
                    write_cams(cam_net, model, tensors, labels[:, 0], values[:, 0],
                               [Path(args.cam) / cam_names[i] for i, t, _ in items
                                if t is not None])
            for index, tensor, error in items:  # input order, errors included
                failed += error is not None
                answer(paths[index], error, next(top) if error is None else None,
                       model.class_names, args.json is not None, out)
    if args.cam:
        print(f"predict.py: class activation maps of {len(paths) - failed} images in "
              f"{printable(args.cam)}", file=sys.stderr)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    run_cli("predict.py", main, get_args_parser().parse_args())
