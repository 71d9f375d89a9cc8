"""Reference models from the LOBSTER paper, all traceable by ``torch.fx.symbolic_trace``.

* :class:`LeNet300` - the 784-300-100-10 MLP (266,610 parameters).
* :class:`LeNet5` - the Caffe LeNet-5 (431,080 parameters).
* :class:`ResNet32` - the CIFAR ResNet-32 with option-A shortcuts (464,154 parameters).

No forward pass branches on tensor values or converts a tensor size to ``int``,
so FX sees the whole computation and the traced graph matches the eager model.

Example::

    >>> import torch
    >>> from lobster_fx.models import get_model
    >>> model = get_model("lenet300")
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> gm = torch.fx.symbolic_trace(model)
    >>> torch.equal(gm(torch.ones(2, 784)), model(torch.ones(2, 784)))
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeNet300", "LeNet5", "ResNet32", "MODELS", "get_model"]


class LeNet300(nn.Module):
    """LeNet-300-100: fully connected ``in_features``-300-100-``num_classes`` with ReLU.

    The input is flattened, so ``N x 1 x 28 x 28`` and ``N x 784`` give the same
    result. ``in_features`` lets the same architecture run on other image sizes
    (64 for the 8x8 digits).

    Example::

        >>> import torch
        >>> model = LeNet300()
        >>> sum(p.numel() for p in model.parameters())
        266610
        >>> model(torch.zeros(3, 784)).shape
        torch.Size([3, 10])
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant: conv(20, 5x5) - pool - conv(50, 5x5) - pool - fc 500 - fc.

    No padding, 2x2 max pooling, ReLU after both convolutions and after ``fc1``.
    Needs 28 x 28 inputs: the two conv/pool stages leave 50 x 4 x 4 = 800 features.

    Example::

        >>> import torch
        >>> model = LeNet5()
        >>> sum(p.numel() for p in model.parameters())
        431080
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample spatially, zero-pad channels.

    The pad widths are plain ints fixed at construction, so FX records a constant
    ``F.pad`` instead of tracing a ``x.size(1)`` computation.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dims first: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with a residual connection (ReLU after the sum)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    """CIFAR ResNet-32 (He et al. 2016, section 4.2) with option-A shortcuts.

    A 3x3 stem with 16 channels, then three stages of 5 :class:`BasicBlock` with
    16/32/64 channels (stages 2 and 3 start with stride 2), global average pooling
    and a linear classifier. Convolutions and the classifier weight use Kaiming
    normal init, as in the standard CIFAR implementation.

    Example::

        >>> import torch
        >>> model = ResNet32().eval()
        >>> sum(p.numel() for p in model.parameters())
        464154
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    BLOCKS_PER_STAGE = 5

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, stride=1)
        self.layer2 = self._make_stage(16, 32, stride=2)
        self.layer3 = self._make_stage(32, 64, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @classmethod
    def _make_stage(cls, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(cls.BLOCKS_PER_STAGE - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # adaptive pooling instead of avg_pool2d(out, out.size(3)): no size read in forward
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


MODELS: dict[str, type[nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet32": ResNet32,
}


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered in :data:`MODELS` as ``name`` (case-insensitive).

    Keyword arguments go to the model's constructor.

    Example::

        >>> get_model("LeNet5", num_classes=100).fc2.out_features
        100
    """
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; valid names: {valid}") from None
    return cls(**kwargs)
