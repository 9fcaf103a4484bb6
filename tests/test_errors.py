"""Errors and output: the package's own error types, the scripts' one-line errors and exit
statuses, output paths checked before the work, and the record a loaded model carries."""
import argparse
import dataclasses
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

import resnext
from resnext.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, check_output_path, run_cli
from resnext.errors import ResNeXtWarning
from conftest import DEMO, REPO


def _run_cli(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("tool.py", main, argparse.Namespace())
    return exit_info.value.code, capsys.readouterr().err


def test_package_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    def bad_input(args):
        raise resnext.CheckpointError("x.pth: no state dict found")

    assert _run_cli(bad_input, capsys) == (EXIT_USAGE, "tool.py: error: x.pth: no state "
                                                       "dict found\n")

    def bad_image(args):
        raise resnext.ImageReadError("a.jpg: empty file")

    assert _run_cli(bad_image, capsys)[0] == EXIT_FAILED  # a per-file failure

    def interrupted(args):
        raise KeyboardInterrupt

    code, err = _run_cli(interrupted, capsys)
    assert code == EXIT_INTERRUPTED and "Traceback" not in err

    def disk_full(args):
        raise OSError(28, "No space left on device", "/out/preds.json")

    assert _run_cli(disk_full, capsys) == (
        EXIT_USAGE, "tool.py: error: /out/preds.json: No space left on device\n")

    # A CUDA error, an out-of-memory or a bug is not ours to summarise: it propagates.
    def bug(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_cli("tool.py", bug, argparse.Namespace())
    with pytest.raises(ZeroDivisionError):
        run_cli("tool.py", lambda args: 1 / 0, argparse.Namespace())


def test_error_types_keep_the_builtin_callers_catch():
    assert issubclass(resnext.ImageReadError, ValueError)
    assert issubclass(resnext.CheckpointError, ValueError)
    assert issubclass(resnext.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(resnext.DownloadError, RuntimeError)
    for error in (resnext.ImageReadError, resnext.CheckpointError, resnext.DatasetError,
                  resnext.ConfigError, resnext.DownloadError, resnext.CheckpointNotFoundError):
        assert issubclass(error, resnext.ResNeXtError)
    with pytest.raises(resnext.ConfigError, match="unknown model 'resnext51'"):
        resnext.get_model("resnext51")
    with pytest.raises(resnext.ConfigError, match="interpolation"):
        resnext.Preprocessing(interpolation="nearest")


def test_package_warnings_print_as_one_line(capsys):
    def main(args):
        warnings.warn("--compile ignored: no C++ compiler found", ResNeXtWarning)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, err = _run_cli(main, capsys)
    assert code == 0 and err == "tool.py: warning: --compile ignored: no C++ compiler found\n"


def test_empty_and_missing_checkpoints_say_what_they_are(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(resnext.CheckpointError, match=r"empty\.pth: empty file \(0 bytes\)"):
        resnext.read_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(resnext.CheckpointNotFoundError, match="checkpoint not found"):
        resnext.read_checkpoint(tmp_path / "nope.pth")


def test_output_paths_are_checked_before_the_work(tmp_path):
    target = check_output_path(tmp_path / "new" / "deeper" / "preds.json")
    assert target.parent.is_dir() and not target.exists()  # folder made, no file left
    assert list(target.parent.iterdir()) == []
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(resnext.ConfigError, match="a_file/preds.json: cannot write"):
        check_output_path(tmp_path / "a_file" / "preds.json")  # a file where a folder goes
    with pytest.raises(resnext.ConfigError, match="is a folder"):
        check_output_path(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("evaluate.py", ["--data", "tests/data", "--out", "README.md/preds.json"]),
    ("predict.py", [str(DEMO / "bird.JPEG"), "--json", "README.md/x.json"]),
    ("train.py", ["--data", "tests/data", "--work-dir", "README.md/run"]),
    ("train.py", ["--data", "tests/data", "--device", "cuda:7"]),
])
def test_scripts_refuse_unusable_setups_at_once(script, args):
    # Before any weights are read or images decoded: exit 2 with one line, no traceback.
    res = subprocess.run([sys.executable, script, *args, "--checkpoint", "missing.pth"]
                         if script != "train.py" else [sys.executable, script, *args],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), res.stderr
    assert "README.md" in lines[0] or "cuda:7" in lines[0]


def test_weights_record_is_one_immutable_fact(ants_bees_checkpoint):
    model = resnext.get_model(pretrained=str(ants_bees_checkpoint))
    info = model.weights_info
    assert isinstance(info, resnext.WeightsInfo) and info.source == str(ants_bees_checkpoint)
    assert model.class_names == list(info.class_names) == ["ants", "bees"]
    assert model.preprocessing is info.preprocessing
    assert info.load_report.loaded == len(model.state_dict()) and info.release is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.class_names = ("cats", "dogs")
    with pytest.raises(AttributeError):
        model.class_names = ["cats", "dogs"]  # read from the record, not a loose attribute
    before = model.fc.weight.clone()
    with pytest.warns(UserWarning, match="init_weights\\(\\) skipped"):
        model.init_weights()
    assert torch.equal(model.fc.weight, before)
    random = resnext.resnext50_32x4d(num_classes=2)
    assert random.weights_info is None and random.class_names is None


def test_factories_show_their_real_parameters():
    for name in resnext.list_models():
        params = inspect.signature(getattr(resnext, name)).parameters
        assert {"pretrained", "num_classes", "reset_head", "dtype"} <= set(params), name
        assert params["pretrained"].default is False
    assert getattr(resnext, "resnext50_32x4d") is resnext.model.resnext50_32x4d  # one factory
