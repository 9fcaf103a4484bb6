"""Exported files where a checkpoint goes: predict.py and evaluate.py run TorchScript, int8,
ExportedProgram and ONNX files (resnext.artifacts), recognised by content, with the classes
and preprocessing written inside them; what such a file cannot do is refused in one line."""
import importlib.util
import json
import sys
import warnings
import zipfile

import pytest
import torch

import resnext
from resnext.artifacts import ArtifactNet, artifact_device, artifact_format
from resnext.errors import CheckpointError, ConfigError, ResNeXtWarning
from resnext.export import (export_meta, export_onnx, export_program, export_torchscript,
                            load_images)
from resnext.images import list_images
from resnext.inference import load_for_inference
from resnext.quantize import int8_recipe, quantize_int8
from conftest import DEMO, HYMENOPTERA, REPO
import test_checkpoint

sys.path.insert(0, str(REPO))
import evaluate as evaluate_script  # noqa: E402  (the scripts: get_args_parser, main)
import predict as predict_script  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning",
                                        "ignore::DeprecationWarning", "ignore::FutureWarning")
CPU = torch.device("cpu")
http_server = test_checkpoint.http_server  # the fixture: a server on 127.0.0.1, a tmp hub dir


def _tiny_torchscript(path, extra=None):
    traced = torch.jit.trace(torch.nn.Linear(2, 2).eval(), torch.zeros(1, 2))
    torch.jit.save(traced, str(path), _extra_files=extra or {})
    return path


def test_an_exported_file_is_known_by_content_not_name(tmp_path):
    script = _tiny_torchscript(tmp_path / "weights.pth")  # TorchScript under a checkpoint name
    program = tmp_path / "model.bin"
    with open(program, "wb") as f:
        torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), f)
    plain = tmp_path / "model.pt2"  # a state dict under the exported program's suffix
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    assert artifact_format(script) == "torchscript"
    assert artifact_format(program) == "exported-program"
    assert artifact_format(plain) is None
    assert artifact_format(tmp_path / "garbage.onnx") == "onnx"
    for other in (tmp_path / "missing.pt", tmp_path, "https://example.invalid/m.onnx"):
        assert artifact_format(other) is None
    # Loading one as weights names it for what it is, in one line.
    with pytest.raises(CheckpointError, match=r"weights\.pth: an exported model \(torchscript\)"):
        resnext.get_model(pretrained=str(script))
    with pytest.raises(CheckpointError, match=r"exported model \(exported-program\)"):
        resnext.read_checkpoint(program)


def _tiny_onnx(path):
    with torch.no_grad():
        torch.onnx.export(torch.nn.Linear(2, 2).eval(), (torch.zeros(1, 2),), str(path),
                          dynamo=False)
    return path


def test_names_do_not_decide_the_format(tmp_path):
    # ONNX under a checkpoint's name and with none; TorchScript under ONNX's suffix.
    onnx_as_pth = _tiny_onnx(tmp_path / "model.pth")
    bare = tmp_path / "model"
    bare.write_bytes(onnx_as_pth.read_bytes())
    script_as_onnx = _tiny_torchscript(tmp_path / "script.onnx")
    assert artifact_format(onnx_as_pth) == artifact_format(bare) == "onnx"
    assert artifact_format(script_as_onnx) == "torchscript"
    with pytest.raises(CheckpointError, match=r"model\.pth: an exported model \(onnx\)"):
        resnext.read_checkpoint(onnx_as_pth)
    # Files that open like nothing of the kind stay checkpoints (the reader names them).
    state = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state, _use_new_zipfile_serialization=False)
    (tmp_path / "notes.txt").write_text("\x08 not a model")
    assert artifact_format(state) is artifact_format(tmp_path / "notes.txt") is None
    empty = tmp_path / "empty.onnx"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"empty\.onnx: empty file \(0 bytes\), not an "
                                              "ONNX file"):
        ArtifactNet(empty)


def test_an_exported_file_without_our_metadata_is_refused(tmp_path):
    script = _tiny_torchscript(tmp_path / "foreign.torchscript.pt")
    with pytest.raises(CheckpointError, match="foreign.torchscript.pt: a TorchScript file "
                                              "without resnext.json metadata"):
        ArtifactNet(script)
    pytest.importorskip("onnxruntime")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CheckpointError, match=r"garbage\.onnx: not a readable ONNX file"):
        load_for_inference(None, tmp_path / "garbage.onnx", CPU)


def _meta(**changes):
    meta = {"format": "torchscript", "model": "resnext50_32x4d", "num_classes": 2,
            "class_names": ["ants", "bees"], "preprocessing": resnext.Preprocessing(2).to_dict()}
    return json.dumps({**meta, **changes})


@pytest.mark.parametrize("stored, message", [
    ("[]", r"its resnext.json is malformed \(a list, not an object\)"),
    ("{not json", "its resnext.json is not JSON"),
    (_meta(preprocessing={"crop_size": 2, "foo": 1}), "its resnext.json is malformed "
                                                      r"\(TypeError: .*'foo'"),
    (_meta(num_classes="two"), r"its resnext.json is malformed \(ValueError"),
    (_meta(num_classes=0), r"exported without a classifier \(num_classes 0\)"),
    (_meta(class_names=["ants"]), "names 1 classes for a 2-class head"),
    (_meta(), r"gives \(1, 3, 2, 2\) for 1 images, not \(1, 2\) logits"),  # Linear on pixels
])
def test_a_malformed_exported_file_is_one_error_naming_it(tmp_path, stored, message):
    path = _tiny_torchscript(tmp_path / "odd.torchscript.pt", {"resnext.json": stored})
    with pytest.raises(CheckpointError, match=r"odd\.torchscript\.pt.*" + message):
        load_for_inference(None, path, CPU).classify(torch.zeros(1, 3, 2, 2))


def test_an_unreadable_exported_program_says_why_without_a_logged_traceback(tmp_path, capfd):
    path = tmp_path / "broken.pt2"
    with zipfile.ZipFile(path, "w") as archive:  # torch.export's layout, without its records
        archive.writestr("broken/archive_format", "pt2")
    assert artifact_format(path) == "exported-program"
    with pytest.raises(CheckpointError, match=r"broken\.pt2: not a readable ExportedProgram "
                                              r"file \(RuntimeError: Expected hasRecord"):
        ArtifactNet(path)
    assert "Traceback" not in capfd.readouterr().err
    # A real program with its graph taken out: torch's loader finds no program in it.
    whole = tmp_path / "whole.pt2"
    with open(whole, "wb") as f:
        torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), f,
                          extra_files={"resnext.json": _meta()})
    gutted = tmp_path / "gutted.pt2"
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(gutted, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("models/model.json"):
                dst.writestr(item, src.read(item))
    assert artifact_format(gutted) == "exported-program"
    with pytest.raises(CheckpointError, match=r"gutted\.pt2: not a readable ExportedProgram "
                                              r"file \(RuntimeError: it holds no exported "
                                              r"program \(KeyError: 'model'\)"):
        ArtifactNet(gutted)


def test_train_refuses_to_resume_from_an_exported_file_before_making_its_work_dir(tmp_path):
    import train
    script = _tiny_torchscript(tmp_path / "best.torchscript.pt", {"resnext.json": _meta()})
    args = train.get_args_parser().parse_args(["--data", str(HYMENOPTERA), "--resume",
                                               str(script)])
    work_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"--resume .*best\.torchscript\.pt: an exported "
                                              r"model \(torchscript\), not a training checkpoint"):
        train.prepare_work_dir(args, work_dir, True)
    assert not work_dir.exists()


def test_calibration_photos_are_spread_over_every_class():
    from resnext.images import spread_evenly
    paths = list_images(HYMENOPTERA / "train")  # ants first, then bees
    picked = spread_evenly(paths, 4)
    assert picked == [paths[0], paths[len(paths) // 4], paths[len(paths) // 2],
                      paths[3 * len(paths) // 4]]  # by hand: i * N // 4
    assert {p.parent.name for p in picked} == {"ants", "bees"}
    assert spread_evenly(paths[:3], 4) == paths[:3]


def test_scripts_set_up_the_cpu_for_an_exported_file(tmp_path):
    script = _tiny_torchscript(tmp_path / "m.torchscript.pt")
    with pytest.warns(ResNeXtWarning, match="--device cuda ignored: .*run on CPU"):
        assert artifact_device(script, "cuda") == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResNeXtWarning)  # another rank than 0 says nothing
        assert artifact_device(script, "cuda", announce=False) == "cpu"
        assert artifact_device(script, "cpu:0") == "cpu"  # the CPU by another name: silent
    with pytest.raises(ConfigError, match="--device 'bogus'"):
        artifact_device(script, "bogus")  # a typo is an error, as with a checkpoint
    assert artifact_device(script, None) == "cpu"
    plain = tmp_path / "m.pth"
    torch.save({}, plain)
    assert artifact_device(plain, "cuda") == "cuda" and artifact_device(None, None) is None


# --- the files of a real network, run by the scripts --------------------------------------------

@pytest.fixture(scope="module")
def exported(checkpoint_at_64, tmp_path_factory):
    """The conftest model at 64 px written in each format; ExportedProgram with a fixed batch
    of 1 (the scripts then feed it one image at a time), ONNX when onnxruntime is here."""
    folder = tmp_path_factory.mktemp("exported")
    model = resnext.get_model(pretrained=str(checkpoint_at_64)).eval()
    files = {"torchscript": export_torchscript(model, folder / "m.torchscript.pt",
                                               export_meta(model, "torchscript")),
             "exported-program": export_program(model, folder / "m.pt2",
                                                export_meta(model, "exported-program"))}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        files["onnx"] = export_onnx(model, folder / "m.onnx", export_meta(model, "onnx", True),
                                    dynamic_batch=True)
    calibration = load_images(list_images(HYMENOPTERA / "train")[::4], model.preprocessing)
    meta = export_meta(model, "torchscript", quantization=int8_recipe())
    files["int8"] = export_torchscript(quantize_int8(model, [calibration]),
                                       folder / "m.int8.torchscript.pt", meta)
    return model, files


def _predict(capsys, *argv):
    args = predict_script.get_args_parser().parse_args([*map(str, argv), "--workers", "0"])
    status = predict_script.main(args)
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _own_loader(path, fmt):
    """The file through its format's own runtime, not through the package."""
    if fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "exported-program":
        with open(path, "rb") as f:
            return torch.export.load(f).module()
    return torch.jit.load(str(path))


@pytest.mark.slow
def test_predict_runs_every_exported_file(exported, capsys):
    model, files = exported
    paths = sorted(DEMO.glob("*.*[gG]")) + list_images(HYMENOPTERA / "val")[::11]  # 7 photos
    x = load_images(paths, model.preprocessing)  # the stored 64 px preprocessing
    with torch.no_grad():
        eager = model(x).softmax(1)
    for fmt, path in files.items():
        # int8 kernels may round differently at another batch size: one image per batch,
        # as the reference below runs it.
        batch = ["--batch-size", "1"] if fmt == "int8" else []
        status, answers = _predict(capsys, *paths, "--checkpoint", path, "--json", "--topk",
                                   "2", *batch)
        assert status == 0 and [a["path"] for a in answers] == [str(p) for p in paths]
        assert {a["pred_class"] for a in answers} <= {"ants", "bees"}
        scores = torch.tensor([[t["score"] for t in sorted(a["topk"], key=lambda t: t["label"])]
                               for a in answers])
        if fmt == "int8":
            # The file's own answers, through torch.jit.load alone: this checks predict.py's
            # pipeline (decoding, crop, normalisation, batching) around the file; int8's
            # fidelity to fp32 is tests/test_export.py's subject.
            with torch.no_grad():
                run = _own_loader(path, fmt)
                expected = torch.cat([run(image).softmax(1) for image in x.split(1)])
            assert (expected - eager).abs().max() > 1e-4  # int8 really ran
        else:
            expected = eager
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)
        assert [a["pred_label"] for a in answers] == expected.argmax(1).tolist(), fmt


def _evaluate(tmp_path, *argv):
    out = tmp_path / "result.json"
    args = evaluate_script.get_args_parser().parse_args(
        ["--data", str(HYMENOPTERA / "val"), "--workers", "0", "--json", str(out),
         *map(str, argv)])
    evaluate_script.main(args)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_evaluate_runs_an_int8_and_an_onnx_file(exported, tmp_path):
    model, files = exported
    paths = list_images(HYMENOPTERA / "val")
    labels = torch.tensor([["ants", "bees"].index(p.parent.name) for p in paths])
    x = load_images(paths, model.preprocessing)
    for fmt in ("int8", "onnx"):
        if fmt not in files:
            continue
        result = _evaluate(tmp_path, "--checkpoint", files[fmt], "--batch-size", "1")
        with torch.no_grad():
            run = _own_loader(files[fmt], "onnx" if fmt == "onnx" else "torchscript")
            predicted = torch.cat([run(image) for image in x.split(1)]).argmax(1)
        hits = int((predicted == labels).sum())
        assert result["num_images"] == len(paths) == 33
        assert result["top1"] == pytest.approx(100 * hits / len(paths)), (fmt, hits)
        assert result["checkpoint"] == str(files[fmt])


@pytest.mark.slow
def test_what_an_exported_file_cannot_do_is_said(exported, tmp_path):
    model, files = exported
    path = files["exported-program"]
    with pytest.warns(ResNeXtWarning, match=r"--model resnext101_32x4d, --amp, --fuse-bn, "
                                            r"--compile ignored: .*m\.pt2 is an exported "
                                            r"ExportedProgram file \(resnext50_32x4d, 2 classes"):
        prepared = load_for_inference("resnext101_32x4d", path, CPU, amp="bf16", fuse=True,
                                      compile=True)
    assert prepared.class_names == ["ants", "bees"] and prepared.preprocessing.crop_size == 64
    assert prepared.load_report is None and prepared.device == CPU
    # The loader's resize may change; the crop is the file's.
    assert load_for_inference(None, path, CPU, resize_size=80).preprocessing.resize_size == 80
    with pytest.raises(ConfigError, match=r"exported for 64 px crops; --img-size 96"):
        load_for_inference(None, path, CPU, img_size=96)
    with pytest.raises(ConfigError, match="unknown model 'resnext51'"):
        load_for_inference("resnext51", path, CPU)  # a typo is an error, as with a checkpoint
    args = predict_script.get_args_parser().parse_args(
        [str(DEMO / "bird.JPEG"), "--checkpoint", str(path), "--cam", str(tmp_path / "cams")])
    with pytest.raises(ConfigError, match="--cam needs the network's gradients"):
        predict_script.main(args)
    assert not (tmp_path / "cams").exists()  # refused before any folder was made
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResNeXtWarning)
        # Names of the file's own network (registry, mmpretrain alias): nothing to ignore.
        for name in ("resnext50_32x4d", "resnext50_32x4d.tv2_in1k", "resnext50-32x4d_8xb32_in1k"):
            load_for_inference(name, path, CPU)
        # Another rank than 0 (announce=False) says nothing either.
        load_for_inference("resnext101_32x4d", path, CPU, amp="bf16", announce=False)


@pytest.mark.slow
def test_evaluate_names_the_files_network_not_the_ignored_model(exported, tmp_path):
    _, files = exported
    with pytest.warns(ResNeXtWarning, match="--model resnext101_32x4d ignored"):
        result = _evaluate(tmp_path, "--checkpoint", files["torchscript"], "--model",
                           "resnext101_32x4d")
    assert result["model"] == "resnext50_32x4d" and result["num_images"] == 33


@pytest.mark.slow
def test_an_exported_file_by_url_is_downloaded_and_run(exported, http_server):
    model, files = exported
    base, www, requests = http_server  # 127.0.0.1, and a torch.hub dir of the test's own
    (www / "served.torchscript.pt").write_bytes(files["torchscript"].read_bytes())
    url = f"{base}/served.torchscript.pt"
    assert artifact_device(url, None) == "cpu"
    prepared = load_for_inference(None, url, CPU)
    assert prepared.exported == "TorchScript file (resnext50_32x4d, 2 classes)"
    x = load_images(sorted(DEMO.glob("*.*[gG]")), model.preprocessing)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)
    assert requests == ["/served.torchscript.pt"]  # downloaded once, then from the cache


@pytest.mark.slow
def test_an_8_bit_int8_file_on_a_cpu_without_vnni_is_run_with_a_warning(exported, monkeypatch):
    _, files = exported
    if ArtifactNet(files["int8"]).meta["quantization"]["activation_bits"] != 8:
        pytest.skip("this CPU made a 7-bit file (no AVX512-VNNI)")
    import resnext.artifacts
    monkeypatch.setattr(resnext.artifacts, "cpu_has_vnni", lambda: False)
    with pytest.warns(ResNeXtWarning, match="8-bit int8 activations, made for a CPU with "
                                            "AVX512-VNNI.*--activation-bits 7"):
        ArtifactNet(files["int8"])
