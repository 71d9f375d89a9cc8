"""Reference models: sizes, layer names, output shapes and FX traceability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lobster_fx.models import MODELS, LeNet5, LeNet300, ResNet32, get_model

# name -> (constructor kwargs, input shape, parameter count from the LOBSTER paper setups)
CASES = {
    "lenet300": ({}, (4, 1, 28, 28), 266_610),
    "lenet5": ({}, (4, 1, 28, 28), 431_080),
    "resnet32": ({}, (2, 3, 32, 32), 464_154),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_count_and_output_shape(name: str) -> None:
    kwargs, shape, count = CASES[name]
    model = get_model(name, **kwargs).eval()
    assert n_params(model) == count
    assert model(torch.randn(shape)).shape == (shape[0], 10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_symbolic_trace_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    kwargs, shape, _ = CASES[name]
    model = get_model(name, **kwargs).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_resnet32_trace_matches_eager_in_train_mode() -> None:
    # Train-mode BatchNorm uses batch statistics; the graph must still agree.
    torch.manual_seed(0)
    model, twin = ResNet32().train(), ResNet32().train()
    twin.load_state_dict(model.state_dict())
    gm = torch.fx.symbolic_trace(twin)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_resnet32_trace_has_no_size_calls() -> None:
    gm = torch.fx.symbolic_trace(ResNet32())
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "size" not in targets
    assert any("pad" in t for t in targets)  # option-A shortcuts are in the graph


def test_layer_names() -> None:
    assert {n for n, _ in LeNet300().named_children()} == {"fc1", "fc2", "fc3"}
    assert {n for n, _ in LeNet5().named_children()} == {"conv1", "conv2", "fc1", "fc2"}


def test_lenet300_flattens_its_input() -> None:
    model = LeNet300()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x.reshape(3, 784)))


def test_lenet300_in_features() -> None:
    model = LeNet300(num_classes=10, in_features=64)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_lenet5_caffe_layer_shapes() -> None:
    model = LeNet5(num_classes=7, in_channels=3)
    assert model.conv1.weight.shape == (20, 3, 5, 5)
    assert model.conv2.weight.shape == (50, 20, 5, 5)
    assert model.fc1.weight.shape == (500, 800)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_resnet32_structure() -> None:
    model = ResNet32(num_classes=100, in_channels=1)
    assert model.conv1.weight.shape == (16, 1, 3, 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31  # 1 stem + 3 stages x 5 blocks x 2; +1 linear = 32 layers
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    # Option-A shortcuts carry no parameters: same count as the 3-channel model minus the stem.
    assert n_params(model) == 464_154 - 2 * 16 * 3 * 3 + 90 * 64 + 90


def test_resnet32_kaiming_init() -> None:
    torch.manual_seed(0)
    w = ResNet32().layer3[1].conv1.weight  # fan_in = 64 * 9
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(w.std().item() - expected_std) / expected_std < 0.05


def test_get_model_registry() -> None:
    assert set(MODELS) == {"lenet300", "lenet5", "resnet32"}
    assert isinstance(get_model("ResNet32"), ResNet32)
    assert get_model("lenet5", num_classes=3).fc2.out_features == 3


def test_get_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*lenet300, lenet5, resnet32"):
        get_model("vgg16")
