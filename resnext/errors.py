"""The package's error types: one base class, so that a script can tell our errors (bad input,
named by the message, printed as one line) from everything else (a bug, a CUDA error, out of
memory), which keeps its traceback.

Each type also derives from the built-in that callers already catch for it: ValueError for
bad values and files, FileNotFoundError for a missing file, RuntimeError for a failed download.
"""
from __future__ import annotations

__all__ = ["ResNeXtError", "ImageReadError", "CheckpointError", "CheckpointNotFoundError",
           "CheckpointWriteError", "DownloadError", "DatasetError", "ConfigError",
           "MissingDependencyError", "ResNeXtWarning"]


class ResNeXtError(Exception):
    """Base class of every error this package raises on purpose; the message names the file,
    key or value at fault."""


class ImageReadError(ResNeXtError, ValueError):
    """An image file is missing, empty, truncated, too large or not an image; the message
    names it. A per-file failure: scripts that stop on it exit with status 1."""

    exit_status = 1

    def __init__(self, message: str = ""):
        # A DataLoader re-raises a worker's exception as ImageReadError("Caught ImageReadError
        # in DataLoader worker process N. Original Traceback ... ImageReadError: <message>"):
        # keep the one line that names the file.
        if isinstance(message, str) and message.startswith("Caught ImageReadError"):
            message = message.rstrip().splitlines()[-1].split("ImageReadError: ", 1)[-1]
        super().__init__(message)


class CheckpointError(ResNeXtError, ValueError):
    """A checkpoint cannot be read, converted or loaded into the model: unknown layout,
    unplaceable or missing keys, another architecture, a refused pickled object."""


class CheckpointNotFoundError(ResNeXtError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class CheckpointWriteError(ResNeXtError, OSError):
    """A checkpoint could not be written (no space left, a size limit, an I/O error); the
    previous file, if any, is unchanged."""


class DownloadError(ResNeXtError, RuntimeError):
    """Released weights could not be downloaded or failed their hash check."""


class DatasetError(ResNeXtError, ValueError):
    """A data folder or annotation file that cannot be read as a dataset for this model."""


class ConfigError(ResNeXtError, ValueError):
    """An option value that cannot work: an unknown model name, an impossible size."""


class MissingDependencyError(ResNeXtError, ImportError):
    """An optional feature needs a package that is not installed (matplotlib for the
    pictures, onnx/onnxruntime for ONNX export); the message says how to install it."""


class ResNeXtWarning(UserWarning):
    """Something the user asked for was adjusted or ignored (an option that falls back, a
    note on the weights); the scripts print these as one line."""
