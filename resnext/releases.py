"""Published ImageNet-1k weights of the architectures we build, across publishers: where each
file is, its SHA-256 prefix, the accuracy published for it and the preprocessing it was
evaluated with. Data only (no torchvision import at run time): the torchvision facts were
read once from torchvision 0.29's weight enums (ResNeXt50_32X4D_Weights,
ResNeXt101_32X8D_Weights, ResNeXt101_64X4D_Weights), the mmpretrain ones from
configs/resnext/metafile.yml; a test compares them with the installed torchvision.

Names follow timm's scheme, `<factory>.<tag>`: `mmpretrain_in1k` (mmpretrain's 2017-recipe
releases, the default of pretrained=True), `tv_in1k` (torchvision IMAGENET1K_V1), `tv2_in1k`
(torchvision IMAGENET1K_V2, its "new recipe"). mmpretrain's own names
(`resnext50-32x4d_8xb32_in1k`) are aliases.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .classes import imagenet_class_names
from .hub import sha256_of
from .transforms import Preprocessing

__all__ = ["ReleasedWeights", "RELEASES", "DEFAULT_TAG", "list_weights", "match_release"]


@dataclass(frozen=True)
class ReleasedWeights:
    """One published weight file.

    Attributes:
        name: registry name, `<factory>.<tag>`, e.g. 'resnext50_32x4d.tv2_in1k'.
        factory: our factory function's name, e.g. 'resnext50_32x4d'.
        url: download address; the hex digits before '.pth' are the file's SHA-256 prefix.
        top1, top5: ImageNet-1k val accuracy (%) as published.
        preprocessing: the test pipeline it was evaluated with: mmpretrain's
            imagenet_bs32_pil_resize (PIL bilinear resize 256, crop 224) or torchvision's
            weights.transforms() (bilinear resize 256 for V1, 232 for V2, crop 224); both
            normalise with the ImageNet mean/std.
        publisher: 'mmpretrain' or 'torchvision'.
        file_size_mib: the file's size as published, in MiB (2**20 bytes: torchvision's
            meta['_file_size']); None if unpublished.
        aliases: other names of the same entry (mmpretrain's model names).
    """
    name: str
    factory: str
    url: str
    top1: float
    top5: float
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    publisher: str = "mmpretrain"
    file_size_mib: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def class_names(self) -> list[str] | None:
        """torchvision's category names (ours but for its two disambiguations); None for
        mmpretrain's files, which carry their own."""
        if self.publisher != "torchvision":
            return None
        names = imagenet_class_names()
        names[134], names[639] = "crane bird", "maillot tank suit"
        return names


_MM = "https://download.openmmlab.com/mmclassification/v0/resnext/"
_TV = "https://download.pytorch.org/models/"
_V2 = Preprocessing(224, 232)  # torchvision's V2 eval: bilinear resize 232, crop 224
DEFAULT_TAG = "mmpretrain_in1k"

RELEASES: list[ReleasedWeights] = [
    ReleasedWeights("resnext50_32x4d.mmpretrain_in1k", "resnext50_32x4d",
                    _MM + "resnext50_32x4d_b32x8_imagenet_20210429-56066e27.pth", 77.90, 93.66,
                    aliases=("resnext50-32x4d_8xb32_in1k",)),
    ReleasedWeights("resnext101_32x4d.mmpretrain_in1k", "resnext101_32x4d",
                    _MM + "resnext101_32x4d_b32x8_imagenet_20210506-e0fa3dd5.pth", 78.61,
                    94.17, aliases=("resnext101-32x4d_8xb32_in1k",)),
    ReleasedWeights("resnext101_32x8d.mmpretrain_in1k", "resnext101_32x8d",
                    _MM + "resnext101_32x8d_b32x8_imagenet_20210506-23a247d5.pth", 79.27,
                    94.58, aliases=("resnext101-32x8d_8xb32_in1k",)),
    ReleasedWeights("resnext152_32x4d.mmpretrain_in1k", "resnext152_32x4d",
                    _MM + "resnext152_32x4d_b32x8_imagenet_20210524-927787be.pth", 78.88,
                    94.33, aliases=("resnext152-32x4d_8xb32_in1k",)),
    ReleasedWeights("resnext50_32x4d.tv_in1k", "resnext50_32x4d",
                    _TV + "resnext50_32x4d-7cdf4587.pth", 77.618, 93.698,
                    publisher="torchvision", file_size_mib=95.789),
    ReleasedWeights("resnext50_32x4d.tv2_in1k", "resnext50_32x4d",
                    _TV + "resnext50_32x4d-1a0047aa.pth", 81.198, 95.340, _V2,
                    publisher="torchvision", file_size_mib=95.833),
    ReleasedWeights("resnext101_32x8d.tv_in1k", "resnext101_32x8d",
                    _TV + "resnext101_32x8d-8ba56ff5.pth", 79.312, 94.526,
                    publisher="torchvision", file_size_mib=339.586),
    ReleasedWeights("resnext101_32x8d.tv2_in1k", "resnext101_32x8d",
                    _TV + "resnext101_32x8d-110c445d.pth", 82.834, 96.228, _V2,
                    publisher="torchvision", file_size_mib=339.673),
    ReleasedWeights("resnext101_64x4d.tv_in1k", "resnext101_64x4d",
                    _TV + "resnext101_64x4d-173b62eb.pth", 83.246, 96.454, _V2,
                    publisher="torchvision", file_size_mib=319.318),
]


def list_weights(factory: str | None = None) -> list[ReleasedWeights]:
    """The published weights (of one factory, if given), by name."""
    return sorted((r for r in RELEASES if factory in (None, r.factory)), key=lambda r: r.name)


def match_release(path: str | os.PathLike,
                  releases: list[ReleasedWeights] | None = None) -> ReleasedWeights | None:
    """The registry entry a local file is: its SHA-256 starts with the hex prefix the entry's
    file name carries. Only entries worth the hash are tried: those whose file name the file
    has (a torch.hub cache keeps the URL's name) or whose published size it has (+-0.5 MiB,
    a renamed copy). A file that merely bears an entry's name (a fine-tuned model saved
    under it) is not the entry and keeps its own metadata.

    Returns:
        The entry, or None when the file matches none.
    """
    path = Path(path)
    releases = RELEASES if releases is None else releases
    size_mib = path.stat().st_size / 2**20 if path.is_file() else -1.0
    candidates = [r for r in releases if path.name == r.file_name or (
        r.file_size_mib is not None and abs(r.file_size_mib - size_mib) <= 0.5)]
    if not candidates or size_mib < 0:
        return None
    digest = sha256_of(path)
    for release in candidates:
        prefix = release.file_name.rsplit("-", 1)[-1].split(".")[0]
        if digest.startswith(prefix):
            return release
    return None
