"""Parity of every transform, end to end: instrumented -> fold -> slim -> CSR -> ONNX.

LeNet-300, LeNet-5, ResNet-32 and torchvision's ResNet-18 (BatchNorm, residuals),
at 90-99% random sparsity plus whole dead units, as LOBSTER leaves them.
"""

import onnxruntime as ort
import pytest
import torch
import torchvision

import lobster_fx
from lobster_fx.models import LeNet5, LeNet300, ResNet32

CASES = [
    ("lenet300", lambda: LeNet300(), (1, 1, 28, 28), 0.98),
    ("lenet5", lambda: LeNet5(), (1, 1, 28, 28), 0.95),
    ("resnet32", lambda: ResNet32(), (1, 3, 32, 32), 0.90),
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32), 0.90),
]


def _sparsify(gm, sparsity, dead_fraction=0.3, seed=0):
    """Random unstructured sparsity plus whole dead output units in every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mask in lobster_fx.masks(gm).items():
            mask.copy_((torch.rand(mask.shape, generator=g) >= sparsity).to(mask.dtype))
            if name.endswith("weight") and mask.dim() >= 2 and mask.shape[0] > 10:
                dead = torch.rand(mask.shape[0], generator=g) < dead_fraction
                mask[dead] = 0
                bias = name[: -len("weight")] + "bias"
                if bias in lobster_fx.masks(gm):
                    lobster_fx.masks(gm)[bias][dead[: lobster_fx.masks(gm)[bias].numel()]] = 0
        for m in gm.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.bias.data.uniform_(-0.2, 0.2, generator=g)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name,make,shape,sparsity", CASES, ids=[c[0] for c in CASES])
def test_every_transform_keeps_outputs(name, make, shape, sparsity, tmp_path):
    torch.manual_seed(0)
    gm = lobster_fx.instrument(make()).eval()
    _sparsify(gm, sparsity)
    x = torch.randn(4, *shape[1:])
    with torch.no_grad():
        ref = gm(x)
        folded = lobster_fx.fold(gm).eval()
        assert torch.equal(folded(x), ref)  # fold: no arithmetic changed
        slimmed = lobster_fx.slim(folded, (x[:1],))
        report = slimmed.meta["lobster_slim"]
        assert report.params_after < report.params_before
        assert _rel_err(slimmed(x), ref) <= 1e-5
        assert slimmed(x).shape == ref.shape
        csr = lobster_fx.to_sparse_csr(slimmed, min_sparsity=0.0)
        assert _rel_err(csr(x), ref) <= 1e-5
    report = lobster_fx.export_onnx(gm, x[:1], tmp_path / f"{name}.onnx", sparse=True, slim=True)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _rel_err(torch.from_numpy(onnx_out), ref) <= 1e-5
    assert report.file_bytes < report.dense_bytes
