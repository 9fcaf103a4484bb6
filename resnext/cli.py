"""The command-line side the scripts share: argparse types and formatter, the flags with one
meaning in train.py, evaluate.py and predict.py, and run_cli, which turns the package's
errors into one line and an exit status."""
from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NoReturn

from .errors import ConfigError, ResNeXtError, ResNeXtWarning
from .runtime import default_workers, shared_memory_free

__all__ = ["positive_int", "non_negative_int", "HelpFormatter", "add_common_args",
           "printable", "check_output_path", "print_load_notes", "run_cli", "EXIT_USAGE",
           "EXIT_FAILED", "EXIT_INTERRUPTED"]

#: Exit statuses: 1 when some inputs failed (per-file errors) or training diverged; 2 for a
#: usage or setup error (argparse's own status for bad flags); 130 after Ctrl-C (128 + SIGINT).
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or less is an argument error, not a traceback)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where the help already says what the default
    is, or the default is None or False (nothing to say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_common_args(parser: argparse.ArgumentParser, batch_size: int = 32,
                    training: bool = False) -> None:
    """The flags train.py, evaluate.py and predict.py share, with one meaning and default:
    --model, --batch-size (images per process), --workers (default_workers()), --img-size,
    --device, --amp, --channels-last/--no-channels-last (on), --compile, --verbose,
    --max-image-pixels, and for predict.py/evaluate.py --raw-weights.

    Args:
        parser: the script's parser, extended in place.
        batch_size: the script's default images per process (32, the recipe's; predict 16).
        training: train.py's wording for --model and --img-size (no checkpoint decides them).
    """
    p = parser
    p.add_argument("--model", default=None, help="factory or seed name (resnext50_32x4d, "
                   "resnext50-32x4d_8xb32_in1k, ...); default: " + (
                       "resnext50_32x4d" if training else
                       "the checkpoint's own, else resnext50_32x4d"))
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="images per process")
    p.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help=f"data-loading processes per process (default: this node's CPUs per "
                        f"process less one, 1 to 16: here {default_workers()})")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="crop size in pixels; evaluation resizes to img-size/0.875 first. "
                        "Default: " + ("224" if training else
                                       "the size stored with the weights, else 224"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; default cuda when "
                   "available")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16"], default=None,
                   help="autocast dtype; default fp32 (the reference numbers). auto: fp16 on "
                        "GPUs with tensor cores (Volta and newer), "
                        "bf16 on CPUs with AVX512-BF16/AMX, else fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (same results to float rounding, faster)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (needs a C++ compiler; pays off on long runs)")
    p.add_argument("--verbose", action="store_true",
                   help="when weights do not fit the model, list every key (default: the "
                        "architecture the file holds and the first keys)")
    if not training:
        p.add_argument("--raw-weights", action="store_true",
                       help="a train.py checkpoint of an EMA run holds two sets of weights: "
                            "use the raw ones instead of the EMA's")
    p.add_argument("--max-image-pixels", type=non_negative_int, default=None,
                   help="refuse images with more pixels than this (decompression-bomb guard); "
                        "0 = no limit; default Pillow's 89,478,485")


def printable(text: object) -> str:
    """`text` safe to print as (part of) one terminal line: control characters (newline,
    carriage return, ESC sequences), invisible format characters (bidi overrides) and the
    undecodable bytes of a file name (surrogate escapes) are shown as Python escapes such as
    \\n, \\x1b, \\u202e, \\udcff; every printable character, non-ASCII ones included, is
    kept. For names that come from files and folders (paths, class names); JSON output keeps
    the exact text instead."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def check_output_path(path: str | os.PathLike) -> Path:
    """Make sure a script can write `path` before it starts the work: its folder is created
    if missing and must accept a new file; an existing file must be writable.

    Returns:
        `path` as a Path.
    Raises:
        ConfigError (a ValueError): naming the path and the reason (permission, read-only
            file system, no space left, a folder in the way).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass  # the folder takes a new file (the write goes through a temporary one)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the output there ({e.strerror or e})") from None
    return path


def print_load_notes(prog: str, report, verbose: bool = False) -> None:
    """Print to stderr what a user should know of the weights just loaded: a dtype cast, a
    skipped EMA copy (everything the LoadReport says with verbose).

    Args:
        prog: the script's name, for the line prefix.
        report: a resnext.weights.LoadReport, or None (nothing to say).
        verbose: print the whole report.
    """
    if report is None:
        return
    said = [str(report)] if verbose else report.notes + [
        part for part in report.format.split(", ")
        if part.endswith("skipped") or part.startswith(("EMA weights", "raw weights"))]
    for line in said:
        print(f"{prog}: weights: {printable(line)}", file=sys.stderr)


def _one_line_warnings(prog: str) -> None:
    """Show the package's warnings (ResNeXtWarning) as 'prog: warning: ...' lines; others keep
    Python's format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ResNeXtWarning):
            print(f"{prog}: warning: {printable(message)}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _loader_resource_failure(error: RuntimeError) -> str | None:
    """What a DataLoader's RuntimeError says about a worker out of resources, as one line
    with the fix; None for any other RuntimeError (a bug, a CUDA error), which keeps its
    traceback."""
    text = str(error)
    free = shared_memory_free()
    shm = f"/dev/shm, {free / 2**20:.0f} MB free" if free is not None else "shared memory"
    fix = "use --workers 0, or give the container more (docker run --shm-size=2g)"
    if "DataLoader timed out" in text:
        return (f"a loader worker sent no batch in time; a worker out of shared memory "
                f"({shm}) or another resource stalls this way: {fix}")
    if "shared memory" in text or "/torch_" in text or "Bus error" in text:
        return f"the loader workers ran out of shared memory ({shm}): {fix}"
    return None


def run_cli(prog: str, main: Callable[[argparse.Namespace], object],
            args: argparse.Namespace) -> NoReturn:
    """Run a script's main and exit the way command-line tools do.

    Exit status: main's return value when it is an int, else 0. The package's own errors
    (resnext.errors.ResNeXtError: bad input, named by the message) and OS errors that name a
    file (permission, no space left) print one "prog: error: ..." line on stderr and exit
    with the error's `exit_status` attribute, else EXIT_USAGE (2). Ctrl-C ends quietly with
    EXIT_INTERRUPTED (130); a loader worker out of shared memory (or timed out) is one line
    with the fix, EXIT_USAGE; a reader of stdout that left (`predict.py ... | head`) ends it
    silently with 141, as other Unix tools end. Everything else (a bug, a CUDA error, out of
    memory) keeps its traceback.
    """
    _one_line_warnings(prog)
    try:
        status = main(args)
    except BrokenPipeError:
        # Point stdout at devnull so that Python's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except ResNeXtError as e:
        lines = str(e).split("\n")  # a mismatch lists keys on indented lines
        print("\n".join([f"{prog}: error: {printable(lines[0])}"]
                        + [printable(line) for line in lines[1:]]), file=sys.stderr)
        sys.exit(getattr(e, "exit_status", EXIT_USAGE))
    except OSError as e:
        if e.filename is None:
            raise
        print(f"{prog}: error: {printable(e.filename)}: {e.strerror or e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except RuntimeError as e:
        cause = _loader_resource_failure(e)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(status if isinstance(status, int) else 0)
