"""evaluate.py --report: the confusion matrix evaluate() counts, the per-class metrics derived
from it (scikit-learn's classification_report conventions, zero_division=0), the files and the
printed table; checked against hand counts and evaluate.py's own per-image predictions."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import evaluate as evaluate_script
from resnext.errors import ConfigError
from resnext.evaluation import evaluate
from resnext.inference import InferenceModel
from resnext.report import build_report, classification_report, format_report, write_report
from conftest import HYMENOPTERA, REPO, count_files

VAL = HYMENOPTERA / "val"
NAMES = ["cat", "dog", "fox", "owl\x1b[31m"]  # an escape sequence: printed escaped

# Eleven fabricated images as (true class, predicted class). "fox" (2) has no image but is
# predicted once; "owl" (3) has three images and is never predicted.
PAIRS = [(0, 0)] * 3 + [(0, 1), (0, 2)] + [(1, 1)] * 2 + [(1, 0)] + [(3, 0)] * 2 + [(3, 1)]
# The same, counted by hand: row = true class, column = predicted class.
HAND_MATRIX = [[3, 1, 1, 0],
               [1, 2, 0, 0],
               [0, 0, 0, 0],
               [2, 1, 0, 0]]


class _LogitsAsImages(nn.Module):
    """A 'network' whose (N, C, 1, 1) input is its logits, so a test chooses the predictions."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # InferenceModel reads the weights' dtype

    def forward(self, x):
        return x.flatten(1)


class _CountSyncs(TorchDispatchMode):
    """Counts host synchronisations: every int()/float()/item() of a tensor is one."""
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            _CountSyncs.count += 1
        return func(*args, **(kwargs or {}))


def _fabricated_result(batch_size=4):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(PAIRS), generator=g).tolist()  # not grouped by class
    labels = torch.tensor([PAIRS[i][0] for i in order])
    preds = torch.tensor([PAIRS[i][1] for i in order])
    logits = torch.rand(len(PAIRS), 4, generator=g) + 3 * nn.functional.one_hot(preds, 4)
    model = InferenceModel(_LogitsAsImages(), torch.device("cpu"), channels_last=False,
                           class_names=NAMES, num_classes=4)
    loader = DataLoader(TensorDataset(logits[:, :, None, None], labels), batch_size=batch_size)
    _CountSyncs.count = 0
    with _CountSyncs():
        result = evaluate(model, loader, confusion=True)
    assert _CountSyncs.count == 0  # counted on the device, read once at the end
    return result


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def test_confusion_and_metrics_equal_a_hand_count():
    result = _fabricated_result()
    assert result["confusion"].dtype == torch.int64
    assert result["confusion"].tolist() == HAND_MATRIX
    assert result["num_images"] == 11 and result["top1"] == pytest.approx(100 * 5 / 11)
    assert _fabricated_result(batch_size=3)["confusion"].tolist() == HAND_MATRIX  # any batches

    report = classification_report(result["confusion"], [0, 1, 2, 3], NAMES)
    # From the hand matrix: precision = diagonal / column sum, recall = diagonal / row sum,
    # 0 where the sum is 0 (zero_division=0).
    hand = {"cat": (3 / 6, 3 / 5, 5), "dog": (2 / 4, 2 / 3, 3),
            "fox": (0 / 1, 0.0, 0),  # predicted once, wrongly; no support: recall 0
            "owl\x1b[31m": (0.0, 0 / 3, 3)}  # never predicted: precision 0
    assert [c["name"] for c in report["classes"]] == NAMES
    for c in report["classes"]:
        p, r, support = hand[c["name"]]
        assert (c["precision"], c["recall"]) == (pytest.approx(p), pytest.approx(r))
        assert c["f1"] == pytest.approx(_f1(p, r)) and c["support"] == support
    # Macro: over all four classes of the label set, the one without support included.
    for i, key in enumerate(("precision", "recall")):
        assert report["macro_avg"][key] == pytest.approx(sum(v[i] for v in hand.values()) / 4)
        assert report["weighted_avg"][key] == pytest.approx(
            sum(v[i] * v[2] for v in hand.values()) / 11)
    assert report["macro_avg"]["f1"] == pytest.approx(sum(_f1(p, r) for p, r, _ in
                                                          hand.values()) / 4)
    assert report["weighted_avg"]["f1"] == pytest.approx(
        sum(_f1(p, r) * n for p, r, n in hand.values()) / 11)
    assert report["macro_avg"]["support"] == report["weighted_avg"]["support"] == 11
    assert report["confusion"]["counts"] == HAND_MATRIX
    # Off-diagonal cells by count, then true and predicted index.
    assert [(t["true"], t["pred"], t["count"]) for t in report["top_confusions"]] == [
        (3, 0, 2), (0, 1, 1), (0, 2, 1), (1, 0, 1), (3, 1, 1)]
    assert report["top_confusions"][0]["true_name"] == "owl\x1b[31m"


def test_label_set_and_classes_outside_it():
    # The label set is the dataset's: a class outside it that the model predicts gets a
    # column (rows still sum to the support), is not listed and not averaged.
    report = classification_report(torch.tensor(HAND_MATRIX), [0, 1, 3], NAMES)
    assert [c["index"] for c in report["classes"]] == [0, 1, 3]
    assert report["confusion"]["labels"] == [0, 1, 2, 3]  # fox: predicted once
    assert report["macro_avg"]["precision"] == pytest.approx((3 / 6 + 2 / 4 + 0) / 3)
    only_true = classification_report(torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 0]]),
                                      [0, 1], ["a", "b", "c"])
    assert only_true["confusion"] == {"labels": [0, 1], "names": ["a", "b"],
                                      "counts": [[2, 0], [1, 1]]}


def test_printed_table_worst_first_and_escaped(tmp_path):
    result = _fabricated_result()
    # An annotation file (no class_to_idx): the label set is the labels it uses.
    report = build_report(result, SimpleNamespace(targets=[p[0] for p in PAIRS]), NAMES)
    assert [c["index"] for c in report["classes"]] == [0, 1, 3]
    assert report["k"] == 4 and report["top4"] == 100.0 and report["num_images"] == 11
    text = format_report(report, tmp_path)
    assert "\x1b" not in text and "owl\\x1b[31m" in text
    rows = text.splitlines()
    assert [r.split()[0] for r in rows[1:4]] == ["cat", "dog", "owl\\x1b[31m"]  # index order
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["classes"][2]["name"] == "owl\x1b[31m"  # JSON keeps the exact name
    assert saved["top1"] == result["top1"]
    # A comma, and a folder name's undecodable byte (a surrogate escape), kept exactly.
    odd = ["a,b", "caf\udcff"]
    write_report(classification_report(torch.tensor([[1, 2], [0, 3]]), [0, 1], odd), tmp_path)
    with open(tmp_path / "confusion.csv", newline="", encoding="utf-8",
              errors="surrogateescape") as f:
        assert list(csv.reader(f)) == [["true/predicted", *odd], [odd[0], "1", "2"],
                                       [odd[1], "0", "3"]]
    assert json.loads((tmp_path / "report.json").read_text())["confusion"]["names"] == odd

    # 25 classes: the 20 lowest F1 (then recall), worst first, and how many are left out.
    n = 25
    matrix = torch.diag(torch.arange(1, n + 1) * 4)  # class i: 4(i+1) right
    for i in range(n):
        matrix[i, (i + 1) % n] = n - i  # and n - i wrong: lower F1 for lower i
    report = classification_report(matrix, list(range(n)), [f"c{i}" for i in range(n)])
    f1 = {c["name"]: c["f1"] for c in report["classes"]}
    worst = [c["name"] for c in sorted(report["classes"],
                                       key=lambda c: (c["f1"], c["recall"], c["index"]))][:20]
    assert len(set(f1.values())) == n  # no ties: the order is F1's alone
    lines = format_report(report, tmp_path).splitlines()
    assert "20 classes with the lowest F1 of 25" in lines[0] and "5 more" in lines[0]
    assert [line.split()[0] for line in lines[2:22]] == worst
    assert lines[22].startswith("macro avg")


def test_report_folder_checked_before_the_work(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for folder, match in ((a_file, "needs a folder"), (a_file / "sub", "cannot write")):
        args = evaluate_script.get_args_parser().parse_args(
            ["--data", str(VAL), "--checkpoint", str(tmp_path / "missing.pth"),
             "--report", str(folder)])
        with pytest.raises(ConfigError, match=match):  # not the missing checkpoint
            evaluate_script.main(args)
    model = InferenceModel(_LogitsAsImages(), torch.device("cpu"), num_classes=None)
    with pytest.raises(ValueError, match="classifier"):
        evaluate(model, [], confusion=True)


# --- end to end: evaluate.py on the ants/bees photos ------------------------------------------

def _run(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _eval_args(checkpoint, folder):
    return ["evaluate.py", "--data", VAL, "--checkpoint", checkpoint, "--img-size", "64",
            "--workers", "0", "--batch-size", "20", "--report", folder]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, ants_bees_checkpoint):
    """evaluate.py --report and --out in one process: (report folder, predictions, stdout)."""
    tmp = tmp_path_factory.mktemp("report")
    res = _run(*_eval_args(ants_bees_checkpoint, tmp / "report"), "--out", tmp / "preds.json")
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "report", json.loads((tmp / "preds.json").read_text()), res.stdout


@pytest.mark.slow
def test_report_matches_the_per_image_predictions(one_process):
    folder, preds, stdout = one_process
    n = count_files(VAL)
    assert len(preds) == n
    # The expected matrix, counted from evaluate.py's per-image predictions (labels are
    # the folders' order: ants 0, bees 1, as the checkpoint's class names say).
    cells = Counter((p["label"], p["pred_label"]) for p in preds)
    expected = [[cells[(t, q)] for q in range(2)] for t in range(2)]
    assert [sum(row) for row in expected] == [count_files(VAL / "ants"),
                                              count_files(VAL / "bees")]
    assert expected[0][1] and expected[1][0] and expected[0][0] and expected[1][1]  # real test

    assert _read_csv(folder / "confusion.csv") == [
        ["true/predicted", "ants", "bees"],
        ["ants", *map(str, expected[0])], ["bees", *map(str, expected[1])]]
    report = json.loads((folder / "report.json").read_text())
    assert report["confusion"] == {"labels": [0, 1], "names": ["ants", "bees"],
                                   "counts": expected}
    assert report["num_images"] == n and report["k"] == 2 and report["top2"] == 100.0
    assert report["top1"] == pytest.approx(100 * (expected[0][0] + expected[1][1]) / n)
    for i, c in enumerate(report["classes"]):
        p = expected[i][i] / (expected[0][i] + expected[1][i])
        r = expected[i][i] / sum(expected[i])
        assert (c["name"], c["support"]) == (["ants", "bees"][i], sum(expected[i]))
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((p, r, _f1(p, r)))
    wrong = sorted([(expected[0][1], 0, 1), (expected[1][0], 1, 0)],
                   key=lambda x: (-x[0], x[1], x[2]))
    assert [(t["count"], t["true"], t["pred"]) for t in report["top_confusions"]] == wrong
    # The table on stdout, in index order, with the averages.
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("class "))
    assert [line.split()[0] for line in lines[header + 1:header + 5]] == [
        "ants", "bees", "macro", "weighted"]
    ants = lines[header + 1].split()
    assert float(ants[1]) == pytest.approx(report["classes"][0]["precision"], abs=5e-5)
    assert int(ants[4]) == sum(expected[0])
    assert f"report: {folder / 'report.json'}" in stdout


@pytest.mark.slow
def test_report_two_processes_equal_one(tmp_path, ants_bees_checkpoint, one_process):
    folder, _, _ = one_process
    assert count_files(VAL) % 2 == 1  # odd: a padded shard would count one image twice
    res = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *_eval_args(ants_bees_checkpoint, tmp_path / "report"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _read_csv(tmp_path / "report" / "confusion.csv") == _read_csv(
        folder / "confusion.csv")
    two = json.loads((tmp_path / "report" / "report.json").read_text())
    one = json.loads((folder / "report.json").read_text())
    assert two["confusion"] == one["confusion"] and two["num_images"] == one["num_images"]
    # The same counts give the same metrics, to the last bit.
    assert two == {**one, "top1": pytest.approx(one["top1"])}
    assert res.stdout.count("report: ") == 1  # rank 0 only
