"""Evaluation shared by evaluate.py, train.py's validation and the benchmark: top-1/top-k
(and on request the confusion matrix) over a loader, exact under torchrun (every image counted
once, counts all-reduced)."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .classes import imagenet_wnids
from .datasets import UnpaddedDistributedSampler
from .errors import ResNeXtWarning
from .images import pixel_limit_worker_init
from .inference import InferenceModel
from .runtime import fit_loader_to_shared_memory

__all__ = ["evaluate", "count_topk", "topk_for", "format_accuracy", "build_loader",
           "describe_mapping"]


def count_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Hits at 1 and at k for a batch, on the logits' device (no host synchronisation).

    Args:
        logits: (N, C) scores; labels: (N,) int64; k: <= C.
    Returns:
        (2,) float64 tensor [correct@1, correct@k].
    """
    return _count_hits(logits.topk(k, dim=1).indices, labels)


def _count_hits(top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, k) int64 top-k class indices and (N,) labels -> (2,) float64 [correct@1, @k]."""
    hits = top == labels[:, None]  # (N, k)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


def _count_confusion(confusion: torch.Tensor, labels: torch.Tensor,
                     pred: torch.Tensor) -> None:
    """Add a batch to a (C, C) int64 confusion matrix in place, on its device.

    Args:
        confusion: (C, C) int64, rows the true class, columns the predicted one.
        labels, pred: (N,) int64 true and top-1 predicted classes, in 0..C-1.
    """
    c = confusion.shape[0]
    # The counts of torch.bincount(labels * C + pred, minlength=C*C), without the two reads
    # back to the host (its min and max) that CUDA's bincount makes every batch.
    confusion.view(-1).index_add_(0, labels * c + pred, torch.ones_like(pred))


def topk_for(num_classes: int) -> int:
    """The k of "top-5": 5, or the number of classes when there are fewer (where top-5 would
    always read 100%)."""
    return min(5, num_classes)


@torch.inference_mode()
def evaluate(model: InferenceModel, loader: DataLoader, progress: bool = False,
             return_predictions: bool = False, confusion: bool = False) -> dict:
    """Top-1/top-k of `model` over `loader`, summed across processes when distributed.

    The loader must visit every image once over all ranks (UnpaddedDistributedSampler): the
    counts (and the confusion matrix) are all-reduced, so the result equals a single-process
    run.

    Args:
        model: an InferenceModel (converts its input, runs autocast); put in eval mode.
        loader: yields ((N, 3, H, W) uint8 crops or float normalised images, (N,) int64
            labels).
        progress: show a tqdm bar (rank 0).
        return_predictions: also gather per-image results to every rank.
        confusion: also count the confusion matrix of the top-1 predictions, on the device
            (no host synchronisation per batch), for resnext.report.
    Returns:
        {'top1': %, 'top5': % (key 'top{k}' with k = min(5, classes)), 'k': k,
        'num_images': int, 'loss': mean cross-entropy} plus 'predictions' (sorted by dataset
        index: index, label, pred_label, pred_score, topk) if asked, and with `confusion`
        'confusion': a (C, C) int64 CPU tensor of image counts, C = model.num_classes, row
        the true class, column the predicted one (its trace is correct@1).
    Raises:
        ValueError: `confusion` for a model without a classifier (num_classes unknown).
    """
    model.eval()
    device = model.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@k, n, loss
    if confusion and not model.num_classes:
        raise ValueError("a confusion matrix needs a model with a classifier (num_classes)")
    c = model.num_classes if confusion else 0
    matrix = torch.zeros(c, c, dtype=torch.int64, device=device)  # (C, C), true x predicted
    indices = list(loader.sampler) if return_predictions else None
    predictions = []
    seen = 0
    k = 1
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        k = topk_for(logits.shape[1])
        ranked = logits.topk(k, dim=1).indices  # (N, k); column 0 is the top-1 prediction
        sums[:2] += _count_hits(ranked, labels)
        if confusion:
            _count_confusion(matrix, labels, ranked[:, 0])
        sums[2] += labels.numel()
        sums[3] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        if return_predictions:  # one copy to the host per batch, not one per value
            # The same ranking as the counts above, so pred_label agrees with top-1 and the
            # confusion matrix even where two scores tie.
            scores = logits.float().softmax(dim=1).gather(1, ranked[:, :1])[:, 0]  # (N,)
            for j, (label, score, pred) in enumerate(zip(labels.tolist(), scores.tolist(),
                                                         ranked.tolist())):
                predictions.append({"index": indices[seen + j], "label": label,
                                    "pred_label": pred[0], "pred_score": score, "topk": pred})
        seen += labels.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        if confusion:
            dist.all_reduce(matrix)
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
    if confusion:
        result["confusion"] = matrix.cpu()
    return result


def format_accuracy(result: dict) -> str:
    """mmpretrain's 'accuracy/top1: 77.9000  accuracy/top5: 93.6600' line (top-k with fewer
    than 5 classes)."""
    k = result["k"]
    text = f"accuracy/top1: {result['top1']:.4f}"
    return text + (f"  accuracy/top{k}: {result[f'top{k}']:.4f}" if k > 1 else "")


def build_loader(dataset, batch_size: int, workers: int, rank: int, world_size: int,
                 pin_memory: bool = False, sample_bytes: int | None = None) -> DataLoader:
    """Validation loader: in order, unpadded shards under torchrun; workers persist across
    calls (train.py validates every epoch) and keep the pixel limit.

    Args:
        dataset: yields (crop, label).
        batch_size: images per process; workers: loader processes (0: the main process).
        rank, world_size: this process's shard.
        pin_memory: pinned host memory (CUDA).
        sample_bytes: bytes of one crop as the workers send it (3 * crop**2 for uint8
            crops): when given, fewer workers are used if /dev/shm cannot hold their batches
            (runtime.fit_loader_to_shared_memory), with a ResNeXtWarning that says so.
    """
    sampler = UnpaddedDistributedSampler(len(dataset), world_size, rank)
    prefetch = 2  # DataLoader's default
    if sample_bytes is not None:
        workers, prefetch, note = fit_loader_to_shared_memory(workers, prefetch,
                                                              batch_size * sample_bytes)
        if note:
            warnings.warn(note, ResNeXtWarning, stacklevel=2)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers > 0 else None,
                      worker_init_fn=pixel_limit_worker_init())


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
