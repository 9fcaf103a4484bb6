"""The per-class report of an evaluation (evaluate.py --report): precision, recall, F1 and
support per class, their macro and weighted averages, the confusion matrix and the most
frequent confusions, all derived from the (C, C) confusion matrix that
evaluate(confusion=True) counts. Conventions are scikit-learn's classification_report with
zero_division=0; written as report.json and confusion.csv, printed as a compact table."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from .cli import printable

__all__ = ["class_metrics", "report_labels", "report_names", "classification_report",
           "build_report", "format_report", "write_report", "TOP_CONFUSIONS", "TABLE_ROWS"]

#: How many confusions report.json lists, and how many class rows the printed table shows.
TOP_CONFUSIONS, TABLE_ROWS = 20, 20


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den elementwise as float64, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den, torch.zeros_like(num))


def class_metrics(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support of a confusion matrix.

    precision = diag / column sum (of the images predicted as the class, the share that is
    it), recall = diag / row sum (of the class's images, the share found), F1 = 2PR / (P + R).
    Each is defined as 0 where its denominator is 0: a class never predicted has precision 0,
    a class without images recall 0, and F1 is 0 where P + R = 0 (scikit-learn's
    zero_division=0).

    Args:
        confusion: (C, C) integer image counts, row the true class, column the predicted one.
    Returns:
        {'precision', 'recall', 'f1': (C,) float64 in [0, 1]; 'support': (C,) int64 images
        of each true class}.
    """
    cm = confusion.to("cpu", torch.int64)
    tp, support, predicted = cm.diagonal(), cm.sum(dim=1), cm.sum(dim=0)  # (C,) each
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def report_labels(dataset) -> list[int]:
    """The classes a report covers (its label set), ascending: for class folders every
    folder of the dataset's mapping, empty ones included (they count in the macro average,
    with support 0); for an annotation file the labels it uses."""
    class_to_idx = getattr(dataset, "class_to_idx", None)
    labels = class_to_idx.values() if class_to_idx else dataset.targets
    return sorted(set(labels))


def report_names(dataset, class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """A name for each of the model's `num_classes` outputs: the model's class names when it
    has them, else the dataset's folder name for that label, else the index as text."""
    if class_names is not None:
        return [str(name) for name in class_names]
    names = [str(i) for i in range(num_classes)]
    for folder, label in (getattr(dataset, "class_to_idx", None) or {}).items():
        names[label] = folder
    return names


def _top_confusions(cm: torch.Tensor, names: Sequence[str], count: int) -> list[dict]:
    """The `count` largest off-diagonal cells of `cm`, by count (descending), then true and
    predicted index (ascending); zero cells are left out."""
    off = cm.clone()
    off.fill_diagonal_(0)
    cells = off.nonzero()  # (M, 2) [true, predicted], row-major: index order
    values = off[cells[:, 0], cells[:, 1]]
    order = torch.sort(values, descending=True, stable=True).indices[:count]
    return [{"true": t, "true_name": names[t], "pred": p, "pred_name": names[p],
             "count": int(values[i])}
            for i, (t, p) in zip(order.tolist(), cells[order].tolist())]


def classification_report(confusion: torch.Tensor, labels: Sequence[int],
                          names: Sequence[str], top: int = TOP_CONFUSIONS) -> dict:
    """scikit-learn's classification_report(y_true, y_pred, labels=labels, zero_division=0),
    from the confusion matrix, plus the matrix and the most frequent confusions.

    Args:
        confusion: (C, C) integer image counts over all the model's classes, row the true
            class, column the predicted one (evaluate(confusion=True)'s 'confusion').
        labels: the label set (report_labels): the classes listed and averaged.
        names: the name of each of the C classes (report_names).
        top: how many confusions to list.
    Returns:
        {'classes': [{index, name, precision, recall, f1, support}] for each label, ascending;
        'macro_avg': the unweighted mean of each metric over `labels` (classes without images
        included, as 0 recall), 'weighted_avg': the mean weighted by support (0 without
        images), each with the total support; 'confusion': {'labels', 'names', 'counts'}: the
        square matrix restricted to `labels` plus any other class the model predicted (so
        each row sums to its class's support); 'top_confusions': [{true, true_name, pred,
        pred_name, count}], off-diagonal, by count then index; 'zero_division': 0}.
        Metrics are fractions in [0, 1].
    """
    cm = confusion.to("cpu", torch.int64)
    metrics = class_metrics(cm)
    keys = ("precision", "recall", "f1")
    chosen = torch.tensor(list(labels), dtype=torch.int64)
    support = metrics["support"][chosen]  # (L,)
    total = int(support.sum())
    classes = [{"index": i, "name": names[i],
                **{key: float(metrics[key][i]) for key in keys},
                "support": int(metrics["support"][i])} for i in chosen.tolist()]
    macro = {key: float(metrics[key][chosen].mean()) if len(chosen) else 0.0 for key in keys}
    weighted = {key: float((metrics[key][chosen] * support).sum() / total) if total else 0.0
                for key in keys}
    predicted = cm.sum(dim=0).nonzero().flatten().tolist()
    shown = sorted(set(chosen.tolist()) | set(predicted))
    return {"classes": classes, "macro_avg": {**macro, "support": total},
            "weighted_avg": {**weighted, "support": total},
            "confusion": {"labels": shown, "names": [names[i] for i in shown],
                          "counts": cm[shown][:, shown].tolist()},
            "top_confusions": _top_confusions(cm, names, top), "zero_division": 0}


def build_report(result: dict, dataset, class_names: Sequence[str] | None) -> dict:
    """The whole report of an evaluate(confusion=True) result: top-1/top-k and the image count
    ('top1', 'top{k}', 'k', 'num_images', as evaluate returns them), then
    classification_report over report_labels(dataset) with report_names."""
    cm = result["confusion"]
    names = report_names(dataset, class_names, cm.shape[0])
    k = result["k"]
    head = {"num_images": result["num_images"], "top1": result["top1"],
            f"top{k}": result[f"top{k}"], "k": k}
    return {**head, **classification_report(cm, report_labels(dataset), names)}


def format_report(report: dict, folder: str | os.PathLike | None = None,
                  rows: int = TABLE_ROWS, confusions: int = 5) -> str:
    """The report as text for a terminal: the per-class table (class, precision, recall, F1,
    support) with the averages, and the most frequent confusions.

    Up to `rows` classes are listed in index order; with more, the `rows` worst (lowest F1,
    then lowest recall, then index) and a line saying how many are left out. Names go
    through resnext.cli.printable.

    Args:
        report: build_report's or classification_report's dict.
        folder: where report.json was written, for the closing line.
        rows: classes shown at most; confusions: confusions shown at most.
    """
    classes = report["classes"]
    shown = classes
    if len(classes) > rows:
        shown = sorted(classes, key=lambda c: (c["f1"], c["recall"], c["index"]))[:rows]
    table = [(printable(c["name"]), c) for c in shown]
    table += [("macro avg", report["macro_avg"]), ("weighted avg", report["weighted_avg"])]
    width = max(len(name) for name, _ in table)
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    lines += [f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:6.4f}  "
              f"{c['support']:7d}" for name, c in table]
    json_path = printable(Path(folder) / "report.json") if folder is not None else None
    if len(shown) < len(classes):
        lines.insert(0, f"the {len(shown)} classes with the lowest F1 of {len(classes)}, worst "
                        f"first; {len(classes) - len(shown)} more in "
                        f"{json_path or 'the report'}")
    top = report["top_confusions"][:confusions]
    if top:
        lines.append("most frequent confusions (true -> predicted: images): " + ", ".join(
            f"{printable(t['true_name'])} -> {printable(t['pred_name'])}: {t['count']}"
            for t in top))
    if folder is not None:
        lines.append(f"report: {json_path}, {printable(Path(folder) / 'confusion.csv')}")
    return "\n".join(lines)


def _to_json(value, indent: int = 0) -> str:
    """JSON text with a line per item of each container that holds containers: one line per
    class, per confusion and per matrix row (json.dumps's indent would give each of a
    1000 x 1000 matrix's counts a line of its own)."""
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(value, (dict, list)) or not any(isinstance(v, (dict, list)) for v in items):
        return json.dumps(value)
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        lines = [f"{pad}{json.dumps(k)}: {_to_json(v, indent + 1)}" for k, v in value.items()]
    else:
        lines = [pad + _to_json(v, indent + 1) for v in value]
    brackets = "{}" if isinstance(value, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(lines) + "\n" + " " * indent + brackets[1]


def write_report(report: dict, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write `report` as folder/report.json (all of it, exact class names) and the confusion
    matrix as folder/confusion.csv: a header row of predicted class names, then one row per
    true class, its name first, then its image counts.

    Returns:
        The paths of report.json and confusion.csv.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "report.json", folder / "confusion.csv"
    json_path.write_text(_to_json(report) + "\n")  # ASCII: other characters \u-escaped
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    matrix = report["confusion"]
    writer.writerow(["true/predicted", *matrix["names"]])
    writer.writerows([name, *row] for name, row in zip(matrix["names"], matrix["counts"]))
    # UTF-8; a folder name's undecodable bytes (surrogate escapes) are written back as they were
    csv_path.write_text(text.getvalue(), encoding="utf-8", errors="surrogateescape")
    return json_path, csv_path
