"""Hash-checked downloads of released weights into torch.hub's cache
(`<torch.hub.get_dir()>/checkpoints/`), with torch.hub's downloader underneath."""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import CheckpointError, DownloadError

__all__ = ["download_weights", "is_url", "sha256_of"]

# torch.hub's convention: '<name>-<first hex digits of sha256>.<ext>'.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")


def is_url(source: str | os.PathLike) -> bool:
    """True for an http(s) or file URL (a string), False for a path."""
    return isinstance(source, str) and urlparse(source).scheme in ("http", "https", "file")


def sha256_of(path: Path) -> str:
    """The file's SHA-256 as hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(url: str, progress: bool = True) -> Path:
    """Download `url` once into `<torch.hub dir>/checkpoints/` and return the local path.

    When the file name carries a SHA-256 prefix ('...-56066e27.pth', torch.hub's convention)
    it is checked after download and again on every use of the cached file. torch.hub's
    downloader writes to a temporary file and renames it, so an interrupted download leaves
    no partial file behind. `file://` URLs are read in place.

    Args:
        url: http(s) or file URL of the weights.
        progress: show torch.hub's progress bar.
    Returns:
        The local file.
    Raises:
        CheckpointError (a ValueError): the URL names no file.
        DownloadError (a RuntimeError): the download failed (the message names the URL and
            how to pass a local file instead), or the hash does not match.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    filename = os.path.basename(parsed.path)
    if not filename:
        raise CheckpointError(f"{url}: the URL names no file")
    match = _HASH_IN_NAME.search(filename)
    expected = match.group(1) if match else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=expected,
                                           progress=progress)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(
                f"could not download {url} ({reason}). Without network, fetch that file "
                f"elsewhere and pass its path: pretrained='/path/to/{filename}' in Python, "
                f"--checkpoint /path/to/{filename} for predict.py/evaluate.py") from None
        except RuntimeError as e:  # torch.hub's hash check; it has removed the partial file
            raise DownloadError(f"{url}: downloaded file failed its SHA-256 check: {e}") from None
    elif expected is not None:
        digest = sha256_of(cached)
        if not digest.startswith(expected):
            raise DownloadError(f"cached file {cached} has SHA-256 {digest[:16]}..., which does "
                                f"not start with {expected} as its name says; delete it to "
                                f"download again")
    return cached
