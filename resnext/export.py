"""Export for deployment: TorchScript, torch.export's ExportedProgram and ONNX files that carry
their class names and preprocessing, and the check of an exported file against the eager
model on real photos (int8 quantization: resnext.quantize, re-exported here).

Every file takes (N, 3, crop, crop) float32 NCHW images, prepared with the weights' own
preprocessing (the file's meta['preprocessing']: resize, centre crop, mean/std), and returns
(N, num_classes) float32 logits. The meta (export_meta) travels inside the file, as JSON:
  * TorchScript: `_extra_files['resnext.json']` (torch.jit.load(path, _extra_files=...));
  * ONNX: `metadata_props` 'resnext.json', plus 'resnext.model', 'resnext.class_names' and
    'resnext.preprocessing' (JSON) for tools that show the properties (Netron);
  * ExportedProgram: torch.export.save's extra_files['resnext.json'], and `<file>.json` beside.
load_artifact reads any of them back with the format's own loader.

onnx and onnxruntime are optional (pip install -e ".[onnx]") and imported inside functions,
so `import resnext` never imports them.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .artifacts import artifact_format
from .errors import ConfigError, MissingDependencyError
from .images import load_image
from .quantize import quantize_int8
from .runtime import quiet_torch
from .transforms import Preprocessing

__all__ = ["FORMATS", "META_FILE", "ONNX_INSTALL", "require_onnx", "export_meta",
           "write_atomically", "export_torchscript", "export_onnx", "export_program",
           "load_artifact", "quantize_int8", "Comparison", "compare", "images_per_second",
           "load_images"]

#: Format name -> the default file suffix export.py gives it.
FORMATS = {"torchscript": ".torchscript.pt", "exported-program": ".pt2", "onnx": ".onnx"}
#: The name of the meta inside each file (TorchScript and ExportedProgram extra files, ONNX
#: metadata_props key).
META_FILE = "resnext.json"
ONNX_INSTALL = 'pip install -e ".[onnx]"'
ONNX_OPSET = 17  # ONNX Runtime 1.14+ runs it; every op of the network exists since opset 11
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def require_onnx() -> None:
    """Check that the optional ONNX packages import (before any long work).

    Raises:
        MissingDependencyError (an ImportError): onnx or onnxruntime is missing; the one-line
            message names them and the install command (ONNX_INSTALL).
    """
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"ONNX export needs {' and '.join(missing)}, which "
                                     f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                     f"{ONNX_INSTALL}")


def export_meta(model: nn.Module, fmt: str, dynamic_batch: bool = False,
                source: str | None = None, quantization: dict | None = None) -> dict:
    """What an exported file says about itself (plain JSON types).

    Args:
        model: a ResNeXt; its `class_names` and `preprocessing` come from its weights
            (resnext.weights.WeightsInfo); a random model gets no class names and the
            standard preprocessing (resize 256, crop 224).
        fmt: a FORMATS key.
        dynamic_batch: whether the file takes any batch size (else exactly 1 image).
        source: where the weights came from (the checkpoint path), or None.
        quantization: for an int8 model, how it was quantized (resnext.quantize.int8_recipe),
            else None.
    Returns:
        {'format', 'model', 'num_classes', 'class_names' (list or None), 'preprocessing'
         (Preprocessing.to_dict()), 'input': {'name', 'shape', 'dtype', 'layout'},
         'output': {...}, 'dynamic_batch', 'source', 'quantization', 'torch'}; a dynamic
        batch dimension is written 'N' in the shapes.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    pre = getattr(model, "preprocessing", None) or Preprocessing()
    names = getattr(model, "class_names", None)
    num_classes = getattr(model, "num_classes", None)
    batch = "N" if dynamic_batch else 1
    return {"format": fmt, "model": getattr(model, "arch_name", type(model).__name__),
            "num_classes": num_classes, "class_names": list(names) if names else None,
            "preprocessing": pre.to_dict(),
            "input": {"name": INPUT_NAME, "shape": [batch, 3, pre.crop_size, pre.crop_size],
                      "dtype": "float32", "layout": "NCHW"},
            "output": {"name": OUTPUT_NAME, "shape": [batch, num_classes], "dtype": "float32"},
            "dynamic_batch": dynamic_batch, "source": source, "quantization": quantization,
            "torch": torch.__version__}


def _example(meta: dict, batch: int) -> torch.Tensor:
    """A (batch, 3, crop, crop) float32 input of the meta's shape, for tracing/exporting."""
    crop = meta["preprocessing"]["crop_size"]
    return torch.zeros(batch, 3, crop, crop)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temporary path beside `path`), then rename it over `path`: a failed or
    interrupted export leaves the previous file (or none), never a torn one. Returns `path`
    as a Path; its folder is created if missing.

    Raises:
        OSError: the folder or file cannot be written (the temporary file is removed);
            whatever `write` raises, likewise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike | io.BytesIO,
                       meta: dict) -> Path | io.BytesIO:
    """Trace `model` (eval mode, float32 input of meta's shape), freeze it, save it with the
    meta as `_extra_files['resnext.json']`.

    The trace holds no shape-dependent code, so the file takes any batch size whatever
    meta['dynamic_batch'] says; torch.jit.freeze inlines the weights and folds BatchNorm.
    Works for the fp32 model and for quantize_int8's output alike.

    Args:
        model: maps (N, 3, crop, crop) float32 to (N, num_classes) float32 logits.
        path: output file (written atomically), or a BytesIO to save into.
        meta: export_meta's dict.
    Returns:
        `path` (as a Path for a file). Read back: `files = {'resnext.json': ''};
        torch.jit.load(path, _extra_files=files)`.
    """
    with torch.no_grad(), quiet_torch():
        traced = torch.jit.trace(model.eval(), _example(meta, 1), check_trace=False)
        frozen = torch.jit.freeze(traced)
        extra = {META_FILE: json.dumps(meta)}
        if isinstance(path, io.BytesIO):
            torch.jit.save(frozen, path, _extra_files=extra)
            return path
        return write_atomically(path, lambda tmp: torch.jit.save(frozen, tmp,
                                                                  _extra_files=extra))


def export_onnx(model: nn.Module, path: str | os.PathLike, meta: dict,
                dynamic_batch: bool = False) -> Path:
    """Export to ONNX (opset 17) with torch's TorchScript-based exporter (dynamo=False: it
    needs no onnxscript) and the meta in `metadata_props`.

    Input 'images' (N, 3, crop, crop) float32, output 'logits' (N, num_classes) float32;
    N is 1, or a symbolic 'batch' dimension with dynamic_batch. Constant folding folds
    BatchNorm into the convolutions.

    Args:
        model: the eval-mode float32 model.
        path: output file (written atomically).
        meta: export_meta's dict; stored whole under 'resnext.json', and its model, class
            names and preprocessing under 'resnext.model', 'resnext.class_names' and
            'resnext.preprocessing' (JSON, the model name as plain text).
        dynamic_batch: a batch dimension of any size.
    Returns:
        `path`. Read back: onnxruntime.InferenceSession(path).get_modelmeta()
        .custom_metadata_map, or onnx.load(path).metadata_props.
    Raises:
        MissingDependencyError: onnx or onnxruntime is not installed (require_onnx).
    """
    require_onnx()
    import onnx

    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with torch.no_grad(), quiet_torch():
        torch.onnx.export(model.eval(), (_example(meta, 2 if dynamic_batch else 1),), buffer,
                          dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, opset_version=ONNX_OPSET, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    props = {META_FILE: json.dumps(meta), "resnext.model": str(meta["model"]),
             "resnext.class_names": json.dumps(meta["class_names"]),
             "resnext.preprocessing": json.dumps(meta["preprocessing"])}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def export_program(model: nn.Module, path: str | os.PathLike, meta: dict,
                   dynamic_batch: bool = False) -> Path:
    """torch.export the model and torch.export.save it, with the meta in extra_files and in
    a sidecar `<path>.json`.

    Args:
        model: the eval-mode float32 model.
        path: output file (.pt2, written atomically); the sidecar is `str(path) + '.json'`.
        meta: export_meta's dict.
        dynamic_batch: export the batch as a dynamic dimension (torch.export.Dim, 1 or
            more); otherwise the program takes exactly 1 image and refuses other batches.
    Returns:
        `path`. Read back: `files = {'resnext.json': ''}; torch.export.load(path,
        extra_files=files).module()`; the program's input is (N, 3, crop, crop) float32.
    """
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with quiet_torch():
        program = torch.export.export(model.eval(), (_example(meta, 2 if dynamic_batch else 1),),
                                      dynamic_shapes=shapes)
    text = json.dumps(meta)

    def save(tmp: str) -> None:  # through a file object: any name, not only *.pt2
        with open(tmp, "wb") as f, quiet_torch():
            torch.export.save(program, f, extra_files={META_FILE: text})
    write_atomically(path, save)
    write_atomically(str(path) + ".json", lambda tmp: Path(tmp).write_text(text + "\n"))
    return Path(path)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _load_program(path: str | os.PathLike, files: dict) -> nn.Module:
    """torch.export.load(...).module() of a file object (any name, not only *.pt2). torch logs
    why a file cannot be read, with a traceback, and raises a generic error: the reason is
    kept out of the log and put in the error instead."""
    logger, caught = logging.getLogger("torch.export"), _Records()
    saved = logger.handlers, logger.propagate  # torch's logging setup may attach handlers here
    logger.handlers, logger.propagate = [caught], False
    try:
        with open(path, "rb") as f:
            return torch.export.load(f, extra_files=files).module()
    except (RuntimeError, KeyError) as e:
        causes = [r.exc_info[1] for r in caught.records if r.exc_info and r.exc_info[1]]
        if causes:
            raise RuntimeError(str(causes[-1]).split("(Could this error message")[0].strip()
                               ) from e
        # The archive opened but holds no program ('model'), or is of no version torch reads.
        raise RuntimeError(f"it holds no exported program ({type(e).__name__}: {e})") from e
    finally:
        logger.handlers, logger.propagate = saved


def load_artifact(path: str | os.PathLike | io.BytesIO, fmt: str | None = None
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """Load an exported file with its format's own loader, on CPU (ONNX Runtime with torch's
    thread count, its threads not spinning between runs).

    Args:
        path: a file export_torchscript, export_onnx or export_program wrote (a BytesIO
            for TorchScript).
        fmt: a FORMATS key; None: judged by content (resnext.artifacts.artifact_format).
    Returns:
        (run, meta): run maps (N, 3, crop, crop) float32 images to (N, num_classes) float32
        logits (torch tensors in and out, also for ONNX Runtime); meta is the dict stored in
        the file (for an ExportedProgram without it, the sidecar JSON's; {} if neither).
    Raises:
        MissingDependencyError: an ONNX file without onnx/onnxruntime installed.
        FileNotFoundError: no such file.
        RuntimeError (torch) or ONNX Runtime's own errors: the loader refuses the file; for
            an ExportedProgram the message is the reason torch logged (resnext.artifacts
            turns these into a CheckpointError naming the file).
        ValueError: the stored resnext.json is not JSON.
    """
    in_memory = isinstance(path, io.BytesIO)
    if not in_memory and not Path(path).is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    # Unrecognised content goes to torch.jit.load, which refuses it with its reason.
    fmt = fmt or ("torchscript" if in_memory else artifact_format(path) or "torchscript")
    files = {META_FILE: ""}
    if fmt == "onnx":
        require_onnx()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # torch's thread count, and no spinning: ONNX Runtime's threads otherwise busy-wait
        # after each run, taking the cores from whatever runs next (data loading, torch).
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
        stored = session.get_modelmeta().custom_metadata_map

        def run(x: torch.Tensor) -> torch.Tensor:
            out = session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
            return torch.from_numpy(out)
        return run, json.loads(stored.get(META_FILE) or "{}")
    with quiet_torch():
        if fmt == "exported-program":
            module = _load_program(path, files)
            sidecar = Path(str(path) + ".json")
            if not files[META_FILE] and sidecar.is_file():
                files[META_FILE] = sidecar.read_text()
        else:
            module = torch.jit.load(path if in_memory else str(path), map_location="cpu",
                                    _extra_files=files)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), quiet_torch():
            return module(x)
    return run, json.loads(files[META_FILE] or "{}")


@dataclass(frozen=True)
class Comparison:
    """How a candidate's logits match the reference's on the same images.

    Attributes:
        images: number of images.
        batch_sizes: the batch sizes the candidate ran at (all compared).
        max_abs_diff, mean_abs_diff: over every logit of every image and batch size.
        logit_scale: the largest |reference logit|, the scale the tolerance is relative to.
        top1_agree: images whose top-1 class equals the reference's at every batch size.
        max_prob_diff: the largest |difference| of softmax probabilities (0-1), over every
            class of every image and batch size.
        flipped_margins: for each image whose top-1 differs, the reference's margin there
            (its best logit minus the runner-up), smallest first: how close a call it was.
        median_margin: the reference's median margin over all images (the mean of the two
            middle ones for an even count), for scale.
    """
    images: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    logit_scale: float
    top1_agree: int
    max_prob_diff: float = 0.0
    flipped_margins: tuple[float, ...] = ()
    median_margin: float = 0.0

    @property
    def relative_diff(self) -> float:
        """max |difference| / logit_scale (0 when both are 0)."""
        return self.max_abs_diff / self.logit_scale if self.logit_scale else (
            0.0 if self.max_abs_diff == 0 else float("inf"))

    def passed(self, tolerance: float | None, min_agreement: float) -> bool:
        """relative_diff <= tolerance (None: not checked) and top-1 agreement >= the
        fraction min_agreement (1.0: every image)."""
        agree = self.top1_agree >= min_agreement * self.images - 1e-9
        return agree and (tolerance is None or self.relative_diff <= tolerance)

    def __str__(self) -> str:
        sizes = " and ".join(str(b) for b in self.batch_sizes)
        return (f"{self.images} photos at batch {sizes}, max |logit diff| "
                f"{self.max_abs_diff:.2g} ({self.relative_diff:.2g} of the logit scale "
                f"{self.logit_scale:.3g}), mean {self.mean_abs_diff:.2g}, max |probability "
                f"diff| {self.max_prob_diff:.2g}, top-1 agreement {self.top1_agree}/"
                f"{self.images} ({100 * self.top1_agree / self.images:.1f}%)"
                + (f"; where they differ, the reference's top-1 margin was "
                   f"{', '.join(f'{m:.2g}' for m in self.flipped_margins[:5])}"
                   f"{' ...' if len(self.flipped_margins) > 5 else ''} (median image "
                   f"{self.median_margin:.3g})" if self.flipped_margins else ""))


def compare(reference_fn: Callable[[torch.Tensor], torch.Tensor],
            candidate_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            batch_sizes: Sequence[int] = (1,)) -> Comparison:
    """Run both on the same images and measure how far the candidate's logits are.

    Args:
        reference_fn, candidate_fn: (B, 3, H, W) float32 -> (B, num_classes) float32.
        images: (N, 3, H, W) float32, prepared with the weights' preprocessing.
        batch_sizes: the candidate runs over the images in chunks of each size in turn (the
            last chunk may be smaller); the reference in chunks of 16.
    Returns:
        Comparison.
    Raises:
        ValueError: no images, or a candidate output of another shape than the reference's.
    """
    if len(images) == 0:
        raise ValueError("compare needs at least one image")
    with torch.no_grad():
        reference = torch.cat([reference_fn(c).float() for c in images.split(16)])
        agree = torch.ones(len(images), dtype=torch.bool)
        worst, total, count, worst_prob = 0.0, 0.0, 0, 0.0
        for size in batch_sizes:
            got = torch.cat([candidate_fn(c.contiguous()).float() for c in images.split(size)])
            if got.shape != reference.shape:
                raise ValueError(f"the candidate gives {tuple(got.shape)} logits at batch "
                                 f"{size}, the reference {tuple(reference.shape)}")
            diff = (got - reference).abs()
            worst = max(worst, diff.max().item())
            total, count = total + diff.sum().item(), count + diff.numel()
            probs = (got.softmax(1) - reference.softmax(1)).abs().max().item()
            worst_prob = max(worst_prob, probs)
            agree &= got.argmax(1) == reference.argmax(1)
    top2 = reference.topk(min(2, reference.shape[1]), dim=1).values
    margins = top2[:, 0] - top2[:, -1]  # 0 for a single class
    flipped = tuple(sorted(margins[~agree].tolist()))
    return Comparison(len(images), tuple(batch_sizes), worst, total / count,
                      reference.abs().max().item(), int(agree.sum()), worst_prob, flipped,
                      margins.quantile(0.5).item())


def images_per_second(fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                      batch: int, runs: int = 5, warmup: int = 1) -> float:
    """CPU throughput of `fn` on `batch` copies of one (3, H, W) image: the median of `runs`
    timed calls after `warmup` untimed ones, in images per second."""
    x = image.unsqueeze(0).expand(batch, *image.shape).contiguous()
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            start = time.perf_counter()
            fn(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def load_images(paths: Sequence[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """Decode and prepare images as the weights expect: (N, 3, crop, crop) float32.

    Raises:
        ImageReadError: a file that cannot be read (the message names it).
    """
    transform = preprocessing.transform()
    return torch.stack([transform(load_image(p)) for p in paths])
