"""lobster-fx train / export on the user's model and data: a factory in a user package, an image folder
made here, torchvision's resnet18; export without the data; --device cuda refused without CUDA."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from lobster_fx.cli import EXIT_ERROR, main

PKG = "lfx_test_userpkg"  # a name no installed package has
FACTORY = f"{PKG}.models:small_cnn"
CLASSES = ("cat", "dog")

FACTORY_SOURCE = '''
from torch import nn


def small_cnn(num_classes=2, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(width * 16, 32), nn.ReLU(), nn.Linear(32, num_classes))


def not_a_model(**kwargs):
    return "a string"


def broken(**kwargs):
    raise RuntimeError("no weights here")
'''


def _small_cnn(num_classes: int = 2, width: int = 8) -> nn.Module:
    """The factory's model, written out again here (the test's independent copy)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(width * 16, 32), nn.ReLU(), nn.Linear(32, num_classes))


def make_image_folder(root: Path, per_class: int = 20, size: tuple[int, int] = (20, 24)) -> None:
    """``root/cat/*.png`` (red-ish) and ``root/dog/*.png`` (blue-ish), noisy, ``size`` = (w, h)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size[1], size[0], 3)).astype(np.uint8)
            pixels[..., 2 * c] += 120
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a user package (PKG) and an image folder (imgs/), as the current directory."""
    root = tmp_path_factory.mktemp("user")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "models.py").write_text(FACTORY_SOURCE)
    make_image_folder(root / "imgs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the CLI imports PKG from the current directory, as python -m does
        yield root
    for name in [n for n in sys.modules if n == PKG or n.startswith(f"{PKG}.")]:
        del sys.modules[name]


def _folded(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An instrumented state dict as the plain model's: every ``X_mask`` multiplied into ``X``."""
    plain = {k: v.clone() for k, v in weights.items() if not k.endswith("_mask")}
    for key, mask in weights.items():
        if key.endswith("_mask"):
            plain[key[: -len("_mask")]] *= mask
    return plain


def _onnx_vs_torch(path: Path, model: nn.Module, shape: tuple[int, ...]) -> float:
    """Largest |ONNX Runtime - torch| on a random batch of 3."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    return float(np.abs(got - want).max())


@pytest.fixture(scope="module")
def factory_run(workdir):
    """3 epochs of the user's factory on the image folder, resized to 16 x 16."""
    out = workdir / "run"
    args = ["train", "--model", FACTORY, "--model-kwargs", '{"num_classes": 2}', "--data", "imagefolder:imgs",
            "--image-size", "16", "--epochs", "3", "--batch-size", "8", "--lr", "0.05", "--lmbda", "1e-3",
            "--pwe", "1", "--threads", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out / "checkpoint.pt"


def test_factory_on_an_image_folder_records_model_and_data(factory_run):
    state = torch.load(factory_run, weights_only=True)
    assert state["config"]["model"] == FACTORY and state["config"]["model_kwargs"] == {"num_classes": 2}
    assert state["config"]["dataset"] == "imagefolder:imgs" and state["config"]["image_size"] == 16
    info = state["data_info"]
    assert info["input_shape"] == [3, 16, 16] and info["num_classes"] == 2 and info["classes"] == list(CLASSES)
    assert [e["epoch"] for e in state["log"]] == [1, 2, 3]
    # 40 images: 4 validation, 4 test (10% each), so the errors are multiples of 25%
    assert all(e["val_error"] % 25 == 0 and e["test_error"] % 25 == 0 for e in state["log"]), state["log"]


def test_export_of_the_factory_checkpoint_needs_no_data(factory_run, workdir, capsys):
    onnx_path = workdir / "factory.onnx"
    shutil.move(workdir / "imgs", workdir / "imgs-moved")  # export must not read the data
    try:
        assert main(["export", str(factory_run), str(onnx_path)]) == 0
    finally:
        shutil.move(workdir / "imgs-moved", workdir / "imgs")
    model = _small_cnn(num_classes=2)
    model.load_state_dict(_folded(torch.load(factory_run, weights_only=True)["model"]))
    assert _onnx_vs_torch(onnx_path, model, (3, 16, 16)) < 1e-4


@pytest.mark.parametrize("kind", ["plain", "instrumented", "checkpoint"])
def test_export_from_model_spec_and_state_dict(factory_run, workdir, kind):
    weights = torch.load(factory_run, weights_only=True)["model"]
    model = _small_cnn(num_classes=2)
    model.load_state_dict(_folded(weights))
    if kind == "plain":
        with torch.no_grad():
            model[0].weight[:2] = 0.0  # some zeros of the user's own
        path = workdir / "plain.pt"
        torch.save(model.state_dict(), path)
    elif kind == "instrumented":
        path = workdir / "instrumented.pt"
        torch.save(weights, path)
    else:
        path = factory_run
    onnx_path = workdir / f"{kind}.onnx"
    assert main(["export", "--model", FACTORY, "--model-kwargs", '{"num_classes": 2}', "--state-dict", str(path),
                 "--input-shape", "3,16,16", str(onnx_path)]) == 0
    assert _onnx_vs_torch(onnx_path, model, (3, 16, 16)) < 1e-4


def test_state_dict_export_needs_model_and_input_shape(factory_run, workdir, capsys):
    for args in (["--state-dict", str(factory_run), "--input-shape", "3,16,16"],
                 ["--state-dict", str(factory_run), "--model", FACTORY]):
        assert main(["export", *args, str(workdir / "x.onnx")]) == EXIT_ERROR
        assert "--state-dict needs --model SPEC" in capsys.readouterr().err
    assert main(["export", "--model", FACTORY, "--model-kwargs", '{"num_classes": 3}', "--state-dict",
                 str(factory_run), "--input-shape", "3,16,16", str(workdir / "x.onnx")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{factory_run}: its weights do not fit model '{FACTORY}'" in err, err
    assert not (workdir / "x.onnx").exists()


def test_torchvision_resnet18_with_model_kwargs_trains_and_exports(workdir):
    out = workdir / "resnet18"
    assert main(["train", "--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 10}',
                 "--data", "imagefolder:imgs", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
                 "--lr", "0.01", "--fused-rule", "off", "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["data_info"]["input_shape"] == [3, 32, 32]
    onnx_path = workdir / "resnet18.onnx"
    assert main(["export", str(out / "checkpoint.pt"), str(onnx_path)]) == 0
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(_folded(state["model"]))
    assert model.fc.out_features == 10
    assert _onnx_vs_torch(onnx_path, model, (3, 32, 32)) < 1e-3


def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(workdir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    out = workdir / "cuda-run"
    assert main(["train", "--model", "lenet300", "--data", "digits", "--device", "cuda", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lobster-fx train: error: device 'cuda': CUDA is not available"), err
    assert "--device cpu" in err
    assert not out.exists()


@pytest.mark.parametrize(("spec", "message"), [
    ("lfx_no_such_module.models:make", "module 'lfx_no_such_module' not found"),
    (f"{PKG}.models:missing", f"module '{PKG}.models'"),
    (f"{PKG}.models:not_a_model", "returned a str, not a torch.nn.Module"),
    (f"{PKG}.models:broken", "raised RuntimeError: no weights here"),
    ("torchvision:no_such_net", "has no model 'no_such_net'"),
])
def test_bad_model_spec_is_one_line_naming_it_and_writes_nothing(workdir, capsys, spec, message):
    out = workdir / "bad-run"
    assert main(["train", "--model", spec, "--data", "imagefolder:imgs", "--image-size", "16", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and spec in err and message in err, err
    assert not out.exists()


def test_model_with_too_few_outputs_names_the_fix(workdir, capsys):
    out = workdir / "few"
    assert main(["train", "--model", FACTORY, "--model-kwargs", '{"num_classes": 1}', "--data", "imagefolder:imgs",
                 "--image-size", "16", "--epochs", "1", "--out", str(out), "--no-progress"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "returns 1 logits per input" in err and "has 2 classes" in err and '"num_classes": 2' in err, err
    assert not out.exists()


def test_model_kwargs_must_be_a_json_object(workdir, capsys):
    for text in ("{num_classes: 2}", "[2]"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--model", FACTORY, "--model-kwargs", text, "--out", str(workdir / "x")])
        assert exc.value.code == 2
        assert "--model-kwargs" in capsys.readouterr().err
