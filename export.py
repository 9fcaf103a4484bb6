"""Export a ResNeXt for deployment and check the file against the eager model in the same run.

    python export.py --checkpoint work_dirs/rx50/best.pth --format onnx --dynamic-batch
    python export.py --checkpoint best.pth --format torchscript --check-images photos/
    python export.py --checkpoint best.pth --format exported-program --out deploy/rx50.pt2
    python export.py --checkpoint best.pth --quantize int8 --calibrate data/train

Formats: torchscript (trace + freeze, .torchscript.pt), exported-program (torch.export,
.pt2 and a .json sidecar), onnx (.onnx, opset 17; needs pip install -e ".[onnx]"). Every file
takes (N, 3, crop, crop) float32 NCHW images prepared with the weights' preprocessing and
carries the class names and that preprocessing (docs/export.md). The default output sits
beside the checkpoint. --quantize int8 writes an int8 TorchScript file (FX graph mode static
quantization for x86 CPUs, calibrated on --calibrate; the head stays float32) after checking
its top-1 agreement with fp32 (at least --min-agreement, default 99%: else nothing is
written), and reports its size and speed against fp32.

The check loads the written file back with its format's own loader (torch.jit.load,
torch.export.load, onnxruntime) and compares its logits with the eager model's on real photos
(default: demo/), at batch 1, and also at min(16, photos) with --dynamic-batch (always for
int8). Exit status 1 when it fails: top-1 agreement below --min-agreement or, for fp32 files,
max |logit difference| above --tolerance times the largest |logit| (an fp32 file is kept; an
int8 file is checked before it is written, and then not written). 2: a usage or setup error
(one line on stderr); 130: interrupted. predict.py and evaluate.py run the files written here
as --checkpoint.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from resnext.cli import (EXIT_FAILED, HelpFormatter, check_output_path, positive_int,
                         non_negative_int, print_load_notes, printable, run_cli)
from resnext.errors import ConfigError
from resnext.images import list_images, spread_evenly
from resnext.export import (FORMATS, Comparison, compare, export_meta,
                            export_onnx, export_program, export_torchscript, images_per_second,
                            load_artifact, load_images, require_onnx, write_atomically)
from resnext.quantize import FLOAT_LAYERS, cpu_has_vnni, int8_recipe, quantize_int8
from resnext.transforms import Preprocessing
from resnext.weights import get_model

DEMO = Path(__file__).resolve().parent / "demo"
# int8 rounding may flip a photo whose two best logits are close; below 99% top-1 agreement
# with fp32 (the project's target for its int8 files) nothing is written.
INT8_MIN_AGREEMENT = 0.99


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    """export.py's flags."""
    p = argparse.ArgumentParser(description="Export a ResNeXt (TorchScript, ExportedProgram, "
                                "ONNX, int8) and check it against the eager model",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None, help="weights (path or URL, any format the "
                   "loader reads); default: the released OpenMMLab weights of --model")
    p.add_argument("--model", default=None, help="factory or seed name; default: the "
                   "checkpoint's own, else resnext50_32x4d")
    p.add_argument("--format", choices=list(FORMATS), default="torchscript",
                   help="what to write")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="any batch size (default: exactly 1 image; TorchScript takes any "
                        "batch either way); checked at batch 1 and min(16, photos)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output file; default: beside the checkpoint, its name with the "
                        "format's suffix (.torchscript.pt, .pt2, .onnx; .int8.torchscript.pt)")
    p.add_argument("--check-images", nargs="+", default=None, metavar="DIR|FILE",
                   help="photos to check the file on (default: demo/ of this repository)")
    p.add_argument("--tolerance", type=_positive_float, default=1e-3, metavar="REL",
                   help="largest max |logit difference| allowed, relative to the largest "
                        "|logit| (fp32 formats)")
    p.add_argument("--min-agreement", type=_fraction, default=None, metavar="FRACTION",
                   help="smallest top-1 agreement allowed, a fraction (default: 1.0; "
                        f"{INT8_MIN_AGREEMENT} for int8)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 post-training static quantization for x86 CPUs (TorchScript)")
    p.add_argument("--calibrate", default=None, metavar="DIR",
                   help="int8: folder of photos from the deployment's domain to calibrate on")
    p.add_argument("--calibrate-images", type=positive_int, default=64, metavar="N",
                   help="int8: photos taken from --calibrate, evenly spread over its listing")
    p.add_argument("--float-layers", nargs="*", choices=list(FLOAT_LAYERS), default=["head"],
                   metavar="LAYER", help="int8: layers kept in float32: head (fc), stem (the "
                   "7x7 conv block); none: give the flag alone")
    p.add_argument("--activation-bits", type=int, choices=[7, 8], default=None,
                   help="int8: activation range; default 8 on a CPU with AVX512-VNNI (this "
                        f"one: {'yes' if cpu_has_vnni() else 'no'}), else 7 (torch's x86 "
                        "default: fbgemm's kernels without VNNI can overflow with 8); use 7 "
                        "for a file that will run on CPUs without AVX512-VNNI")
    p.add_argument("--speed-runs", type=non_negative_int, default=5, metavar="N",
                   help="int8: timed runs per batch size (median); 0 skips the timing")
    p.add_argument("--raw-weights", action="store_true",
                   help="a train.py checkpoint of an EMA run: export the raw weights instead "
                        "of the EMA's")
    p.add_argument("--verbose", action="store_true",
                   help="when weights do not fit the model, list every key")
    return p


def default_out(checkpoint: str | None, model: str | None, fmt: str, int8: bool) -> Path:
    """Beside the checkpoint (in the current folder for a URL or the released weights), the
    checkpoint's name without its suffix plus the format's: best.pth -> best.onnx."""
    suffix = (".int8" if int8 else "") + FORMATS[fmt]
    base = Path(checkpoint or "")
    if checkpoint and "://" in checkpoint:
        base = Path(Path(urlparse(checkpoint).path).name)
    if not base.name:  # the released weights, or a URL that names no file
        return Path((model or "resnext50_32x4d") + suffix)
    return base.with_name(base.with_suffix("").name + suffix)


def collect_images(items: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside (resnext.images.list_images).

    Raises:
        ConfigError: nothing found. FileNotFoundError: a path that does not exist.
    """
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(2, "No such file or folder", str(path))
        paths.extend(list_images(path) if path.is_dir() else [path])
    if not paths:
        raise ConfigError(f"no images in {' '.join(str(i) for i in items)}")
    return paths


def _size_mb(path_or_bytes: Path | bytes) -> float:
    size = len(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes.stat().st_size
    return size / 1e6


def _verdict(result: Comparison, tolerance: float | None, min_agreement: float,
             meta_ok: bool, outcome: str) -> int:
    """0 when the check passed; else print which rules failed, and `outcome`, and return 1."""
    failed = []
    if result.top1_agree < min_agreement * result.images - 1e-9:
        failed.append(f"top-1 agreement {result.top1_agree}/{result.images} is under "
                      f"--min-agreement {min_agreement:g}")
    if tolerance is not None and result.relative_diff > tolerance:
        failed.append(f"max |logit diff| {result.relative_diff:.2g} of the logit scale is over "
                      f"--tolerance {tolerance:g}")
    if not meta_ok:
        failed.append("the metadata read back differs from what was written")
    if not failed:
        return 0
    print(f"export.py: check failed: {'; '.join(failed)}; {outcome}", file=sys.stderr)
    return EXIT_FAILED


def _quantized(args, model, meta, out: Path, images: torch.Tensor, sizes,
               check_paths: list[Path]) -> int:
    """--quantize int8: calibrate, quantize, check against fp32 (the file's bytes, loaded
    back), write only when the agreement passes; sizes and speed."""
    print("export.py: note: torch 2.14 deprecates torch.ao.quantization and torch.jit; both "
          "still work (docs/export.md)", file=sys.stderr)
    pre = model.preprocessing or Preprocessing()
    listed = collect_images([args.calibrate])
    calib = spread_evenly(listed, args.calibrate_images)
    print(f"calibrate: {len(calib)} of {len(listed)} photos in {printable(args.calibrate)}")
    if len(calib) < 16:
        print(f"export.py: note: only {len(calib)} calibration photo"
              f"{'s' if len(calib) > 1 else ''}; activation ranges measured on so few may not "
              f"cover the deployment's photos (tens are advised)", file=sys.stderr)
    shared = {p.resolve() for p in calib} & {p.resolve() for p in check_paths}
    if shared:
        print(f"export.py: note: {len(shared)} of the {len(check_paths)} check photos "
              f"{'are' if len(shared) > 1 else 'is'} also calibrated on, which flatters the "
              f"agreement; pass other photos to --check-images", file=sys.stderr)
    full_range = None if args.activation_bits is None else args.activation_bits == 8
    recipe = int8_recipe("x86", args.float_layers, full_range)
    batches = (load_images(calib[i:i + 16], pre) for i in range(0, len(calib), 16))
    int8 = quantize_int8(model, batches, "x86", args.float_layers, full_range)
    meta["quantization"] = dict(recipe, calibration_images=len(calib))
    data = export_torchscript(int8, io.BytesIO(), meta).getvalue()
    fp32 = export_torchscript(model, io.BytesIO(), dict(meta, quantization=None)).getvalue()
    run, stored = load_artifact(io.BytesIO(data), "torchscript")
    result = compare(model, run, images, sizes)
    float_layers = ", ".join(recipe["float_layers"]) or "none"
    print(f"check: int8 ({recipe['activation_bits']}-bit activations, float32 layers: "
          f"{float_layers}) vs fp32 eager: {result}")
    agreement = INT8_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
    if not result.passed(None, agreement) or stored != meta:
        return _verdict(result, None, agreement, stored == meta,
                        f"{printable(out)} not written (--min-agreement lowers the bar)")
    write_atomically(out, lambda tmp: Path(tmp).write_bytes(data))
    print(f"wrote {printable(out)} ({_size_mb(out):.1f} MB, int8 TorchScript)")
    print(f"size: fp32 TorchScript {_size_mb(fp32):.1f} MB, int8 {_size_mb(out):.1f} MB "
          f"({_size_mb(fp32) / _size_mb(out):.2f}x smaller)")
    if args.speed_runs:
        run_fp32, _ = load_artifact(io.BytesIO(fp32), "torchscript")
        parts = []
        for batch in (1, 16):
            a = images_per_second(run_fp32, images[0], batch, args.speed_runs)
            b = images_per_second(run, images[0], batch, args.speed_runs)
            parts.append(f"batch {batch}: fp32 {a:.1f}, int8 {b:.1f} images/s ({b / a:.2f}x)")
        print(f"speed (CPU, {torch.get_num_threads()} threads, TorchScript, median of "
              f"{args.speed_runs}): {'; '.join(parts)}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Export, then check; returns the exit status (0 the check passed, 1 it failed).

    Raises:
        resnext.errors.ResNeXtError: a usage or setup error (unknown model, unreadable
            checkpoint, missing ONNX packages, no photos to check on), one line.
    """
    int8 = args.quantize == "int8"
    if int8 and args.format != "torchscript":
        raise ConfigError(f"--quantize int8 writes TorchScript; drop --format {args.format}")
    if int8 and not args.calibrate:
        raise ConfigError("--quantize int8 needs --calibrate DIR: photos like the ones the "
                          "model will see, to measure activation ranges on")
    if args.format == "onnx":
        require_onnx()
    out = Path(args.out or default_out(args.checkpoint, args.model, args.format, int8))
    if args.checkpoint and Path(args.checkpoint).resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the checkpoint itself")
    check_output_path(out)
    check_paths = collect_images(args.check_images or [DEMO])
    if args.dynamic_batch and len(check_paths) < 2:
        raise ConfigError("--dynamic-batch is checked at two batch sizes: give at least 2 "
                          "photos to --check-images")
    model = get_model(args.model, pretrained=args.checkpoint or True, verbose=args.verbose,
                      use_ema=not args.raw_weights)
    print_load_notes("export.py", model.weights_info.load_report, args.verbose)
    model = model.float().eval()
    images = load_images(check_paths, model.preprocessing or Preprocessing())
    # TorchScript runs any batch: int8 files are checked at both sizes too.
    sizes = tuple(dict.fromkeys((1, min(16, len(images))) if args.dynamic_batch or int8
                                else (1,)))
    names = model.class_names
    print(f"export.py: {model.arch_name} ({model.num_classes} classes"
          + (f": {printable(', '.join(names[:5]))}{', ...' if len(names) > 5 else ''}"
             if names else "") + f") -> {printable(out)}")
    meta = export_meta(model, args.format, args.dynamic_batch,
                       args.checkpoint or model.weights_info.release)
    if int8:
        return _quantized(args, model, meta, out, images, sizes, check_paths)
    if args.format == "torchscript":
        export_torchscript(model, out, meta)
    elif args.format == "onnx":
        export_onnx(model, out, meta, args.dynamic_batch)
    else:
        export_program(model, out, meta, args.dynamic_batch)
    print(f"wrote {printable(out)} ({_size_mb(out):.1f} MB, {args.format}, class names and "
          f"preprocessing inside)")
    run, stored = load_artifact(out, args.format)
    result = compare(model, run, images, sizes)
    print(f"check: {result}")
    agreement = 1.0 if args.min_agreement is None else args.min_agreement
    return _verdict(result, args.tolerance, agreement, stored == meta,
                    f"{printable(out)} is kept")


if __name__ == "__main__":
    run_cli("export.py", main, get_args_parser().parse_args())
