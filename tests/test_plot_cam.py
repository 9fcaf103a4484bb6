"""Pictures (resnext.plot: confusion.png, curves.png) and class activation maps (resnext.cam,
predict.py --cam). Values come from independent computations: the per-row normalisation and
the Grad-CAM formula by hand, and a model built so that the right map is known."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

import evaluate as evaluate_script
import predict as predict_script
from resnext import Preprocessing, ResNeXt, get_model
from resnext.cam import cam_file_names, grad_cam, heat_colors, layer_gradients, overlay
from resnext.cli import run_cli
from resnext.errors import ConfigError, MissingDependencyError
from resnext.images import load_image
from resnext.plot import curve_series, plot_confusion, plot_curves, read_log
from resnext.plot import get_args_parser as plot_parser
from resnext.plot import main as plot_main
from resnext.report import classification_report
from conftest import HYMENOPTERA, REPO

VAL = HYMENOPTERA / "val"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the [plot] extra
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason='pip install -e ".[plot]"')


def _png(path, min_side=200, max_side=3000):
    """Open `path` as a PNG of sensible size; return (width, height)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # the whole file decodes
        assert min_side <= min(image.size) and max(image.size) <= max_side, image.size
        return image.size


# --- Grad-CAM: the formula by hand ---------------------------------------------------------

class _LinearHead(nn.Module):
    """logits = fc(spatial mean of layer4(x)); layer4 passes its input through, so the
    input *is* the feature map A."""

    def __init__(self, weight):
        super().__init__()
        self.layer4 = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.fill_(0.3)

    def forward(self, x):
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


def test_grad_cam_equals_the_hand_formula():
    A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
                       [[4.0, 0.0], [1.0, 2.0]]]])  # (1, 2, 2, 2): two channels, 2 x 2
    W = torch.tensor([[1.0, -0.5], [-1.0, 2.0]])     # (classes, channels)
    model = _LinearHead(W)
    feats, grads, labels = layer_gradients(model, A, class_index=0)
    assert torch.equal(feats, A) and labels.tolist() == [0]
    # d logit_0 / d A_k[i, j] = W[0, k] / (H * W) everywhere: the weights are W[0] / 4.
    assert torch.allclose(grads.mean(dim=(2, 3))[0], torch.tensor([1.0 / 4, -0.5 / 4]))
    assert torch.allclose(grads, (W[0] / 4).view(1, 2, 1, 1).expand(1, 2, 2, 2))
    # By hand: 0.25 * A_0 - 0.125 * A_1 = [[-0.25, 0.5], [0.625, 0.75]]; ReLU; / max.
    hand = [[0.0, 0.5 / 0.75], [0.625 / 0.75, 1.0]]
    assert torch.allclose(grad_cam(model, A, class_index=0)[0], torch.tensor(hand))
    # Class 1: -0.25 * A_0 + 0.5 * A_1 = [[1.75, -0.5], [-0.25, 0.0]] -> ReLU -> [[1.75,0],[0,0]]
    assert torch.allclose(grad_cam(model, A, class_index=1)[0],
                          torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # Default class: the top logit, class 0 (2.5 - 0.5 * 1.75 = 1.625 > -2.5 + 2 * 1.75 = 1).
    assert torch.equal(grad_cam(model, A), grad_cam(model, A, class_index=0))
    assert torch.equal(grad_cam(model, torch.ones(1, 2, 2, 2)), torch.zeros(1, 2, 2))  # flat


# --- Grad-CAM: a model whose answer is known -----------------------------------------------

class _Brightness(nn.Module):
    """A stand-in last stage: channel `k` of its (N, 2048, h/2, w/2) output is the input's
    brightness (sum over channels), 2x2 average-pooled; channel `k + 1` is a constant 1;
    the rest are 0."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        n, _, h, w = x.shape
        out = x.new_zeros(n, 2048, h // 2, w // 2)
        out[:, self.k] = nn.functional.avg_pool2d(x.sum(dim=1, keepdim=True), 2)[:, 0]
        out[:, self.k + 1] = 1.0
        return out


def _known_model(k=7):
    """Our ResNeXt's forward (stem, four stages, pooled head) with pooling in place of the
    convolutions, so that layer4's channel k lights up exactly where the image is bright;
    class 1 ("bright") reads channel k, class 0 reads the constant channel minus it."""
    model = ResNeXt(50, num_classes=2)
    model.conv1 = nn.AvgPool2d(2)            # (N, 3, H/2, W/2); then maxpool: H/4
    model.bn1 = nn.Identity()
    model.layer1, model.layer2, model.layer3 = nn.Identity(), nn.AvgPool2d(2), nn.AvgPool2d(2)
    model.layer4 = _Brightness(k)            # (N, 2048, H/32, W/32)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[1, k] = 4.0
        model.fc.weight[0, k], model.fc.weight[0, k + 1] = -1.0, 2.0
    return model.eval()


def _square(top, left, size=96, side=256):
    x = torch.full((1, 3, side, side), -1.0)  # dark, normalised
    x[:, :, top:top + size, left:left + size] = 2.0
    return x


def _peak(cam):
    flat = int(cam.flatten().argmax())
    return divmod(flat, cam.shape[-1])


def test_grad_cam_finds_the_bright_square_and_follows_it():
    model = _known_model()
    for top, left in ((0, 160), (160, 0), (96, 96)):
        x = _square(top, left)
        assert model(x).argmax().item() == 1  # "bright" wins
        cam = grad_cam(model, x)  # the top class
        assert cam.shape == (1, 256, 256) and cam.min() >= 0 and cam.max() == 1
        row, col = _peak(cam[0])
        assert top <= row < top + 96 and left <= col < left + 96, (top, left, row, col)
        inside = cam[0, top + 24:top + 72, left + 24:left + 72]  # away from the blurred edge
        assert inside.min() > 0.9
        far = cam[0, (top + 160) % 256, (left + 160) % 256]
        assert far < 0.1
        # Class 0 weighs the brightness negatively: its map is lowest in the square.
        other = grad_cam(model, x, class_index=0)[0]
        assert other[top + 48, left + 48] == 0 and other[(top + 160) % 256,
                                                          (left + 160) % 256] > 0.9
    assert not model.layer4._forward_hooks  # the hook is gone
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_on_a_real_resnext_batch_and_modes():
    torch.manual_seed(0)
    model = ResNeXt(50, num_classes=3, zero_init_residual=False).eval()
    x = torch.stack([Preprocessing(64).transform()(load_image(p))
                     for p in sorted((VAL / "bees").iterdir())[:2]])
    cams = grad_cam(model, x, class_index=[2, 0])
    assert cams.shape == (2, 64, 64) and cams.dtype == torch.float32
    assert 0 <= cams.min() and cams.max() <= 1
    one = grad_cam(model, x[1:], class_index=0)  # alone equals in the batch
    assert torch.allclose(one[0], cams[1], atol=1e-4)
    with torch.inference_mode():  # predict.py's scores come from inference mode
        assert torch.allclose(grad_cam(model, x, class_index=[2, 0]), cams, atol=1e-5)
    for p in model.layer4.parameters():
        p.requires_grad_(False)  # frozen weights: the map still has its gradient
    assert torch.allclose(grad_cam(model, x, class_index=[2, 0]), cams, atol=1e-5)


# --- the overlay and the file names ---------------------------------------------------------

def test_overlay_colours_text_and_size():
    assert torch.allclose(heat_colors(torch.tensor([[0.0, 1.0]])),
                          torch.tensor([[[0.0, 0.5]], [[0.0, 0.0]], [[0.5, 0.0]]]))
    image = Image.new("RGB", (64, 64), (100, 100, 100))
    cam = torch.zeros(64, 64)
    cam[:, :32] = 1.0  # the left half is "hot"
    out = overlay(image, cam, "bees 0.87")
    assert out.mode == "RGB" and out.size == (256, 256)  # small crops are enlarged
    # Half photo, half jet: (50 + 64, 50, 50) where hot (dark red), (50, 50, 50 + 64) where cold.
    assert out.getpixel((40, 200)) == (114, 50, 50) and out.getpixel((216, 200)) == (50, 50, 114)
    band = [out.getpixel((x, y)) for x in range(4, 120) for y in range(2, 18)]
    assert max(map(sum, band)) > 700 and min(map(sum, band)) < 100  # white text, dark band
    same = overlay(torch.full((3, 64, 64), 100, dtype=torch.uint8), cam)  # a uint8 crop
    assert same.getpixel((40, 200)) == (114, 50, 50)


def test_cam_file_names_are_unique():
    assert cam_file_names(["a/x.jpg", "b/x.png", "c/X.jpg", "x-2.jpg", "bird.JPEG"]) == [
        "x_cam.png", "x-2_cam.png", "X-3_cam.png", "x-2-2_cam.png", "bird_cam.png"]


# --- predict.py --cam -------------------------------------------------------------------------

def test_predict_cam_target_checked_before_the_work(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    args = predict_script.get_args_parser().parse_args(
        [str(VAL), "--checkpoint", str(tmp_path / "missing.pth"), "--cam", str(taken)])
    with pytest.raises(ConfigError, match="--cam needs a folder"):  # not the missing file
        predict_script.main(args)


@pytest.mark.slow
def test_predict_cam_writes_one_map_per_image(tmp_path, checkpoint_at_64, capsys):
    photo = sorted((VAL / "bees").iterdir())[0]
    for folder in ("one", "two"):  # two inputs with the same stem
        (tmp_path / folder).mkdir()
        shutil.copy(photo, tmp_path / folder / photo.name)
    inputs = [tmp_path / "one" / photo.name, tmp_path / "two" / photo.name, REPO / "demo"]
    args = predict_script.get_args_parser().parse_args(
        [*map(str, inputs), "--checkpoint", str(checkpoint_at_64), "--cam",
         str(tmp_path / "cams"), "--workers", "0", "--json", "--fuse-bn"])
    assert predict_script.main(args) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert written == sorted([f"{photo.stem}_cam.png", f"{photo.stem}-2_cam.png", "bird_cam.png",
                              "cat-dog_cam.png", "demo_cam.png", "dog_cam.png"])
    assert len(answers) == 6
    # The file equals the overlay of Grad-CAM computed here on the plain model.
    model = get_model(pretrained=str(checkpoint_at_64)).eval()
    crop = model.preprocessing.transform(False)(load_image(photo))
    x = model.preprocessing.transform()(load_image(photo))[None]
    label = answers[0]["pred_label"]
    expected = overlay(crop, grad_cam(model, x, label)[0],
                       f"{answers[0]['pred_class']} {answers[0]['pred_score']:.2f}")
    for name in (f"{photo.stem}_cam.png", f"{photo.stem}-2_cam.png"):
        assert _png(tmp_path / "cams" / name, 256, 256) == (256, 256)
        with Image.open(tmp_path / "cams" / name) as got:
            diff = [abs(a - b) for a, b in zip(got.convert("RGB").tobytes(), expected.tobytes())]
        assert sum(diff) / len(diff) < 0.5 and max(diff) <= 8  # channels_last rounding


# --- confusion.png ----------------------------------------------------------------------------

@needs_matplotlib
def test_confusion_picture_is_normalised_per_true_class(tmp_path):
    counts = [[3, 1, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [2, 1, 0, 0]]
    report = classification_report(torch.tensor(counts), [0, 1, 3], ["cat", "dog", "fox", "owl"])
    drawn = plot_confusion(report, tmp_path / "confusion.png")
    hand = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]
    torch.testing.assert_close(torch.as_tensor(drawn["matrix"]),
                               torch.tensor(hand, dtype=torch.float64))
    assert drawn["names"] == ["cat", "dog", "fox", "owl"] and drawn["note"] == ""
    _png(tmp_path / "confusion.png")


@needs_matplotlib
def test_confusion_picture_of_many_classes_keeps_the_confused_ones(tmp_path):
    n = 60
    counts = torch.diag(torch.full((n,), 5))
    counts[3, 7], counts[10, 3], counts[40, 41] = 2, 1, 3
    report = classification_report(counts, list(range(n)), [f"class {i}" for i in range(n)])
    drawn = plot_confusion(report, tmp_path / "confusion.png")
    assert drawn["names"] == ["class 3", "class 7", "class 10", "class 40", "class 41"]
    assert "5 of 60 classes" in drawn["note"]
    # Still normalised by each true class's full count (class 3: 5 right, 2 as class 7).
    assert drawn["matrix"][0].tolist() == pytest.approx([5 / 7, 2 / 7, 0, 0, 0])
    _png(tmp_path / "confusion.png")
    full = classification_report(counts[:50, :50], list(range(50)), [f"c{i}" for i in range(50)])
    assert len(plot_confusion(full, tmp_path / "fifty.png")["names"]) == 50
    assert _png(tmp_path / "fifty.png")[0] <= 2000


# --- curves.png --------------------------------------------------------------------------------

def _write_log(path, ema=True):
    """A log as train.py writes one (header, 'train' interval records, 'epoch' records), with
    validation every second epoch, and a resumed run's second record of epoch 3."""
    records = [{"type": "header", "args": {"epochs": 4}}]
    for epoch in range(1, 5):
        for it in (5, 10):
            records.append({"type": "train", "epoch": epoch, "iter": it,
                            "step": (epoch - 1) * 10 + it, "lr": 0.1, "loss": 2.0 / epoch})
        record = {"type": "epoch", "epoch": epoch, "train_loss": 2.0 / epoch,
                  "train_top1": 10.0 * epoch, "lr": 0.1 / epoch, "train_images": 80}
        if epoch % 2 == 0:
            record.update({"accuracy/top1": 20.0 * epoch, "accuracy/top5": 25.0 * epoch,
                           "val_loss": 2.5 / epoch, "val_images": 33})
            if ema:
                record["ema/accuracy/top1"] = 21.0 * epoch
        records.append(record)
    records.append({**records[-1], "epoch": 3, "train_loss": 0.5})  # resumed: replaces
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "ep')


@needs_matplotlib
def test_curves_have_one_point_per_epoch(tmp_path):
    _write_log(tmp_path / "log.jsonl")
    drawn = plot_curves(tmp_path)
    assert drawn["path"] == tmp_path / "curves.png"
    _png(drawn["path"])
    assert drawn["epoch"] == [1, 2, 3, 4]
    assert drawn["train_loss"] == [2.0, 1.0, 0.5, 0.5]
    assert drawn["lr"] == pytest.approx([0.1, 0.05, 0.1 / 4, 0.025])
    assert drawn["val_epoch"] == [2, 3, 4]  # the resumed epoch 3 record carries val keys
    assert drawn["top1"] == [40.0, 80.0, 80.0] and drawn["topk_name"] == "top5"
    assert drawn["has_ema"] and drawn["ema_top1"] == [42.0, 84.0, 84.0]
    assert drawn["interval_epoch"][:4] == [0.5, 1.0, 1.5, 2.0]
    _write_log(tmp_path / "plain.jsonl", ema=False)
    assert not curve_series(read_log(tmp_path / "plain.jsonl"))["has_ema"]


def test_missing_or_empty_log_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="log.jsonl: no such file"):
        read_log(tmp_path / "log.jsonl")
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ConfigError, match="log.jsonl: the log is empty"):
        read_log(tmp_path / "log.jsonl")
    (tmp_path / "log.jsonl").write_text('{"type": "header"}\n')
    with pytest.raises(ConfigError, match="no epoch records yet"):
        curve_series(read_log(tmp_path / "log.jsonl"))
    (tmp_path / "log.jsonl").write_text('{"type": "header"}\nnot json\n{}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON record"):
        read_log(tmp_path / "log.jsonl")
    if HAVE_MATPLOTLIB:
        for target in (tmp_path / "nothing", tmp_path / "log.jsonl"):
            with pytest.raises(SystemExit) as exit_info:
                run_cli("resnext.plot", plot_main, plot_parser().parse_args([str(target)]))
            assert exit_info.value.code == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and err.startswith("resnext.plot: error: ")
            assert str(target) in err


# --- without matplotlib -------------------------------------------------------------------------

def test_without_matplotlib_one_line_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    report = classification_report(torch.tensor([[1, 0], [1, 1]]), [0, 1], ["a", "b"])
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[plot\]"'):
        plot_confusion(report, tmp_path / "confusion.png")
    assert isinstance(MissingDependencyError("x"), ImportError)
    _write_log(tmp_path / "log.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("resnext.plot", plot_main, plot_parser().parse_args([str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "pip install" in err
    assert not (tmp_path / "confusion.png").exists() and not (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_import_resnext_does_not_import_matplotlib():
    code = ("import sys, resnext, resnext.plot, resnext.cam\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_report_draws_or_skips_the_picture(tmp_path, checkpoint_at_64, monkeypatch,
                                                    capsys):
    def run(folder):
        args = evaluate_script.get_args_parser().parse_args(
            ["--data", str(VAL), "--checkpoint", str(checkpoint_at_64), "--workers", "0",
             "--report", str(folder)])
        evaluate_script.main(args)
        return capsys.readouterr()

    if HAVE_MATPLOTLIB:
        out = run(tmp_path / "drawn").out
        assert f"picture: {tmp_path / 'drawn' / 'confusion.png'}" in out
        _png(tmp_path / "drawn" / "confusion.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    captured = run(tmp_path / "skipped")
    note = [line for line in captured.err.splitlines() if "confusion.png" in line]
    assert len(note) == 1 and "skipped" in note[0] and "pip install" in note[0]
    assert sorted(p.name for p in (tmp_path / "skipped").iterdir()) == [
        "confusion.csv", "report.json"]


@pytest.mark.slow
@needs_matplotlib
def test_plot_module_runs_as_a_script(tmp_path):
    _write_log(tmp_path / "log.jsonl")
    res = subprocess.run([sys.executable, "-m", "resnext.plot", str(tmp_path), "--out",
                          str(tmp_path / "out" / "c.png")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == f"{tmp_path / 'out' / 'c.png'}: 4 epochs"
    _png(tmp_path / "out" / "c.png")
