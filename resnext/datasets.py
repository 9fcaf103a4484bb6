"""Datasets for the two layouts people have (class folders, mmpretrain annotation files), the
label mapping for a given model, the unpadded evaluation sampler, and per-sample seeding for
training (augmentation drawn from (seed, epoch, index), whatever the worker count)."""
from __future__ import annotations

import os
import random
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .classes import imagenet_wnids
from .errors import DatasetError, ImageReadError
from .images import _class_folders, list_class_folders, load_image

__all__ = ["ClassFolderDataset", "AnnotationFileDataset", "UnpaddedDistributedSampler",
           "folder_class_mapping", "build_dataset", "SeededAugmentation", "EpochTaggedSampler",
           "sample_seed", "BalancedDistributedSampler", "RepeatedAugmentationSampler"]


class _LabelledImages(Dataset):
    """(transform(loader(path)), label) for each of `samples`, a list of (path, label)."""

    samples: list[tuple[str, int]]
    loader: Callable
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = self.loader(path)
        if self.transform is None:
            return image, label
        try:
            return self.transform(image), label
        except ImageReadError as e:  # e.g. EvalTransform's resize bound: name the file
            raise ImageReadError(f"{path}: {e}") from None


class ClassFolderDataset(_LabelledImages):
    """`root/<class>/<image>` layout (torchvision ImageFolder's) with a chosen label mapping.

    Folders and images are found by list_class_folders (links followed, hidden entries
    skipped, every Pillow extension); samples are ordered as ImageFolder orders them (class
    name, then path). Empty classes are allowed: evaluation counts what is there, and
    training can check `empty_classes`.

    Args:
        root: folder whose sub-folders are classes.
        transform: applied to the RGB PIL image (see eval_transform / train_transform).
        class_to_idx: folder name -> label; default the sorted folder order. Folders not in
            the mapping are ignored; mapped classes without a folder are empty.
        loader: path -> image (default load_image); FastTrainTransform-style pipelines pass
            `str` here and do the decoding in `transform`.
    Attributes:
        classes: class names in label order. class_to_idx: name -> label.
        samples (alias imgs): [(path str, label), ...]. targets: the labels.
        empty_classes: mapped class names with no image. skipped: Counter of skipped entries
            by reason (see list_images).
    Items are (transform(loader(path)), label).
    Raises:
        FileNotFoundError, NotADirectoryError: root is not a folder.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, loader: Callable = load_image):
        self.root = str(root)
        self.transform = transform
        self.loader = loader
        self.skipped: Counter = Counter()
        images = list_class_folders(root, self.skipped)
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(images)}
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.samples = [(str(path), self.class_to_idx[name])
                        for name in sorted(self.class_to_idx) for path in images.get(name, [])]
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]
        self.empty_classes = [name for name in self.classes if not images.get(name)]


class AnnotationFileDataset(_LabelledImages):
    """mmpretrain's annotation-file layout: lines `relative/path label`, paths under root.

    Args:
        root: folder the paths are relative to (mmpretrain's data_prefix).
        ann_file: text file, one `path label` per line (e.g. meta/val.txt of ImageNet).
        transform: applied to the RGB PIL image.
        classes: optional class names (len must exceed every label).
        loader: path -> image, as for ClassFolderDataset.
    Raises:
        DatasetError (a ValueError): naming the file and line, for a malformed line, a
            negative label or a path that leaves root.
        FileNotFoundError: ann_file does not exist.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Callable | None = None, classes: Sequence[str] | None = None,
                 loader: Callable = load_image):
        self.root = Path(root)
        self.transform = transform
        self.loader = loader
        self.samples: list[tuple[str, int]] = []
        self.line_numbers: list[int] = []  # of each sample in ann_file, for messages
        with open(ann_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().rsplit(maxsplit=1)
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise DatasetError(f"{ann_file}:{lineno}: expected 'relative/path label', "
                                       f"got {line.strip()!r}")
                rel, label = parts[0], int(parts[1])
                path = self.root / rel
                # Lexically inside root: '..' may not leave it, but links inside it are the
                # user's own and are followed (as list_images does).
                inside = not os.path.normpath(rel).startswith(("..", os.sep))
                if label < 0 or not inside:
                    raise DatasetError(f"{ann_file}:{lineno}: label must be >= 0 and the path "
                                       f"inside {self.root}, got {line.strip()!r}")
                self.samples.append((str(path), label))
                self.line_numbers.append(lineno)
        if not self.samples:
            raise DatasetError(f"{ann_file}: no annotations")
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes) if classes is not None else None


class UnpaddedDistributedSampler(Sampler[int]):
    """Shards indices 0..N-1 over ranks without padding (rank r gets r, r+W, r+2W, ...), so
    every image is evaluated exactly once; shard sizes may differ by one."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


_LAYOUT_HELP = (
    "Expected either (a) class folders, root/<class>/<image> (ImageNet val sorted into wnid "
    "folders such as root/n01440764/ILSVRC2012_val_00000293.JPEG, or any ImageFolder), or "
    "(b) mmpretrain's layout: a folder of images plus an annotation file of "
    "'relative/path label' lines (e.g. --ann-file meta/val.txt), paths relative to the folder.")


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def folder_class_mapping(root: str | os.PathLike, class_names: Sequence[str] | None = None,
                         num_classes: int | None = None) -> dict[str, int]:
    """Label of each class folder under `root`, for evaluating a given model.

    In order: folders that are all among the model's class names get those names' indices
    (whatever their sort order: a model from train.py; names compared in Unicode NFC, so
    macOS's decomposed folder names match); ImageNet wnid folders (n01440764, ...)
    get their ImageNet-1k index, for a 1000-class model (a subset of the 1000 folders keeps the
    released indices); a model without class names gets the sorted folder order (ImageFolder).

    Args:
        root: folder holding one sub-folder per class.
        class_names: the model's class names, if known.
        num_classes: the model's number of outputs, if known.
    Returns:
        folder name -> label.
    Raises:
        DatasetError (a ValueError): no class folders (a flat folder: the message explains
            both layouts), or folders that match neither the class names nor the wnids
            (listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder. {_LAYOUT_HELP}")
    folders = list(_class_folders(root))  # sorted; the folders ClassFolderDataset reads
    if not folders:
        raise DatasetError(f"{root}: no class folders found (a flat folder of images needs an "
                           f"annotation file). {_LAYOUT_HELP}")
    if class_names is not None:
        # macOS writes folder names decomposed (NFD, 'cafe' + U+0301) and checkpoints hold
        # them composed (NFC): compare the normalised forms.
        index = {_nfc(name): i for i, name in reversed(list(enumerate(class_names)))}
        if all(_nfc(f) in index for f in folders):
            return {f: index[_nfc(f)] for f in folders}
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    n = len(class_names) if class_names is not None else num_classes
    if all(f in wnid_index for f in folders) and n in (None, 1000):
        return {f: wnid_index[f] for f in folders}
    if class_names is None:
        if num_classes is not None and len(folders) > num_classes:
            raise DatasetError(f"{root}: {len(folders)} class folders but the model has only "
                               f"{num_classes} classes")
        return {f: i for i, f in enumerate(folders)}
    preview = ", ".join(map(repr, list(class_names)[:5]))
    preview += ", ..." if len(class_names) > 5 else ""
    known = {_nfc(name) for name in class_names}
    unknown = [f for f in folders if _nfc(f) not in known and f not in wnid_index]
    if not unknown:  # ImageNet wnid folders, but the model is not a 1000-class one
        missing = [f for f in folders if _nfc(f) not in known]
        raise DatasetError(f"{root}: class folders {missing} are ImageNet-1k wnids, but the model "
                           f"has {len(class_names)} classes ({preview}), not ImageNet's 1000")
    raise DatasetError(f"{root}: class folders {unknown} match neither the model's "
                       f"{len(class_names)} class names ({preview}) nor ImageNet-1k wnids")


def build_dataset(root: str | os.PathLike, ann_file: str | os.PathLike | None = None,
                  transform: Callable | None = None, class_names: Sequence[str] | None = None,
                  num_classes: int | None = None, loader: Callable = load_image) -> Dataset:
    """The dataset for a folder, in either supported layout (see folder_class_mapping).

    Args:
        root: the class-folder root, or with ann_file the folder the annotation paths are
            relative to.
        ann_file: mmpretrain annotation file ('relative/path label' lines), or None.
        transform: applied to each RGB PIL image.
        class_names, num_classes: the model's, to map folders to its labels.
        loader: path -> image (default load_image; `str` for FastTrainTransform).
    Returns:
        A dataset of (tensor, label) with `samples` [(path, label), ...].
    Raises:
        DatasetError (a ValueError): see folder_class_mapping and AnnotationFileDataset; an
            annotation label at or above the model's class count (file, line, label, count).
    """
    if ann_file is not None:
        dataset = AnnotationFileDataset(root, ann_file, transform, classes=class_names,
                                        loader=loader)
        n = len(class_names) if class_names is not None else num_classes
        for (path, label), lineno in zip(dataset.samples, dataset.line_numbers):
            if n is not None and label >= n:
                raise DatasetError(f"{ann_file}:{lineno}: label {label} is not one of the "
                                   f"model's {n} classes (0..{n - 1}), for {path}")
        return dataset
    mapping = folder_class_mapping(root, class_names, num_classes)
    return ClassFolderDataset(root, transform, class_to_idx=mapping, loader=loader)


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The seed of one training sample's augmentation.

    Args:
        seed: the run's --seed; epoch: 0-based epoch; index: the sample's dataset index;
        repeat: which copy of the sample under repeated augmentation (0: the only one).
    Returns:
        A fixed mix in [0, 2**63), distinct for distinct (epoch, index, repeat) of any
        realistic run (index < 2**31); repeat 0 gives the plain (epoch, index) seed.
    """
    mixed = (seed * 1_000_003 + epoch) * 2_147_483_647 + index & (2**63 - 1)
    return mixed ^ (repeat * 0x9E3779B97F4A7C15 & (2**63 - 1))


class SeededAugmentation(Dataset):
    """Training samples whose random augmentation depends only on (seed, epoch, index).

    Indexed by (epoch, index) pairs (from EpochTaggedSampler): torch's and Python's RNGs
    are seeded with sample_seed(seed, epoch, index) before the sample is loaded, so the crop
    and flip of every image are the same whichever worker process draws it, however many
    workers there are, and after a resume; loader workers can therefore live across epochs.

    Args:
        dataset: a map-style dataset whose transform draws from torch's (or Python's) RNG.
        seed: the run's --seed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int | tuple[int, int]]):
        epoch, index = key
        index, repeat = index if isinstance(index, tuple) else (index, 0)
        seed = sample_seed(self.seed, epoch, index, repeat)
        torch.manual_seed(seed)
        random.seed(seed)
        return self.dataset[index]


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler (DistributedSampler) to yield (epoch, index) pairs for
    SeededAugmentation; set_epoch reaches the wrapped sampler too."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class BalancedDistributedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, sharded across ranks: each draw picks a
    class uniformly (sample weight 1 / its class's count), then one of its images.

    Each epoch draws `num_samples` indices (the dataset size, rounded up to a multiple of the
    ranks) from a generator seeded by (seed, epoch), the same on every rank; rank r takes
    draws r, r + W, r + 2W, ...: the shards are disjoint parts of one draw, as
    DistributedSampler's are of one permutation.

    Args:
        targets: the label of every sample (dataset.targets).
        num_replicas, rank: the process group's size and this rank.
        seed: the run's --seed.
    Raises:
        DatasetError (a ValueError): no samples.
    """

    def __init__(self, targets: Sequence[int], num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        if not targets:
            raise DatasetError("class-balanced sampling needs at least one training image")
        labels = torch.as_tensor(list(targets))
        counts = torch.bincount(labels).double()
        self.weights = (1.0 / counts)[labels]  # (N,) float64
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.per_rank = -(-len(labels) // num_replicas)  # ceil

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
        drawn = torch.multinomial(self.weights, self.per_rank * self.num_replicas,
                                  replacement=True, generator=generator)
        return iter(drawn[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank


class RepeatedAugmentationSampler(Sampler[tuple[int, int]]):
    """Repeated augmentation (Hoffer et al. 2020; torchvision references' RASampler): each
    epoch's shuffled indices are repeated `repetitions` times in a row, then sharded across
    ranks, so the copies of one image land on different ranks with different augmentations.

    Yields (index, repeat) pairs, which SeededAugmentation seeds apart. An epoch keeps the
    plain length, ceil(N / ranks) draws per rank; torchvision's sampler also rounds the epoch
    down to a multiple of 256 images, which only matters for sets of a few hundred images.

    Args:
        dataset_len: N; num_replicas, rank: the process group's size and this rank;
        seed: the run's --seed; repetitions: copies of each image (4 in torchvision's V2
        recipe).
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 repetitions: int = 4):
        self.n, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.seed, self.repetitions, self.epoch = seed, repetitions, 0
        self.per_rank = -(-dataset_len // num_replicas)  # ceil

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # as torchvision's
        order = torch.randperm(self.n, generator=generator).tolist()
        repeated = [(i, r) for i in order for r in range(self.repetitions)]
        total = -(-len(repeated) // self.num_replicas) * self.num_replicas
        repeated += repeated[:total - len(repeated)]  # pad so that every rank gets as many
        return iter(repeated[self.rank:total:self.num_replicas][:self.per_rank])

    def __len__(self) -> int:
        return self.per_rank
