"""The ImageNet-1k class table: WordNet ids and short names in the released classifiers'
output order (the sorted wnid order), read from imagenet1k.tsv beside this file."""
from __future__ import annotations

import functools
from importlib import resources

__all__ = ["imagenet_wnids", "imagenet_class_names"]


@functools.lru_cache(maxsize=1)
def _imagenet_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files("resnext").joinpath("imagenet1k.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    assert [int(r[0]) for r in rows] == list(range(1000)), "imagenet1k.tsv is corrupt"
    return tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order ('n01440764' is 0)."""
    return list(_imagenet_table()[0])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k short class names in index order ('tench', 'goldfish', ...)."""
    return list(_imagenet_table()[1])
