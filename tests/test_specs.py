"""Model and data specs: parsing, user factories and data functions, and their errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from lobster_fx.cli import main
from lobster_fx.data import splits_from_user
from lobster_fx.specs import build_model_from_spec, parse_data_spec, parse_model_spec
from lobster_fx.train import TrainConfig, load_splits, train

PKG = "lfx_test_specpkg"

SOURCE = '''
import torch
from torch.utils.data import TensorDataset


def tensors(n=30, features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    def part(m):
        x = torch.randn(m, features, generator=g)
        return x, (x[:, 0] > 0).long()
    return part(n), part(10), part(10)


def datasets():
    x = torch.arange(12.0).reshape(6, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return {"train": TensorDataset(x, y), "val": TensorDataset(x[:3], y[:3]), "test": TensorDataset(x[3:], y[3:])}


def two_parts():
    x = torch.zeros(4, 2)
    return (x, torch.zeros(4).long()), (x, torch.zeros(4).long())


def float_labels():
    part = (torch.zeros(4, 2), torch.zeros(4))
    return part, part, part


def fails():
    raise FileNotFoundError("no such folder: /data/x")


def token_ids(n=40):
    g = torch.Generator().manual_seed(0)
    def part(m):
        x = torch.randint(0, 20, (m, 6), generator=g)
        return x, (x[:, 0] >= 10).long()
    return part(n), part(10), part(10)


class BagOfWords(torch.nn.Module):
    def __init__(self, vocab=20, dim=8, num_classes=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, num_classes)

    def forward(self, ids):
        return self.fc(self.embed(ids).mean(1))


def bn_mlp(in_features=5, num_classes=2):
    return torch.nn.Sequential(torch.nn.Linear(in_features, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, num_classes))


def mlp(in_features=5, num_classes=2):
    return torch.nn.Sequential(torch.nn.Linear(in_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes))
'''
NEEDS_MISSING = "import lfx_surely_not_installed\n"


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    (tmp_path / PKG).mkdir()
    (tmp_path / PKG / "__init__.py").write_text(SOURCE)
    (tmp_path / PKG / "needs_missing.py").write_text(NEEDS_MISSING)
    monkeypatch.chdir(tmp_path)  # imported from the current directory, as python -m does
    yield PKG
    for name in [n for n in sys.modules if n == PKG or n.startswith(f"{PKG}.")]:
        del sys.modules[name]


@pytest.mark.parametrize(("spec", "parsed"), [
    ("LeNet5", ("builtin", "lenet5")),
    ("torchvision:resnet18", ("torchvision", "resnet18")),
    ("TIMM:resnet10t", ("timm", "resnet10t")),
    ("my_pkg.models:make_net", ("factory", "my_pkg.models:make_net")),
])
def test_model_specs_parse(spec, parsed):
    assert parse_model_spec(spec) == parsed


@pytest.mark.parametrize(("spec", "parsed"), [
    ("MNIST", ("builtin", "mnist")),
    ("imagefolder:/data/My Photos", ("imagefolder", "/data/My Photos")),
    ("pkg.data:load", ("function", "pkg.data:load")),
])
def test_data_specs_parse(spec, parsed):
    assert parse_data_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["lenet", "resnet18", "pkg.models:", "pkg-x:make", "torchvision:", ":make"])
def test_bad_model_specs_list_the_forms(spec):
    with pytest.raises(ValueError, match=r"unknown model .*torchvision:NAME, timm:NAME or package.module:factory"):
        parse_model_spec(spec)


def test_config_keeps_spec_case_and_lowers_builtin_names():
    config = TrainConfig(model="MyPkg.Models:Net", dataset="imagefolder:Photos", image_size=8)
    assert (config.model, config.dataset) == ("MyPkg.Models:Net", "imagefolder:Photos")
    with pytest.raises(ValueError, match=r"TrainConfig.dataset: unknown dataset 'cifar10'; valid: .*imagefolder:DIR"):
        TrainConfig(dataset="cifar10")


def test_timm_spec_builds_the_timm_model():
    pytest.importorskip("timm")
    model = build_model_from_spec("timm:resnet10t", {"num_classes": 3})
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="timm .* has no model 'no_such_net'"):
        build_model_from_spec("timm:no_such_net")


def test_factory_kwargs_reach_the_factory(userpkg):
    model = build_model_from_spec(f"{userpkg}:mlp", {"in_features": 7, "num_classes": 4})
    assert (model[0].in_features, model[2].out_features) == (7, 4)
    with pytest.raises(ValueError, match=rf"model '{userpkg}:mlp': building it with .* raised TypeError"):
        build_model_from_spec(f"{userpkg}:mlp", {"colour": "red"})


def test_data_function_of_tensors_trains(userpkg, tmp_path):
    config = TrainConfig(model=f"{userpkg}:mlp", dataset=f"{userpkg}:tensors", data_kwargs={"n": 40},
                         epochs=2, batch_size=8, lr=0.1, pwe=1, progress=False, threads=1, out_dir=str(tmp_path / "r"))
    splits = load_splits(config)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    assert (splits.mean, splits.std) == (0.0, 1.0)  # used as given
    result = train(config)
    assert len(result.log) == 2
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["data_info"]["input_shape"] == [5] and state["data_info"]["num_classes"] == 2


def test_data_function_of_datasets_is_read_into_memory(userpkg):
    splits = load_splits(TrainConfig(model="lenet300", dataset=f"{userpkg}:datasets"))
    assert splits.train.x.tolist() == torch.arange(12.0).reshape(6, 2).tolist()
    assert splits.val.y.tolist() == [0, 1, 2] and splits.test.y.tolist() == [0, 1, 2]
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64


@pytest.mark.parametrize(("function", "message"), [
    ("two_parts", "must return (train, val, test) or a dict"),
    ("float_labels", "train labels must be a 1-D integer tensor of class indices"),
    ("fails", "raised FileNotFoundError: no such folder: /data/x"),
    ("missing", "has no attribute 'missing'"),
])
def test_data_function_contract_errors_name_the_spec(userpkg, function, message):
    spec = f"{userpkg}:{function}"
    with pytest.raises(ValueError) as exc:
        load_splits(TrainConfig(model="lenet300", dataset=spec))
    assert spec in str(exc.value) and message in str(exc.value), str(exc.value)


def test_user_splits_with_a_missing_key_or_mismatched_shapes():
    part = (torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="without 'test'"):
        splits_from_user({"train": part, "val": part}, "m:f")
    with pytest.raises(ValueError, match=r"val inputs have shape \(3,\), train inputs \(2,\)"):
        splits_from_user((part, (torch.zeros(3, 3), part[1]), part), "m:f")
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        splits_from_user((part, (torch.zeros(3, 2), torch.tensor([0, 1])), part), "m:f")
    dataset = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    assert len(splits_from_user((dataset, part, part), "m:f").train) == 3


def test_a_factory_module_with_a_missing_dependency_says_so(userpkg):
    with pytest.raises(ValueError, match=r"importing '.*needs_missing' failed: it imports "
                                         r"'lfx_surely_not_installed', which is not installed"):
        build_model_from_spec(f"{userpkg}.needs_missing:make")


def test_token_id_inputs_stay_integers_through_training_and_export(userpkg, tmp_path):
    import onnx

    out = tmp_path / "run"
    assert main(["train", "--model", f"{userpkg}:BagOfWords", "--data", f"{userpkg}:token_ids", "--epochs", "2",
                 "--batch-size", "8", "--lr", "0.1", "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    info = torch.load(out / "checkpoint.pt", weights_only=True)["data_info"]
    assert (info["input_shape"], info["input_dtype"]) == ([6], "int64")
    assert main(["export", str(out / "checkpoint.pt"), str(tmp_path / "bow.onnx")]) == 0
    graph_input = onnx.load(str(tmp_path / "bow.onnx")).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_batch_norm_model_skips_a_last_batch_of_one(userpkg):
    # 17 training samples in batches of 8: the last batch holds 1, on which batch norm cannot train
    config = TrainConfig(model=f"{userpkg}:bn_mlp", dataset=f"{userpkg}:tensors", data_kwargs={"n": 17},
                         epochs=1, batch_size=8, lr=0.1, progress=False, threads=1)
    result = train(config)
    assert len(result.log) == 1 and result.log[0]["train_loss"] > 0
