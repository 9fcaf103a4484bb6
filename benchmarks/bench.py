"""Speed and memory of resnext against the obvious alternative, measured in the same run.

    python benchmarks/bench.py                       # CPU, all sections, about 10 minutes on 2 cores
    python benchmarks/bench.py --device cuda --compile --json bench_cuda.json
    python benchmarks/bench.py --sections pipeline coldstart --quick
    python benchmarks/bench.py --device cuda --compile --sections e2e inference --batch-sizes 256  # one H200, 8-10 min
    python benchmarks/bench.py --device cuda --compile --sections e2e --e2e-batches 32 --e2e-compile-modes reduce-overhead
    python benchmarks/bench.py --sections export     # deployment files on CPU, about a minute on 2 cores
    python benchmarks/bench.py --sections export --quick --export-img-size 64   # smoke run

Every number is a median over --repeats timed runs after --warmup untimed ones, and every
"ratio" divides our images/second (or seconds, or bytes) by the reference's from this same
process, on this machine, right before or after. References:
  inference / train step: torchvision.models.resnext50_32x4d in a plain fp32 NCHW loop
  input pipeline:         torchvision ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/Normalize;
                          the training loader with float32 batches (normalised in the worker)
  cold start / memory:    the same job written with torchvision and torch.load, and a bare
                          `python -c "import torch"` (predict.py's floor)
  end to end (e2e):       train.py on an ImageNet-like JPEG folder made from the --data photos
                          (short side 375, replicated), steady-state images/s from its log,
                          and its data loader alone, against the pure train steps of
                          torchvision fp32 NCHW and AMP fp16 at the same batch;
                          evaluate.py's pipeline over 5 x that folder (50,000 JPEGs, as
                          ImageNet val) and its loader alone, against torchvision fp32
                          NCHW inference at the same batch
  deployment files:       torchvision fp32 NCHW eager (inference mode) holding the same weights
                          as the exported model, on CPU; each file (exported program,
                          TorchScript, ONNX Runtime, int8 TorchScript) is written to a
                          temporary folder and loaded back with resnext.export.load_artifact
Our fast paths are the scripts' opt-in options: predict.py/evaluate.py --amp auto (--fuse-bn
on CPU; channels_last is the default), train.py --amp auto (--compile) and --fast-decode.
This is a benchmark, not a test: nothing here fails on a slow machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import datasets, transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import resnext  # noqa: E402
import resnext.cli  # noqa: E402
import resnext.runtime  # noqa: E402
from resnext.datasets import (ClassFolderDataset, EpochTaggedSampler,  # noqa: E402
                              SeededAugmentation)
from resnext.images import list_images, load_image, spread_evenly  # noqa: E402
from resnext.transforms import (FastTrainTransform, Preprocessing,  # noqa: E402
                                eval_transform, train_transform)
from resnext.errors import ConfigError, MissingDependencyError  # noqa: E402
from resnext.export import (ONNX_INSTALL, compare, export_meta, export_onnx,  # noqa: E402
                            export_program, export_torchscript, load_artifact, load_images,
                            require_onnx)
from resnext.quantize import int8_recipe, quantize_int8  # noqa: E402
from resnext.inference import fuse_bn  # noqa: E402
from resnext.runtime import (amp_name, autocast, compile_available, maybe_compile,  # noqa: E402
                             resolve_amp)

NORMALIZE = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def default_data() -> Path:
    """The shared/data folder beside the repository when there is one (all its photos), else
    the repository's own tests/data (fewer photos: a clone alone runs the benchmark too)."""
    for c in (os.environ.get("RESNEXT_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if c and Path(c, "hymenoptera_data").is_dir():
            return Path(c)
    return REPO / "tests" / "data"


def data_folder(data: Path, name: str) -> Path:
    """`name` (hymenoptera_data, demo or imagenet_samples) in --data: shared/data's layout, or
    tests/data's, where hymenoptera_data is hymenoptera/ and demo/ is the repository's."""
    if (data / name).is_dir():
        return data / name
    return {"hymenoptera_data": data / "hymenoptera", "demo": REPO / "demo"}.get(name, data / name)


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=resnext.cli.HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--data", type=Path, default=default_data(),
                   help="photo folder: shared/data (hymenoptera_data, demo, imagenet_samples) "
                        "or the repository's tests/data (hymenoptera, imagenet_samples)")
    p.add_argument("--sections", nargs="+",
                   default=["inference", "train", "pipeline", "coldstart"],
                   choices=["inference", "train", "pipeline", "coldstart", "e2e", "export"],
                   help="what to measure (e2e, train.py end to end, is meant for a GPU; "
                        "export: the deployment files, on CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64],
                   help="inference batch sizes")
    p.add_argument("--export-batch-sizes", type=int, nargs="+", default=[1, 16],
                   help="batch sizes of the export section")
    p.add_argument("--export-img-size", type=int, default=None,
                   help="crop of the export section (default: the weights' own, 224 for "
                        "random weights; smaller for a smoke run)")
    p.add_argument("--train-batch", type=int, default=None, help="default 16 CPU / 256 GPU")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs (compiled variants get 10 more)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs; every figure is their median")
    p.add_argument("--compile", action="store_true", help="add torch.compile to our fast paths")
    p.add_argument("--checkpoint", default=None,
                   help="weights for the top-1 agreement check (default: random weights "
                        "with randomised BN statistics, which give decisive logits)")
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats, fewer sizes")
    p.add_argument("--e2e-images", type=int, default=None,
                   help="training JPEGs for the e2e section (default 10,000 GPU / 256 CPU)")
    p.add_argument("--e2e-batches", type=int, nargs="+", default=None,
                   help="per-process batches for e2e (default 256 32 GPU / 8 16 CPU)")
    p.add_argument("--e2e-timeout", type=float, default=300,
                   help="seconds one train.py run may take before it is stopped (its figure "
                        "then comes from the intervals it logged after epoch 1, if any)")
    p.add_argument("--e2e-epochs", type=int, default=3,
                   help="train.py epochs per e2e run; epochs after the first are timed")
    p.add_argument("--e2e-workers", type=int, default=None,
                   help="loader workers for e2e (default: train.py's default)")
    p.add_argument("--e2e-compile-modes", nargs="+", default=["default"],
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="with --compile, one train.py --compile run per torch.compile mode "
                        "(reduce-overhead: CUDA graphs, for small per-GPU batches)")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 3
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: list, device, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each fn, timed in rounds (A B C, A B C, ...) so that slow drifts of
    the machine (heat, other load) hit every variant alike instead of the one timed last."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync(device)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def header(device: torch.device) -> dict:
    cpu, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                   if line.startswith("model name"))
        all_flags = next(l for l in text.splitlines() if l.startswith("flags")).split()
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                 if f in all_flags]
    except (OSError, StopIteration):
        pass
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_flags": flags,
            "cpu_threads": torch.get_num_threads(), "device": str(device),
            "amp_auto": amp_name(resolve_amp("auto", device))}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def row(name: str, images_per_s: float, reference: float, extra: str = "") -> dict:
    ratio = images_per_s / reference
    print(f"  {name:<52} {images_per_s:10.1f} img/s  {ratio:6.2f}x  {extra}", flush=True)
    return {"name": name, "images_per_s": images_per_s, "ratio": ratio}


# --- 1. inference ---------------------------------------------------------------------------

def fast_inference_model(model, device, use_compile):
    """evaluate.py's fast path: BN folded on CPU only (slower on CUDA eager), channels_last."""
    fast = fuse_bn(model) if device.type == "cpu" else model
    fast = fast.to(memory_format=torch.channels_last)
    return maybe_compile(fast, device) if use_compile else fast


def fresh_compile_cache() -> None:
    """Forget compiled graphs before a new batch size. Otherwise the second size seen in this
    process recompiles with a dynamic batch dimension (dynamo's automatic dynamic shapes),
    which a real run at one batch size (train.py, evaluate.py) never does."""
    import torch._dynamo
    torch._dynamo.reset()


def bench_inference(args, device) -> dict:
    print("Inference, resnext50_32x4d, 224x224, images/s (ratio vs torchvision fp32 NCHW)")
    torch.manual_seed(0)
    reference = torchvision.models.resnext50_32x4d().eval().to(device)
    ours = resnext.resnext50_32x4d().eval().to(device)
    amp = resolve_amp("auto", device)
    fast = fast_inference_model(ours, device, False)
    variants = [("torchvision fp32 NCHW (reference)", reference, None, False),
                ("resnext fp32 NCHW (same settings)", ours, None, False),
                (f"resnext fast: {amp_name(amp)} + channels_last"
                 f"{' + fuse-bn' if device.type == 'cpu' else ''}", fast, amp, True)]
    if device.type == "cuda":
        variants.insert(1, ("torchvision AMP fp16 NCHW", reference, torch.float16, False))
    if args.compile and compile_available(device)[0]:
        variants.append(("resnext fast + torch.compile (evaluate.py --compile)",
                         fast_inference_model(ours, device, True), amp, True))
    results = []
    for batch in args.batch_sizes:
        print(f" batch {batch}")
        fresh_compile_cache()
        x = torch.rand(batch, 3, 224, 224, device=device)
        steps = []
        for name, model, variant_amp, channels_last in variants:
            xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

            def step(model=model, xx=xx, variant_amp=variant_amp):
                with torch.inference_mode(), autocast(device, variant_amp):
                    model(xx)

            steps.append(step)
        # Compiled variants compile and autotune on their first calls: 10 more warm-ups.
        seconds = interleaved_medians(steps, device, args.warmup + 10 * args.compile,
                                      args.repeats)
        base = batch / seconds[0]
        for (name, *_), s in zip(variants, seconds):
            results.append({"batch": batch, **row(name, batch / s, base)})
    agreement = top1_agreement(args, device, ours, amp)
    return {"results": results, "agreement": agreement}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights scaled by 1/sqrt(fan-in), random BN affine parameters and statistics
    near (1, 0): logits decisive enough for a top-1 agreement count (the freshly initialised
    model's are nearly flat: zero-init residuals, a 0.01-std head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)


def top1_agreement(args, device, ours, amp) -> dict:
    """Fast path vs our fp32 path on real photos: top-1 agreement and max probability gap."""
    if args.checkpoint:
        ours = resnext.get_model(pretrained=args.checkpoint).to(device)
        source = args.checkpoint
    else:
        randomize(ours, seed=0)
        source = "random weights, randomised BN statistics"
    fast = fast_inference_model(ours, device, False)
    paths = [p for folder in (data_folder(args.data, "hymenoptera_data") / "val",
                              data_folder(args.data, "demo"),
                              data_folder(args.data, "imagenet_samples"))
             for p in list_images(folder)]
    tf = eval_transform()
    same, max_gap = 0, 0.0
    for i in range(0, len(paths), 16):
        x = torch.stack([tf(load_image(p)) for p in paths[i:i + 16]]).to(device)
        with torch.inference_mode():
            p32 = ours(x).float().softmax(1)
            with autocast(device, amp):
                pfast = fast(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)
        same += (p32.argmax(1) == pfast.argmax(1)).sum().item()
        max_gap = max(max_gap, (p32 - pfast).abs().max().item())
    result = {"images": len(paths), "top1_agreement_pct": 100 * same / len(paths),
              "max_prob_diff": max_gap, "weights": source}
    print(f" top-1 agreement fast vs fp32: {result['top1_agreement_pct']:.2f}% of {len(paths)} "
          f"real photos, max |probability difference| {max_gap:.4f} ({source})")
    return result


# --- 2. training step ---------------------------------------------------------------------------

def bench_train(args, device) -> list:
    batch = args.train_batch or (256 if device.type == "cuda" else 16)
    print(f"Training step (forward, backward, SGD), resnext50_32x4d, batch {batch}, 224x224")
    amp = resolve_amp("auto", device)
    rows = train_steps(args, device, batch, amp)
    print(f"Training step with the torchvision-v2 recipe's batch-level extras, batch {batch}")
    return rows + recipe_steps(args, device, batch, amp)


def recipe_steps(args, device, batch: int, amp) -> list:
    """train.py's step (--amp auto, channels_last) plain (reference) against the same step
    with MixUp/CutMix on the batch (resnext.recipes.BatchMixer), with an EMA update after
    it (ModelEMA, --model-ema-steps 1: the dearest setting), and with both."""
    from resnext.recipes import BatchMixer, ModelEMA
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    mixer = BatchMixer(1000, 0.2, 1.0)

    def make_step(mix: bool, average: bool):
        # Each variant its own model, optimizer and EMA; a small lr keeps the weights finite
        # (NaN weights would time differently).
        model = resnext.resnext50_32x4d().to(device).train()
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                                    weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        ema = ModelEMA(model, 0.999) if average else None

        def step() -> None:
            images, targets = mixer(x, y, 0, 0) if mix else (x, y)
            with autocast(device, amp):
                loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
        return step

    variants = [("train.py step, default recipe (reference)", False, False),
                ("+ MixUp/CutMix (--mixup-alpha 0.2 --cutmix-alpha 1.0)", True, False),
                ("+ EMA update every step (--model-ema --model-ema-steps 1)", False, True),
                ("+ both", True, True)]
    seconds = interleaved_medians([make_step(m, a) for _, m, a in variants], device,
                                  args.warmup, args.repeats)
    return [{"batch": batch, **row(name, batch / s, batch / seconds[0])}
            for (name, *_), s in zip(variants, seconds)]


def train_steps(args, device, batch: int, amp) -> list:
    """Pure train-step images/s: torchvision fp32 NCHW (reference), torchvision AMP fp16 NCHW
    (CUDA), ours as train.py runs it (--amp auto, channels_last), and compiled."""
    torch.manual_seed(0)
    fresh_compile_cache()
    x = torch.rand(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    variants = [("torchvision fp32 NCHW (reference)", torchvision.models.resnext50_32x4d(),
                 None, False, False),
                (f"train.py --amp auto ({amp_name(amp)}), channels_last",
                 resnext.resnext50_32x4d(), amp, True, False)]
    if device.type == "cuda":
        variants.insert(1, ("torchvision AMP fp16 NCHW", torchvision.models.resnext50_32x4d(),
                            torch.float16, False, False))
    if args.compile and compile_available(device)[0]:
        variants.append(("train.py --amp auto --compile", resnext.resnext50_32x4d(), amp,
                         True, True))
    steps = []
    for name, model, variant_amp, channels_last, use_compile in variants:
        model = model.to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        # Ours steps as train.py does (fused SGD on CUDA); the references use torch's default.
        fused = {"fused": True} if name.startswith("train.py") and device.type == "cuda" else {}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                    **fused)
        scaler = torch.amp.GradScaler(device.type, enabled=variant_amp == torch.float16)
        run = torch.compile(model) if use_compile else model

        def step(run=run, xx=xx, variant_amp=variant_amp, optimizer=optimizer, scaler=scaler):
            with autocast(device, variant_amp):
                loss = torch.nn.functional.cross_entropy(run(xx).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        steps.append(step)
    seconds = interleaved_medians(steps, device, args.warmup + 10 * args.compile, args.repeats)
    return [{"batch": batch, **row(name, batch / s, batch / seconds[0])}
            for (name, *_), s in zip(variants, seconds)]


# --- 3. input pipeline --------------------------------------------------------------------------

def bench_pipeline(args) -> dict:
    """Images/s of one process with one thread: what a DataLoader worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = data_folder(args.data, "hymenoptera_data")
    reference_train = datasets.ImageFolder(str(root / "train"), T.Compose([
        T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), NORMALIZE]))
    ours_train = ClassFolderDataset(root / "train", FastTrainTransform(224), loader=str)
    reference_val = datasets.ImageFolder(str(root / "val"), T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(), NORMALIZE]))
    ours_val = ClassFolderDataset(root / "val", eval_transform(224))

    def images_per_s(dataset):
        def epoch():
            torch.manual_seed(0)
            for i in range(len(dataset)):
                dataset[i]
        return len(dataset) / median_time(epoch, torch.device("cpu"), 1, max(3, args.repeats // 2))

    print("Input pipeline, one worker (1 thread), hymenoptera JPEGs (up to 2592 px)")
    out = {}
    for label, reference, ours, name in (
            ("train", reference_train, ours_train, "resnext FastTrainTransform (--fast-decode)"),
            ("eval", reference_val, ours_val, "resnext eval_transform (pixel-identical)")):
        print(f" {label}: {len(ours)} images")
        base = images_per_s(reference)
        out[label] = [row("torchvision ImageFolder + transforms (reference)", base, base),
                      row(name, images_per_s(ours), base)]
    # The torchvision-v2 recipe's per-image work against the default recipe's, per worker.
    plain = ClassFolderDataset(root / "train", train_transform(224))
    v2 = ClassFolderDataset(root / "train", train_transform(176, "ta_wide", 0.1))
    print(f" train, recipes: {len(plain)} images")
    base = images_per_s(plain)
    out["train_recipes"] = [
        row("default recipe: RandomResizedCrop 224 + flip (reference)", base, base),
        row("torchvision-v2: crop 176, TrivialAugmentWide, RandomErasing 0.1",
            images_per_s(v2), base)]
    torch.set_num_threads(threads)
    # What the batches cost between the worker and the model: collating, passing through
    # shared memory (and, on CUDA, pinning and copying). float32 is 4x the bytes of uint8.
    print("Training loader, 1 worker, batch 64, 512 ImageNet-size JPEGs (short side 375)")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(args.data, Path(tmp), 512, 375)
        batches = 15 if args.quick else 30
        base = loader_images_per_s(root, 64, 1, 224, batches, uint8=False)
        uint8 = loader_images_per_s(root, 64, 1, 224, batches)
    out["loader"] = [row("float32 batches (normalised in the worker)", base, base),
                     row("uint8 batches (normalised on the device)", uint8, base)]
    return out


# --- 4. cold start and peak memory ------------------------------------------------------------

# Runs a script file or a code string as __main__ and reports the process's own peak RSS
# (VmHWM). rusage's ru_maxrss would include the benchmark process itself, which the child
# resembles between fork and exec.
_PEAK_WRAPPER = """
import runpy, sys
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
try:
    if kind == "file":
        runpy.run_path(target, run_name="__main__")
    else:
        exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
finally:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print("PEAK_RSS_KB", hwm.split()[1], file=sys.stderr)
"""


def run_measured(kind: str, target: str, *args: str) -> tuple[float, float, str]:
    """(seconds from process start to exit, peak RSS in MiB, stdout) of a fresh Python
    process running `target` (kind 'file': a script path; 'code': source text)."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, kind, target, *args], cwd=REPO,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    peak = [l for l in res.stderr.splitlines() if l.startswith("PEAK_RSS_KB")]
    if res.returncode != 0 or not peak:
        raise RuntimeError(f"{target[:60]!r} failed:\n{res.stderr[-2000:]}")
    return seconds, int(peak[-1].split()[1]) / 1024, res.stdout


TORCHVISION_PREDICT = """
import sys, torch, torchvision
from PIL import Image
from torchvision import transforms as T
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
model = torchvision.models.resnext50_32x4d(num_classes=ckpt["state_dict"]["fc.weight"].shape[0])
model.load_state_dict(ckpt["state_dict"])
model.eval()
tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
x = tf(Image.open(sys.argv[2]).convert("RGB")).unsqueeze(0)
with torch.inference_mode():
    p = model(x).softmax(1)[0]
for s, i in zip(*p.topk(5)):
    print(f"{s.item():.4f} {ckpt['meta']['classes'][i]}")
"""

TORCHVISION_CONVERT = """
import sys, torch, torchvision
raw = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
sd = {k.replace("backbone.", "").replace("head.fc.", "fc."): v
      for k, v in raw["state_dict"].items()}
model = torchvision.models.resnext101_32x8d()
model.load_state_dict(sd)
"""

OURS_CONVERT = """
import sys
from resnext import get_model
get_model("resnext101_32x8d", pretrained=sys.argv[1])
"""


def bench_coldstart(args) -> dict:
    print("Cold start (process start to answer) and peak memory (RSS)")
    bird = str(args.data / "demo" / "bird.JPEG")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "rx50.pth"
        model = resnext.resnext50_32x4d()
        torch.save({"state_dict": model.state_dict(),
                    "meta": {"model": "resnext50_32x4d",
                             "classes": resnext.imagenet_class_names()}},
                   ckpt)
        cmds = {"torchvision + torch.load script (reference)":
                ("code", TORCHVISION_PREDICT, str(ckpt), bird),
                "python predict.py IMAGE --checkpoint FILE":
                ("file", str(REPO / "predict.py"), bird, "--checkpoint", str(ckpt)),
                'python -c "import torch" (the floor)': ("code", "import torch")}
        runs = {name: [run_measured(*cmd) for _ in range(max(3, args.repeats // 2))]
                for name, cmd in cmds.items()}
        base_s = statistics.median(r[0] for r in next(iter(runs.values())))
        base_mb = max(r[1] for r in next(iter(runs.values())))
        out["predict"] = []
        for name, rs in runs.items():
            seconds, mb = statistics.median(r[0] for r in rs), max(r[1] for r in rs)
            print(f"  {name:<44} {seconds:6.2f} s ({seconds / base_s:4.2f}x time)  peak RSS "
                  f"{mb:7.0f} MiB ({mb / base_mb:4.2f}x)")
            out["predict"].append({"name": name, "seconds": seconds, "peak_rss_mib": mb,
                                   "time_ratio": seconds / base_s, "rss_ratio": mb / base_mb})
        predict_s, torch_s = (out["predict"][i]["seconds"] for i in (1, 2))
        out["predict_minus_import_torch_s"] = predict_s - torch_s
        print(f"  predict.py takes {predict_s - torch_s:.2f} s more than importing torch "
              f"({predict_s / torch_s:.2f}x)")

        # Converting a released-style mmcls file of resnext101_32x8d (legacy serialization).
        release = Path(tmp) / "resnext101_32x8d_mmcls.pth"
        big = resnext.resnext101_32x8d().state_dict()
        torch.save({"meta": {"CLASSES": resnext.imagenet_class_names()},
                    "state_dict": {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v
                                   for k, v in big.items()}},
                   release, _use_new_zipfile_serialization=False)
        del big, model
        size_mb = release.stat().st_size / 2**20
        out["convert_101_32x8d"] = []
        base = None
        for name, script in (("torchvision + torch.load + rename (reference)", TORCHVISION_CONVERT),
                             ("resnext get_model(pretrained=FILE)", OURS_CONVERT)):
            seconds, mb, _ = run_measured("code", script, str(release))
            base = base or (seconds, mb)
            print(f"  {name:<44} {seconds:6.2f} s ({seconds / base[0]:4.2f}x time)  peak RSS "
                  f"{mb:7.0f} MiB ({mb / base[1]:4.2f}x)  [file {size_mb:.0f} MiB]")
            out["convert_101_32x8d"].append({"name": name, "seconds": seconds,
                                             "peak_rss_mib": mb, "file_mib": size_mb,
                                             "time_ratio": seconds / base[0],
                                             "rss_ratio": mb / base[1]})
    return out


# --- 5. end to end: train.py on JPEG files --------------------------------------------------

def make_jpeg_folder(data: Path, root: Path, count: int, short_side: int) -> Path:
    """An ImageNet-like folder from real photos: train/<class>/ holds `count` JPEGs (the
    hymenoptera train photos resized to `short_side`, ImageNet's typical size, quality 90,
    then hard-linked under new names), val/<class>/ the val photos, resized alike."""
    from PIL import Image
    for split in ("train", "val"):
        sources = []
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for path in list_images(data_folder(data, "hymenoptera_data") / split / cls):
                image = load_image(path)
                scale = short_side / min(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)),
                                     Image.Resampling.BILINEAR)
                target = root / split / cls / f"{path.stem}.JPEG"
                image.save(target, quality=90)
                sources.append(target)
        if split == "train":
            for i in range(count - len(sources)):
                source = sources[i % len(sources)]
                os.link(source, source.with_name(f"{source.stem}_{i}.JPEG"))
    return root


def loader_images_per_s(root: Path, batch: int, workers: int, img_size: int,
                        batches: int, uint8: bool = True) -> float:
    """train.py's data loader alone (FastTrainTransform, per-sample seeds, pinned memory on
    CUDA): uint8 batches as train.py --fast-decode has them (normalised later on the
    device), or uint8=False: float32 batches normalised in the workers."""
    from torch.utils.data import DataLoader, RandomSampler
    dataset = ClassFolderDataset(root / "train", FastTrainTransform(img_size, normalize=not uint8),
                                 loader=str)
    sampler = EpochTaggedSampler(RandomSampler(dataset))
    loader = DataLoader(SeededAugmentation(dataset, 0), batch_size=batch, sampler=sampler,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(min(5, batches)):  # workers start, first batches in flight
        next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            it = iter(loader)
            images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def evaluate_rows(root: Path, batch: int, workers: int, device: torch.device, amp,
                  repeats: int) -> list[dict]:
    """evaluate.py's pipeline over the e2e training folder repeated `repeats` times (5 x
    10,000 = 50,000 JPEGs on GPU, ImageNet's validation size): its dataset (the
    pixel-identical eval transform, uint8 crops), its loader (resnext.evaluation.build_loader: in
    order, pinned memory on CUDA) and resnext.evaluation.evaluate() with the --amp auto fast path
    (eager, random weights). Each figure is one whole pass in a fresh loader, as evaluate.py
    runs it: worker start and the last partial batch included; cuDNN autotuning is done
    before, on two batches. The reference is torchvision's model, fp32 NCHW, on a random
    batch already on the device (model throughput only).

    Returns:
        rows (printed as measured): the reference, evaluate() and the loader alone.
    """
    from torch.utils.data import ConcatDataset
    from resnext.evaluation import build_loader, evaluate
    from resnext.inference import InferenceModel
    net = fast_inference_model(resnext.resnext50_32x4d().eval().to(device), device, False)
    model = InferenceModel(net, device, amp=amp, arch_name="resnext50_32x4d")
    folder = ClassFolderDataset(root / "train", model.preprocessing.transform(normalize=False))
    dataset = ConcatDataset([folder] * repeats)
    cuda = device.type == "cuda"

    def new_loader():
        return build_loader(dataset, batch, workers, 0, 1, pin_memory=cuda)

    reference = torchvision.models.resnext50_32x4d().eval().to(device)
    x = torch.rand(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        reference_rate = batch / median_time(lambda: reference(x), device, 2, 5)
    del reference, x
    out = [row("torchvision fp32 NCHW inference (reference)", reference_rate, reference_rate)]
    warm = iter(new_loader())
    with torch.inference_mode():
        for _ in range(2):
            model(next(warm)[0])
    del warm
    start = time.perf_counter()
    evaluate(model, new_loader())
    sync(device)
    seconds = time.perf_counter() - start
    out.append(row("evaluate.py pipeline (evaluate())", len(dataset) / seconds, reference_rate))
    start = time.perf_counter()
    for _ in new_loader():
        pass
    seconds = time.perf_counter() - start
    out.append(row("evaluate.py data loader alone (uint8 crops)", len(dataset) / seconds,
                   reference_rate))
    return out


def run_train_py(root: Path, work: Path, device: torch.device, batch: int, workers: int,
                 img_size: int, epochs: int, compile_mode: str | None, timeout: float) -> float:
    """Steady-state images/s of `python train.py` from its log: the median of the interval
    records after the first epoch (start-up, compilation and cuDNN autotuning excluded);
    NaN when it ran past `timeout` seconds. compile_mode None: eager; else --compile with
    that torch.compile mode."""
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(root), "--device",
           str(device), "--batch-size", str(batch), "--workers", str(workers), "--img-size",
           str(img_size), "--epochs", str(epochs), "--val-interval", str(epochs),
           "--log-interval", "10", "--amp", "auto", "--fast-decode", "--work-dir", str(work)]
    if compile_mode is not None:
        cmd += ["--compile", "--compile-mode", compile_mode]
    # Its own process group, so that a timeout also ends its loader workers.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        print(f"  train.py ran past {timeout:g} s (--e2e-timeout); figure from the intervals "
              f"it logged after epoch 1, if any", flush=True)
    else:
        if proc.returncode != 0:
            raise RuntimeError(f"train.py failed:\n{err[-3000:]}")
    log = work / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steady = [r["images_per_s"] for r in records if r["type"] == "train" and r["epoch"] > 1]
    return statistics.median(steady) if steady else float("nan")


def bench_e2e(args, device, save=lambda partial: None) -> dict:
    """train.py end to end at 32 and 256 per process (GPU) beside the pure train steps.

    Each figure is printed and handed to `save` as soon as it is measured, so a run cut
    short (a lent GPU's time limit) keeps what it had."""
    cuda = device.type == "cuda"
    # 256 first: the headline goal, if a lent machine's time runs out.
    batches = args.e2e_batches or ([256, 32] if cuda else [8, 16])
    img_size = 224 if cuda else 64
    count = args.e2e_images or (10_000 if cuda else 256)
    workers = args.e2e_workers or resnext.runtime.default_workers()
    amp = resolve_amp("auto", device)
    out = {"images": count, "img_size": img_size, "workers": workers, "rows": [],
           "measured": [], "errors": []}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"End to end: train.py on {count} JPEGs (short side 375), {img_size} px crops, "
              f"{workers} workers, --amp auto ({amp_name(amp)}) --fast-decode; ratios vs the "
              f"pure torchvision fp32 NCHW step at the same batch")
        root = make_jpeg_folder(args.data, Path(tmp) / "data", count, 375)
        for batch in batches:
            print(f" batch {batch} per process")
            steps = train_steps(args, device, batch, amp) if cuda else []
            base = steps[0]["images_per_s"] if steps else None
            out["rows"] += steps
            save(out)

            def measured(name: str, images_per_s: float) -> tuple[str, float]:
                # Kept at once; listed again with ratios when the batch is done.
                print(f"  ({name}: {images_per_s:.1f} img/s)", flush=True)
                out["measured"].append({"batch": batch, "name": name,
                                        "images_per_s": images_per_s})
                save(out)
                return name, images_per_s

            rows = [measured("data loader alone (uint8 batches)",
                             loader_images_per_s(root, batch, workers, img_size,
                                                 batches=max(20, 2000 // batch)))]
            for mode in [None] + (args.e2e_compile_modes if args.compile else []):
                name = "train.py" + ({None: "", "default": " --compile"}.get(
                    mode, f" --compile --compile-mode {mode}"))
                work = Path(tmp) / f"work_{batch}_{mode}"
                try:
                    images_per_s = run_train_py(root, work, device, batch, workers, img_size,
                                                args.e2e_epochs, mode, args.e2e_timeout)
                except RuntimeError as error:  # keep going: the other runs still measure
                    print(f"  {name} failed, no figure:\n{error}", flush=True)
                    out["errors"].append({"batch": batch, "name": name, "error": str(error)})
                    images_per_s = float("nan")
                rows.append(measured(name, images_per_s))
            base = base or rows[1][1]  # CPU smoke run: no step reference, ratios vs eager
            for name, images_per_s in rows:
                out["rows"].append({"batch": batch, **row(name, images_per_s, base)})
            save(out)
            if batch == batches[0]:  # evaluate.py at the goal's batch (256 on GPU)
                repeats = 5 if cuda else 1
                print(f" evaluate.py at batch {batch}, {repeats * count} JPEGs (eval transform, "
                      f"224 px), --amp auto, eager; ratios vs the pure torchvision fp32 NCHW "
                      f"inference at the same batch")
                out["evaluate"] = [{"batch": batch, **r} for r in evaluate_rows(
                    root, batch, workers, device, amp, repeats)]
                save(out)
    return out


# --- 6. deployment files: exported program, TorchScript, ONNX Runtime, int8 ---------------------

CALIBRATION_PHOTOS = 32  # int8 calibration photos, spread over the train listing
CHECK_PHOTOS = 16        # photos of the file-vs-eager check, spread over the val listing


def export_models(args) -> tuple:
    """(ours, reference, source, preprocessing): our eval-mode model to export (--checkpoint's,
    else random weights with randomised BN statistics: decisive logits for the check),
    torchvision's resnext50_32x4d holding the same weights (the speed reference; random for
    another architecture), where the weights came from, and the preprocessing
    (--export-img-size overrides the crop)."""
    if args.checkpoint:
        ours, source = resnext.get_model(pretrained=args.checkpoint), args.checkpoint
    else:
        ours, source = resnext.resnext50_32x4d(), "random weights, randomised BN statistics"
        randomize(ours, seed=0)
    ours.eval()
    reference = torchvision.models.resnext50_32x4d(num_classes=ours.num_classes).eval()
    if ours.arch_name == "resnext50_32x4d":  # the same parameter names and shapes
        reference.load_state_dict(ours.state_dict())
    pre = ours.preprocessing or Preprocessing()
    if args.export_img_size and args.export_img_size != pre.crop_size:
        pre = Preprocessing(args.export_img_size)
    return ours, reference, source, pre


def artifact_meta(model, fmt: str, pre: Preprocessing, source, **extra) -> dict:
    """export_meta's dict (dynamic batch) with `pre` as its preprocessing and input shape."""
    meta = export_meta(model, fmt, dynamic_batch=True, source=source, **extra)
    meta["preprocessing"] = pre.to_dict()
    meta["input"]["shape"][2:] = [pre.crop_size, pre.crop_size]
    return meta


def write_artifacts(ours, pre: Preprocessing, source, calibration: list, folder: Path) -> list:
    """Each deployment file written into `folder` and loaded back with load_artifact, as a
    deployment would. Returns one dict per format: name, run (None when skipped), file_mib,
    export_s, skipped (why, else None)."""
    def onnx(path):
        require_onnx()  # before the export: a missing package skips the row
        export_onnx(ours, path, artifact_meta(ours, "onnx", pre, source), dynamic_batch=True)

    def int8(path):
        batches = (load_images(calibration[i:i + 16], pre)
                   for i in range(0, len(calibration), 16))
        quantization = dict(int8_recipe(), calibration_images=len(calibration))
        export_torchscript(quantize_int8(ours, batches), path,
                           artifact_meta(ours, "torchscript", pre, source,
                                         quantization=quantization))

    jobs = [("exported program (torch.export, dynamic batch)", "rx.pt2",
             lambda path: export_program(ours, path, artifact_meta(
                 ours, "exported-program", pre, source), dynamic_batch=True)),
            ("TorchScript (trace + freeze)", "rx.torchscript.pt",
             lambda path: export_torchscript(ours, path, artifact_meta(
                 ours, "torchscript", pre, source))),
            ("ONNX Runtime (opset 17, CPU provider)", "rx.onnx", onnx),
            (f"int8 TorchScript (FX static x86, fp32 head, {len(calibration)} photos)",
             "rx.int8.torchscript.pt", int8)]
    out = []
    for name, file, write in jobs:
        path, start = folder / file, time.perf_counter()
        try:
            write(path)
        except MissingDependencyError:
            out.append({"name": name, "run": None, "skipped": f"skipped: {ONNX_INSTALL}"})
        except ConfigError as error:  # e.g. a torch without the x86 quantized engine
            out.append({"name": name, "run": None, "skipped": f"skipped: {error}"})
        else:
            seconds = time.perf_counter() - start
            run, _ = load_artifact(path)
            out.append({"name": name, "run": run, "file_mib": path.stat().st_size / 2**20,
                        "export_s": seconds, "skipped": None})
            print(f"  wrote {name}: {out[-1]['file_mib']:.1f} MiB in {seconds:.1f} s",
                  flush=True)
    return out


def check_artifacts(ours, artifacts: list, photos: torch.Tensor) -> list[dict]:
    """Each loaded file against the eager model on real photos, at batch 1 and 16
    (resnext.export.compare): a speed row never hides a wrong file."""
    sizes = tuple(sorted({1, min(16, len(photos))}))
    out = []
    for a in artifacts:
        if a["run"] is not None:
            c = compare(ours, a["run"], photos, batch_sizes=sizes)
            print(f"  check {a['name']}: {c}", flush=True)
            out.append({"name": a["name"], "images": c.images, "top1_agree": c.top1_agree,
                        "max_abs_diff": c.max_abs_diff, "mean_abs_diff": c.mean_abs_diff,
                        "relative_diff": c.relative_diff, "max_prob_diff": c.max_prob_diff,
                        "flipped_margins": list(c.flipped_margins)})
    return out


def time_artifacts(args, ours, reference, artifacts: list, crop: int) -> list[dict]:
    """Images/s of torchvision's eager model (reference), ours eager and each loaded file,
    interleaved at each --export-batch-sizes size on the same random batch."""
    variants = [("torchvision fp32 NCHW eager (reference)", reference),
                ("resnext fp32 NCHW eager (the exported model)", ours)]
    variants += [(a["name"], a["run"]) for a in artifacts if a["run"] is not None]
    results = []
    for batch in args.export_batch_sizes:
        print(f" batch {batch}")
        x = torch.rand(batch, 3, crop, crop)

        def step(fn, x=x):
            with torch.inference_mode():
                fn(x)

        # TorchScript's profiling executor optimises the graph on its first calls.
        seconds = interleaved_medians([lambda fn=fn: step(fn) for _, fn in variants],
                                      torch.device("cpu"), max(2, args.warmup), args.repeats)
        base = batch / seconds[0]
        for (name, _), s in zip(variants, seconds):
            results.append({"batch": batch, **row(name, batch / s, base)})
        for a in artifacts:
            if a["run"] is None:
                print(f"  {a['name']:<52} {a['skipped']}")
                results.append({"batch": batch, "name": a["name"], "skipped": a["skipped"]})
    return results


def bench_export(args, device) -> dict:
    """Deployment files (resnext.export), each loaded back with load_artifact, against
    torchvision's fp32 NCHW eager model with the same weights, on CPU (where load_artifact
    runs them); int8 calibrated on --data's hymenoptera train photos."""
    if device.type != "cpu":
        print(f"Export: the files run on CPU (load_artifact), not on {device}")
    ours, reference, source, pre = export_models(args)
    root = data_folder(args.data, "hymenoptera_data")
    calibration = spread_evenly(list_images(root / "train"), CALIBRATION_PHOTOS)
    check = spread_evenly(list_images(root / "val"), CHECK_PHOTOS)
    crop, shown = pre.crop_size, os.path.relpath(root, Path.cwd())
    print(f"Deployment files, {ours.arch_name}, {crop}x{crop}, CPU "
          f"({torch.get_num_threads()} threads), loaded back with load_artifact, images/s "
          f"(ratio vs torchvision fp32 NCHW eager, same weights); {source}; int8 calibrated "
          f"on {len(calibration)} photos of {shown}/train, checked on {len(check)} of "
          f"{shown}/val")
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_artifacts(ours, pre, args.checkpoint, calibration, Path(tmp))
        checks = check_artifacts(ours, artifacts, load_images(check, pre))
        results = time_artifacts(args, ours, reference, artifacts, crop)
    files = [{k: v for k, v in a.items() if k != "run"} for a in artifacts]
    return {"img_size": crop, "weights": source, "calibration_images": len(calibration),
            "files": files, "checks": checks, "results": results}


def without_nan(value):
    """A missing figure (NaN) as JSON null: NaN is not JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def main() -> None:
    args = get_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench.py: error: --device {args.device}: this torch sees no CUDA GPU "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    hymenoptera = data_folder(args.data, "hymenoptera_data")
    if set(args.sections) != {"train"} and not hymenoptera.is_dir():
        sys.exit(f"bench.py: error: --data {args.data}: no hymenoptera_data (or hymenoptera) "
                 f"folder there (the photos come from shared/data or the repository's "
                 f"tests/data)")
    torch.backends.cudnn.benchmark = True  # as train.py and evaluate.py run, for all variants
    if args.quick:
        args.batch_sizes = args.batch_sizes[:2]
    info = header(device)
    print(json.dumps(info))
    # Paths as seen from the repository, so the record names no machine's folders.
    shown = {k: os.path.relpath(v, REPO) if isinstance(v, Path) or k == "json" else str(v)
             for k, v in vars(args).items()}
    results = {"header": info, "args": shown}

    def save(section: str, partial) -> None:  # after every section: a cut-short run keeps it
        results[section] = partial
        tmp = Path(f"{args.json}.tmp")
        tmp.write_text(json.dumps(without_nan(results), indent=1) + "\n")
        os.replace(tmp, args.json)

    if "inference" in args.sections:
        save("inference", bench_inference(args, device))
    if "train" in args.sections:
        save("train", bench_train(args, device))
    if "pipeline" in args.sections:
        save("pipeline", bench_pipeline(args))
    if "coldstart" in args.sections:
        save("coldstart", bench_coldstart(args))
    if "e2e" in args.sections:
        save("e2e", bench_e2e(args, device, save=lambda partial: save("e2e", partial)))
    if "export" in args.sections:
        save("export", bench_export(args, device))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
