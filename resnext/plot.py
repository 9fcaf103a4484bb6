"""Pictures of a run, drawn with matplotlib (the optional extra: pip install -e ".[plot]"):
the confusion matrix of evaluate.py --report (DIR/confusion.png) and the training curves of
train.py's log (WORK_DIR/curves.png).

    python -m resnext.plot work_dirs/hymenoptera            # -> work_dirs/hymenoptera/curves.png

matplotlib is imported inside the functions, never by `import resnext`, and draws with its
Agg canvas on a Figure of its own (no pyplot, so a notebook's backend is left alone). Without
it the functions raise MissingDependencyError, whose one line says how to install it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from .cli import HelpFormatter, check_output_path, printable, run_cli
from .errors import ConfigError, MissingDependencyError

__all__ = ["require_matplotlib", "normalized_confusion", "plot_confusion", "read_log",
           "curve_series", "plot_curves", "get_args_parser", "main", "MAX_CLASSES"]

#: Up to this many classes the confusion picture shows every class; beyond, only those in
#: the report's top confusions (report.TOP_CONFUSIONS of them).
MAX_CLASSES = 50
INSTALL_HINT = 'pip install -e ".[plot]" (or pip install matplotlib)'


def require_matplotlib():
    """Import matplotlib's Figure and Agg canvas.

    Returns:
        (Figure, FigureCanvasAgg) classes.
    Raises:
        MissingDependencyError (an ImportError): matplotlib is not installed; the message
            says how to install it.
    """
    try:
        import matplotlib  # the package first: a stubbed-out matplotlib stops here
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(f"the pictures need matplotlib, which is not installed: "
                                     f"{INSTALL_HINT}") from None
    del matplotlib
    return Figure, FigureCanvasAgg


def _short(name: str, width: int = 24) -> str:
    """A class name for a tick label: printable, at most `width` characters."""
    name = printable(name)
    return name if len(name) <= width else name[:width - 1] + "\u2026"


def normalized_confusion(counts: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """A confusion matrix normalised per row: cell (t, p) is the share of true class t's
    images predicted as p, so the diagonal is each class's recall. A row without images
    stays 0.

    Args:
        counts: (C, C) image counts, row the true class, column the predicted one.
    Returns:
        (C, C) float64 in [0, 1]; each row with images sums to 1.
    """
    cm = torch.as_tensor(counts, dtype=torch.float64)
    rows = cm.sum(dim=1, keepdim=True)  # (C, 1) images per true class
    return torch.where(rows > 0, cm / rows.clamp(min=1), torch.zeros_like(cm))


def _chosen_classes(report: dict, max_classes: int) -> tuple[list[int], str]:
    """Positions (in report['confusion']['labels']) of the classes to draw, and a note on
    the choice ('' when all are drawn)."""
    labels = report["confusion"]["labels"]
    if len(labels) <= max_classes:
        return list(range(len(labels))), ""
    where = {label: i for i, label in enumerate(labels)}
    chosen: list[int] = []
    for t in report.get("top_confusions", []):
        for label in (t["true"], t["pred"]):
            if where[label] not in chosen and len(chosen) < max_classes:
                chosen.append(where[label])
    note = f"the {len(chosen)} of {len(labels)} classes in the most frequent confusions"
    if not chosen:  # no confusion at all: the classes with the lowest recall
        recall = normalized_confusion(report["confusion"]["counts"]).diagonal()
        chosen = torch.sort(recall, stable=True).indices[:max_classes].tolist()
        note = f"the {len(chosen)} of {len(labels)} classes with the lowest recall"
    return sorted(chosen), note


def plot_confusion(report: dict, path: str | os.PathLike, max_classes: int = MAX_CLASSES,
                   dpi: int = 100) -> dict:
    """Draw a report's confusion matrix, normalised per true class, to a PNG.

    Class names label both axes (true classes down, predicted across), a colour bar gives
    the scale, and up to 12 classes each cell shows its value. With more than
    `max_classes` classes only those in the report's top confusions are drawn, still
    normalised by each true class's full image count.

    Args:
        report: resnext.report.build_report's (or classification_report's) dict.
        path: the PNG to write.
        max_classes: the most classes drawn.
        dpi: pixels per inch of the PNG (the figure is 7-16 inches wide).
    Returns:
        {'path': Path, 'matrix': (K, K) float64 numpy array, the values drawn,
         'names': the K class names drawn, 'note': what was left out ('' when nothing)}.
    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    full = normalized_confusion(report["confusion"]["counts"])
    chosen, note = _chosen_classes(report, max_classes)
    index = torch.tensor(chosen, dtype=torch.int64)
    matrix = full[index][:, index].numpy()  # (K, K)
    names = [report["confusion"]["names"][i] for i in chosen]
    k = len(names)
    side = min(15.0, max(6.0, 3.5 + 0.23 * k))  # inches: ~0.23 in per class up to 50
    cell = 72 * (side - 3.5) / max(k, 1)  # points: the axes take all but ~3.5 inches
    fontsize = max(6.0, min(10.0, 0.5 * cell))  # tick labels about half a cell high
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = list(range(k))
    upright = k <= 6 and max(len(_short(n)) for n in names) <= 10
    ax.set_xticks(ticks, [_short(n) for n in names], rotation=0 if upright else 90,
                  fontsize=fontsize)
    ax.set_yticks(ticks, [_short(n) for n in names], fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 12:
        for (t, p), value in zip(((t, p) for t in ticks for p in ticks), matrix.flat):
            ax.text(p, t, f"{value:.2f}", ha="center", va="center",
                    fontsize=min(fontsize, 0.4 * cell),
                    color="white" if value > 0.5 else "black")
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("share of the true class's images")
    title = "confusion matrix, normalised per true class (diagonal: recall)"
    if "num_images" in report and "top1" in report:
        title += f"\n{report['num_images']} images, top-1 {report['top1']:.2f}%"
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.savefig(path, dpi=dpi)
    return {"path": Path(path), "matrix": image.get_array().data, "names": names, "note": note}


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of train.py's log.jsonl, in file order.

    A last line cut short (a run killed while writing) is left out.

    Raises:
        ConfigError (a ValueError): the file is missing, empty, or holds a line that is not
            a JSON record (named by its line number).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (train.py writes log.jsonl into its "
                          f"--work-dir)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the log ({e.strerror or e})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # cut short while being written
            raise ConfigError(f"{path}: line {number} is not a JSON record") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: the log is empty")
    return records


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def curve_series(records: Sequence[dict]) -> dict:
    """The series the curves picture draws, from a log's records.

    Epoch records give one point per epoch (a resumed run's later record of an epoch
    replaces the earlier one); validation series only have the epochs that validated.
    'train' interval records give the loss at fractional epochs (epoch - 1 + iter / steps,
    steps being the last iter logged in that epoch).

    Returns:
        {'epoch', 'train_loss', 'lr': lists per epoch record; 'val_epoch', 'val_loss',
         'top1', 'topk' (top-5, or top-k with fewer classes), 'ema_top1': lists per
         validated epoch (NaN where a key is missing); 'topk_name': e.g. 'top5' or None;
         'has_ema': bool; 'interval_epoch', 'interval_loss': lists per interval record}.
    Raises:
        ConfigError: no epoch record (the first epoch has not ended yet).
    """
    epochs = {r["epoch"]: r for r in records if r.get("type") == "epoch" and "epoch" in r}
    if not epochs:
        raise ConfigError("no epoch records yet (train.py writes one as each epoch ends)")
    rows = [epochs[e] for e in sorted(epochs)]
    val = [r for r in rows if "accuracy/top1" in r]
    topk = sorted({key.split("/")[1] for r in val for key in r
                   if key.startswith("accuracy/top") and key != "accuracy/top1"})
    topk_name = topk[0] if topk else None
    steps: dict[int, int] = {}
    intervals = [r for r in records if r.get("type") == "train" and "iter" in r]
    for r in intervals:
        steps[r["epoch"]] = max(steps.get(r["epoch"], 0), r["iter"])
    return {
        "epoch": [r["epoch"] for r in rows],
        "train_loss": [_number(r.get("train_loss")) for r in rows],
        "lr": [_number(r.get("lr")) for r in rows],
        "val_epoch": [r["epoch"] for r in val],
        "val_loss": [_number(r.get("val_loss")) for r in val],
        "top1": [_number(r["accuracy/top1"]) for r in val],
        "topk_name": topk_name,
        "topk": [_number(r.get(f"accuracy/{topk_name}")) for r in val] if topk_name else [],
        "has_ema": any("ema/accuracy/top1" in r for r in val),
        "ema_top1": [_number(r.get("ema/accuracy/top1")) for r in val],
        "interval_epoch": [r["epoch"] - 1 + r["iter"] / steps[r["epoch"]] for r in intervals],
        "interval_loss": [_number(r.get("loss")) for r in intervals],
    }


# Legends under the axes, off the curves.
_BELOW = dict(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              frameon=False)


def plot_curves(log: str | os.PathLike, path: str | os.PathLike | None = None,
                dpi: int = 100) -> dict:
    """Draw train.py's log as curves.png: train and val loss against epoch with the
    learning rate on a second axis (left), val top-1 and top-5 (top-k) accuracy against
    epoch, and EMA top-1 when the records carry 'ema/accuracy/top1' (right).

    Args:
        log: the log.jsonl file, or the work dir holding it.
        path: the PNG to write; default curves.png beside the log.
        dpi: pixels per inch (the figure is 11 x 4.6 inches).
    Returns:
        curve_series' dict plus 'path' (the PNG written).
    Raises:
        ConfigError: the log is missing, empty, unreadable or has no epoch record yet.
        MissingDependencyError: matplotlib is not installed.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    log = Path(log)
    log = log / "log.jsonl" if log.is_dir() else log
    records = read_log(log)
    try:
        series = curve_series(records)
    except ConfigError as e:
        raise ConfigError(f"{log}: {e}") from None
    path = Path(path) if path is not None else log.parent / "curves.png"
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    if series["interval_epoch"]:
        loss_ax.plot(series["interval_epoch"], series["interval_loss"], color="tab:blue",
                     alpha=0.25, linewidth=1, label="train loss (per log interval)")
    loss_ax.plot(series["epoch"], series["train_loss"], "o-", color="tab:blue",
                 label="train loss (epoch mean)")
    if series["val_epoch"]:
        loss_ax.plot(series["val_epoch"], series["val_loss"], "s-", color="tab:orange",
                     label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(series["epoch"], series["lr"], "--", color="tab:gray", label="lr")
    lr_ax.set_ylabel("learning rate")
    lr = [v for v in series["lr"] if v > 0]
    if lr and max(lr) / min(lr) > 20:
        lr_ax.set_yscale("log")
    elif lr:
        lr_ax.set_ylim(0, max(lr) * 1.15)  # from 0: a constant lr reads as constant
    handles = loss_ax.get_legend_handles_labels()
    extra = lr_ax.get_legend_handles_labels()
    loss_ax.legend(handles[0] + extra[0], handles[1] + extra[1], **_BELOW)
    loss_ax.set_title("loss and learning rate", fontsize=10)
    _accuracy_panel(acc_ax, series)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(printable(log), fontsize=9)
    fig.savefig(path, dpi=dpi)
    return {**series, "path": path}


def _accuracy_panel(ax, series: dict) -> None:
    """The right panel of plot_curves: val accuracy against epoch."""
    if not series["val_epoch"]:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.plot(series["val_epoch"], series["top1"], "o-", color="tab:green", label="val top-1")
        if series["topk_name"]:
            k = series["topk_name"].removeprefix("top")
            ax.plot(series["val_epoch"], series["topk"], "^-", color="tab:purple",
                    label=f"val top-{k}")
        if series["has_ema"]:
            ax.plot(series["val_epoch"], series["ema_top1"], "o--", color="tab:red",
                    label="EMA val top-1")
        ax.legend(**_BELOW)
    ax.set_ylim(0, 102)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("validation accuracy", fontsize=10)


def get_args_parser() -> argparse.ArgumentParser:
    """python -m resnext.plot's flags: WORK_DIR (or a log file), --out, --dpi."""
    p = argparse.ArgumentParser(prog="python -m resnext.plot", formatter_class=HelpFormatter,
                                description="Draw train.py's log.jsonl as curves.png (needs "
                                            f"matplotlib: {INSTALL_HINT})")
    p.add_argument("work_dir", metavar="WORK_DIR",
                   help="train.py's --work-dir (or the log.jsonl file itself)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="the PNG to write; default WORK_DIR/curves.png")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch")
    return p


def main(args: argparse.Namespace) -> int:
    """Draw the curves; prints the PNG's path. Returns 0."""
    require_matplotlib()  # before anything else: the one line that says how to install it
    log = Path(args.work_dir)
    if not log.exists():
        raise ConfigError(f"{log}: no such file or folder")
    log = log / "log.jsonl" if log.is_dir() else log
    out = check_output_path(args.out or log.parent / "curves.png")
    drawn = plot_curves(log, out, dpi=args.dpi)
    print(f"{printable(drawn['path'])}: {len(drawn['epoch'])} epochs")
    return 0


if __name__ == "__main__":
    run_cli("resnext.plot", main, get_args_parser().parse_args())
