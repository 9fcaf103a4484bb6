"""train.py end to end on real photos (hymenoptera at 32 px, CPU, gloo): resume exactness,
torchrun, faults (killed worker, kill during a checkpoint write, SIGTERM, non-finite loss) and
the JSON-lines log."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import HYMENOPTERA, REPO, count_files

pytestmark = pytest.mark.slow

# Per-process batch: small, so that the few photos of tests/data still make several steps
# per epoch, also with two processes.
BATCH = 5
COMMON = ["--data", str(HYMENOPTERA), "--img-size", "32", "--batch-size", str(BATCH),
          "--lr", "0.01", "--log-interval", "3", "--seed", "1", "--deterministic"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def train_cmd(work_dir, *extra, workers=0):
    return [str(REPO / "train.py"), *COMMON, "--workers", str(workers), "--work-dir",
            str(work_dir), *map(str, extra)]


def run(cmd, timeout=600):
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    return res


def run_ok(cmd, timeout=600):
    res = run(cmd, timeout)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return res


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    momenta_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momenta_a) == len(momenta_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momenta_a, momenta_b))


def read_log(work_dir):
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """The uninterrupted single-process reference: 3 epochs."""
    work = tmp_path_factory.mktemp("ref3")
    run_ok([sys.executable, *train_cmd(work, "--epochs", "3")])
    return work


def test_resume_equals_uninterrupted(tmp_path, three_epochs):
    # python train.py without torchrun: 2 epochs, then --resume for a third.
    work = tmp_path / "b"
    run_ok([sys.executable, *train_cmd(work, "--epochs", "2")])
    assert weights(work / "last.pth")["epoch"] == 2
    res = run_ok([sys.executable, *train_cmd(work, "--epochs", "3", "--resume",
                                             work / "last.pth")])
    assert "resumed from" in res.stdout and "next epoch 3" in res.stdout
    assert_same_state(weights(work / "last.pth"), weights(three_epochs / "last.pth"))
    # Every epoch's losses are replayed exactly on resume.
    ref = [r for r in read_log(three_epochs) if r["type"] == "epoch"]
    got = [r for r in read_log(work) if r["type"] == "epoch"]
    assert len({r["train_loss"] for r in ref}) == 3
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in ref]


def test_kill_during_checkpoint_write_then_auto_resume(tmp_path, three_epochs):
    work = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, *train_cmd(work, "--epochs", "3",
                                                        "--resume", "auto")],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Wait for epoch 1's last.pth, then for epoch 2's temporary file: kill mid-write.
    deadline = time.time() + 300
    temp = None
    while time.time() < deadline and proc.poll() is None:
        if (work / "last.pth").exists():
            temps = list(work.glob(".last.pth.*.tmp"))
            if temps:
                temp = temps[0]
                proc.kill()
                break
        time.sleep(0.001)
    proc.wait()
    assert temp is not None, "never saw a checkpoint being written"
    survivor = weights(work / "last.pth")  # loadable, the previous epoch
    assert survivor["epoch"] == 1
    assert temp.exists()  # the torn write stayed in its temporary file
    # --resume auto continues from last.pth, cleans the leftover, ends as the reference.
    run_ok([sys.executable, *train_cmd(work, "--epochs", "3", "--resume", "auto")])
    assert not list(work.glob("*.tmp")) and not list(work.glob(".*.tmp"))
    assert_same_state(weights(work / "last.pth"), weights(three_epochs / "last.pth"))
    # --resume auto in an empty work dir starts fresh.
    fresh = tmp_path / "fresh"
    res = run_ok([sys.executable, *train_cmd(fresh, "--epochs", "1", "--resume", "auto")])
    assert "resumed" not in res.stdout and weights(fresh / "last.pth")["epoch"] == 1


def test_missing_resume_path_is_an_error(tmp_path):
    res = run([sys.executable, *train_cmd(tmp_path, "--resume", tmp_path / "nope.pth")])
    assert res.returncode == 2  # a setup error, as in evaluate.py and predict.py
    assert "nope.pth: no such checkpoint" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "last.pth").exists()


def test_non_finite_loss_stops_and_keeps_last(tmp_path, three_epochs):
    work = tmp_path / "d"
    work.mkdir()
    shutil.copy(three_epochs / "last.pth", work / "last.pth")
    before = sha(work / "last.pth")
    # lr 1e30 from the trained weights: the loss overflows within a few steps.
    res = run([sys.executable, *train_cmd(work, "--epochs", "2", "--lr", "1e30",
                                          "--load-from", work / "last.pth")])
    assert res.returncode == 1
    assert "non-finite loss" in res.stderr
    assert "at epoch 1, step " in res.stderr and "lr 1e+30" in res.stderr
    assert "last.pth still holds the last completed epoch" in res.stderr
    assert sha(work / "last.pth") == before


def test_sigterm_ends_promptly_and_cleanly(tmp_path):
    work = tmp_path / "e"
    proc = subprocess.Popen([sys.executable, *train_cmd(work, "--epochs", "3")], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = work / "log.jsonl"
        if log.exists() and any(json.loads(l)["type"] == "train"
                                for l in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert time.time() - sent < 10
    assert "stopped by SIGTERM" in err
    assert not list(work.glob(".*.tmp"))


# --- torchrun, two processes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    res = run_ok(TORCHRUN + train_cmd(work, "--epochs", "2", workers=1))
    return work, res


def test_torchrun_two_processes(two_process_run, tmp_path):
    work, res = two_process_run
    assert sorted(p.name for p in work.iterdir()) == ["best.pth", "last.pth", "log.jsonl"]
    ckpt = weights(work / "last.pth")  # weights-only loadable
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["meta"]["classes"] == ["ants", "bees"] and ckpt["epoch"] == 2
    assert res.stdout.count("epoch 2/2:") == 1  # rank 0 prints, once

    # The log: one header, interval records, one record per epoch; rank 0 only.
    log = read_log(work)
    assert [r["type"] for r in log].count("header") == 1
    header = log[0]
    assert header["type"] == "header" and header["world_size"] == 2
    assert header["total_batch"] == 2 * BATCH and header["lr"] == 0.01
    epochs = [r for r in log if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    intervals = [r for r in log if r["type"] == "train"]
    # Each rank gets n_train // 2 images, batches of BATCH, drop_last: `steps` per epoch,
    # logged every 3 steps and at the epoch's last step.
    steps = count_files(HYMENOPTERA / "train") // 2 // BATCH
    assert steps > 3 and steps % 3  # the data has a last step off the interval
    logged = [s for s in range(1, steps + 1) if s % 3 == 0 or s == steps]
    assert [(r["epoch"], r["iter"]) for r in intervals] == [(e, s) for e in (1, 2)
                                                           for s in logged]
    for r in intervals:
        assert {"loss", "lr", "images_per_s", "data_time", "time", "step"} <= set(r)
    n_val = count_files(HYMENOPTERA / "val")
    assert n_val % 2 == 1  # odd: a padded duplicate would show
    assert all(r["val_images"] == n_val for r in epochs)  # each val image once, not n_val + 1
    assert all(r["train_images"] == 2 * steps * BATCH for r in epochs)
    assert epochs[0]["train_loss"] != epochs[1]["train_loss"]
    # Per-process BN statistics without torch 2.14's broadcast_buffers deprecation warning.
    assert "broadcast_buffers" not in res.stderr and "FutureWarning" not in res.stderr

    # Validation during training equals evaluate.py on the saved checkpoint.
    import evaluate
    args = evaluate.get_args_parser().parse_args(
        ["--data", str(HYMENOPTERA / "val"), "--checkpoint", str(work / "last.pth"),
         "--workers", "0"])
    result = evaluate.main(args)
    assert result["num_images"] == n_val
    assert result["top1"] == pytest.approx(epochs[-1]["accuracy/top1"])
    assert result["k"] == 2 and result["top2"] == pytest.approx(epochs[-1]["accuracy/top2"])


def _children(pid):
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _rank_of(pid):
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_killed_worker_restarts_and_matches_uninterrupted(two_process_run, tmp_path):
    reference, _ = two_process_run
    work = tmp_path / "f"
    cmd = (TORCHRUN[:3] + ["--standalone", "--nproc_per_node=2", "--max-restarts=1"]
           + train_cmd(work, "--epochs", "2", "--resume", "auto", workers=1))
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and proc.poll() is None:
        if (work / "last.pth").exists():  # epoch 1 saved: the workers are in epoch 2
            ranks = {_rank_of(p): p for p in _children(proc.pid)}
            if 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)
                killed = time.time()
                break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed"
    lines = [line for line in err.replace("\r", "\n").splitlines() if "it/s" not in line]
    assert proc.returncode == 0, "\n".join(lines)[-6000:]
    log = read_log(work)
    assert [r["type"] for r in log].count("header") == 2  # the restart logged a new header
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]
    assert "resumed from" in out
    assert_same_state(weights(work / "last.pth"), weights(reference / "last.pth"))


def test_fast_options_train_and_validate(tmp_path):
    work = tmp_path / "g"
    res = run_ok([sys.executable, *train_cmd(work, "--epochs", "1", "--fast-decode", "--amp",
                                             "auto", "--channels-last", workers=1)])
    epoch = [r for r in read_log(work) if r["type"] == "epoch"]
    n_train, n_val = count_files(HYMENOPTERA / "train"), count_files(HYMENOPTERA / "val")
    assert len(epoch) == 1 and epoch[0]["val_images"] == n_val
    assert epoch[0]["train_images"] == n_train // BATCH * BATCH  # drop_last
    assert all(map(lambda v: v == v, (epoch[0]["train_loss"], epoch[0]["val_loss"])))  # no NaN
    assert "epoch 1/1:" in res.stdout


@pytest.mark.parametrize("decode", [[], ["--fast-decode"]])
def test_worker_count_does_not_change_the_run(tmp_path, decode):
    # Augmentation is drawn per sample from (seed, epoch, index): 0 or 2 loader workers
    # (persistent across epochs) train bitwise-identical weights, also when the batches
    # cross from the workers as uint8 (--fast-decode) and are normalised in the loop.
    runs = {}
    for workers in (0, 2):
        work = tmp_path / f"w{workers}"
        run_ok([sys.executable, *train_cmd(work, "--epochs", "2", "--val-interval", "2",
                                           *decode, workers=workers)])
        runs[workers] = weights(work / "last.pth")
    assert_same_state(runs[0], runs[2])


def test_resume_with_another_batch_keeps_and_announces_the_lr(tmp_path):
    # The rule: the checkpoint's optimizer state (lr and schedule) wins; a changed total batch
    # is announced, and what is printed and logged is the lr every step then uses.
    work = tmp_path / "h"
    run_ok([sys.executable, *train_cmd(work, "--epochs", "1", "--auto-scale-lr",
                                       "--batch-size", "16")])
    saved_lr = 0.01 * 16 / 256  # --lr 0.01 scaled to a total batch of 16
    assert weights(work / "last.pth")["optimizer"]["param_groups"][0]["lr"] == saved_lr
    res = run_ok([sys.executable, *train_cmd(work, "--epochs", "2", "--auto-scale-lr",
                                             "--batch-size", "8", "--resume", "auto")])
    assert f"lr {saved_lr:g} (from the checkpoint" in res.stdout
    assert "total batch was 16 and is now 8" in res.stdout
    assert f"total batch 8, lr {saved_lr:g}" in res.stdout
    log = read_log(work)
    assert log[-1]["type"] == "epoch" and log[-1]["lr"] == saved_lr
    assert [r["lr"] for r in log if r["type"] == "header"] == [saved_lr, saved_lr]
    assert all(r["lr"] == saved_lr for r in log if r["type"] == "train")
    assert weights(work / "last.pth")["optimizer"]["param_groups"][0]["lr"] == saved_lr
