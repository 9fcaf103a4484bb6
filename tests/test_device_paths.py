"""Code that exists for the GPU, exercised on CPU: uint8 batches normalised on the model's
device, and the fused SGD step under fp16 autocast with a GradScaler (train.py uses both on
CUDA only by default)."""
import copy
import os
import pickle
import sys
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms as T

from conftest import HYMENOPTERA, REPO
from resnext.images import load_image
from resnext.transforms import FastTrainTransform, Normalize, Preprocessing
from resnext.model import ResNeXt

sys.path.insert(0, str(REPO))
import train  # noqa: E402

TRAIN = HYMENOPTERA / "train"
PHOTOS = sorted((TRAIN / "ants").iterdir())[:6] + sorted((TRAIN / "bees").iterdir())[:6]
TORCHVISION_NORMALIZE = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_uint8_crops_normalised_later_equal_torchvision():
    # The loaders hand over uint8 crops; Normalize on the other side must give torchvision's
    # ToTensor + Normalize bit for bit (what evaluate.py computed before the change).
    prep = Preprocessing(112, 128)
    crops, normalize = prep.transform(normalize=False), prep.normalizer()
    reference = T.Compose([T.Resize(128), T.CenterCrop(112), T.ToTensor(),
                           TORCHVISION_NORMALIZE])
    for path in PHOTOS[:4]:
        image = load_image(path)
        pixels = crops(image)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 112, 112)
        assert torch.equal(normalize(pixels), reference(image)), path
    # A batch in channels_last keeps its layout and values; a pickled copy (what a loader
    # worker gets) computes the same; float input is refused rather than scaled twice.
    batch = torch.stack([crops(load_image(p)) for p in PHOTOS[:3]])
    flat = normalize(batch)
    last = normalize(batch.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, flat)
    assert torch.equal(pickle.loads(pickle.dumps(normalize))(batch), flat)
    with pytest.raises(TypeError, match="uint8"):
        normalize(flat)


def test_fast_train_transform_uint8_is_the_float_output_unnormalised():
    as_float, as_uint8 = FastTrainTransform(48), FastTrainTransform(48, normalize=False)
    for seed, path in enumerate(PHOTOS):
        torch.manual_seed(seed)
        expected = as_float(path)
        torch.manual_seed(seed)
        pixels = as_uint8(path)  # same crop and flip draws
        assert pixels.dtype == torch.uint8
        assert torch.equal(Normalize()(pixels), expected), path


def test_inference_model_normalises_uint8_input(ants_bees_checkpoint):
    import resnext
    model = resnext.load_for_inference(None, ants_bees_checkpoint, torch.device("cpu"))
    prep = model.preprocessing
    images = [load_image(p) for p in PHOTOS[::3]]
    as_float = torch.stack([prep.transform()(im) for im in images])
    as_uint8 = torch.stack([prep.transform(normalize=False)(im) for im in images])
    with torch.no_grad():
        assert torch.equal(model(as_uint8), model(as_float))
    # Other weights' mean/std are followed, not ImageNet's baked in.
    model.preprocessing = Preprocessing(prep.crop_size, prep.resize_size, mean=(0.5,) * 3,
                                        std=(0.5,) * 3)
    other = torch.stack([model.preprocessing.transform()(im) for im in images])
    with torch.no_grad():
        assert torch.equal(model(as_uint8), model(other))
        assert not torch.equal(model(as_uint8), model(as_float))


def test_inference_model_normalises_on_its_own_device(monkeypatch):
    # The crops cross to the model's device as uint8 and are normalised there: on the meta
    # device (a stand-in for a GPU that CPU tests can run) Normalize must see meta pixels.
    from resnext.inference import InferenceModel
    net = ResNeXt(50, groups=2, width_per_group=4, num_classes=2).to("meta").eval()
    model = InferenceModel(net, torch.device("meta"))
    seen, normalize = [], Normalize.__call__
    monkeypatch.setattr(Normalize, "__call__",
                        lambda self, pixels: seen.append(pixels.device) or normalize(self, pixels))
    logits = model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert seen == [torch.device("meta")]
    assert logits.device.type == "meta" and logits.shape == (2, 2)


def _batches(count: int, size: int = 32, batch: int = 4):
    """`count` (uint8 images, labels) batches of real photos through train.py's fast path."""
    transform = FastTrainTransform(size, normalize=False)
    out = []
    for b in range(count):
        torch.manual_seed(b)
        paths = [PHOTOS[(b * batch + i) % len(PHOTOS)] for i in range(batch)]
        out.append((torch.stack([transform(p) for p in paths]),
                    torch.tensor(["bees" in str(p) for p in paths], dtype=torch.long)))
    return out


def _train(model, batches, fused: bool, poisoned_step: int | None = None,
           amp: torch.dtype | None = torch.float16):
    """train.train_one_epoch over `batches` (fp16 autocast: with a GradScaler); at
    `poisoned_step` the head's gradient is made infinite, as an fp16 overflow would."""
    model = copy.deepcopy(model)
    args = SimpleNamespace(lr=0.05, momentum=0.9, weight_decay=1e-4, auto_scale_lr=False,
                           milestones=[], gamma=0.1, accum_steps=1, epochs=1, log_interval=100,
                           channels_last=True, batch_size=batches[0][0].shape[0])
    device = torch.device("cpu")
    optimizer, _, scaler = train.build_optimizer(args, model, 4, amp, device, fused=fused)
    assert scaler.is_enabled() == (amp == torch.float16)
    assert bool(optimizer.defaults["fused"]) is fused
    if amp == torch.float16:
        # A scale this random net never overflows at in fp16, so only the poisoned step does.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    state = {"step": -1}
    model.fc.weight.register_hook(
        lambda g: g * float("inf") if state["step"] == poisoned_step else g)

    def loader():
        for batch in batches:
            state["step"] += 1
            yield batch

    train.train_one_epoch(model, loader(), optimizer, scaler, torch.nn.CrossEntropyLoss(), 0,
                          len(batches), args, device, amp, 1, lambda record: None, False)
    return model, scaler.get_scale()


@pytest.mark.slow
def test_fused_sgd_under_grad_scaler_equals_unfused_and_skips_overflow():
    torch.manual_seed(0)
    model = ResNeXt(50, groups=2, width_per_group=4, num_classes=2)
    model.to(memory_format=torch.channels_last)
    b1, b2, b3 = _batches(3)
    fused, fused_scale = _train(model, [b1, b2, b3], fused=True, poisoned_step=1)
    unfused, unfused_scale = _train(model, [b1, b2, b3], fused=False, poisoned_step=1)
    without_b2, clean_scale = _train(model, [b1, b3], fused=False)
    with_b2, _ = _train(model, [b1, b2, b3], fused=False)
    # The overflowing step halved the scale in both and was skipped in both.
    assert fused_scale == unfused_scale == clean_scale / 2
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters()):
        assert torch.isfinite(p).all(), name
        # fused == unfused to a few ulps (the fused kernel rounds the bias update once
        # differently)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=name)

    def distance(a, b):
        return sum((x - y).double().norm() ** 2 for x, y in zip(a.parameters(),
                                                                b.parameters())) ** 0.5
    # As if the overflowing batch had never come: far closer to training on b1, b3 than to
    # training on b1, b2, b3 (what remains is b3's fp16 gradients rounded at half the scale).
    assert distance(fused, without_b2) < 1e-3 * distance(fused, with_b2)
    assert distance(fused, model) > 100 * distance(fused, without_b2)  # it did train


def test_train_one_epoch_normalises_uint8_batches_on_the_device():
    # --fast-decode's uint8 batches train exactly as the same batches normalised in the
    # worker would (fp32, so bit for bit).
    torch.manual_seed(1)
    model = ResNeXt(50, groups=2, width_per_group=4, num_classes=2)
    model.to(memory_format=torch.channels_last)
    as_uint8 = _batches(2)
    as_float = [(Normalize()(x), y) for x, y in as_uint8]
    a, _ = _train(model, as_uint8, fused=False, amp=None)
    b, _ = _train(model, as_float, fused=False, amp=None)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.conv1.weight, model.conv1.weight)


@pytest.mark.slow
def test_compiled_inference_pads_a_smaller_last_batch_instead_of_recompiling():
    from torch._dynamo.utils import counters

    from resnext.inference import InferenceModel
    from resnext.runtime import compile_available
    if not compile_available(torch.device("cpu"))[0]:
        pytest.skip("torch.compile cannot run here")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(2)
    net = ResNeXt(50, groups=2, width_per_group=4, num_classes=2).eval()
    eager = InferenceModel(net, torch.device("cpu"))
    compiled = InferenceModel(torch.compile(net), torch.device("cpu"))
    prep = Preprocessing(32, 36)
    crops = torch.stack([prep.transform(normalize=False)(load_image(p)) for p in PHOTOS[:7]])
    with torch.no_grad():
        full, last = compiled(crops[:4]), compiled(crops[4:])
        expected = eager(crops)
    assert last.shape == (3, 2)  # the padding's rows are dropped
    assert counters["stats"]["unique_graphs"] == 1  # no second compilation for 3 images
    torch.testing.assert_close(torch.cat([full, last]), expected, rtol=1e-4, atol=1e-4)
    assert compiled.pad_to == 4 and not eager._pads  # an eager net is never padded


def test_select_kernels_for_train_and_evaluate(monkeypatch):
    # --deterministic in either script: deterministic algorithms, no cuDNN autotuning, and
    # the cuBLAS workspace that deterministic matmuls on CUDA require; else the autotuner.
    from resnext.runtime import select_kernels
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "x")  # so that the undo removes it again
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        select_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        select_kernels(False)  # a later run in the same process is not left deterministic
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
