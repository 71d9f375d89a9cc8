"""sparsity_report against counts made by hand."""

import torch

import lobster_fx
from lobster_fx.models import LeNet300


def test_report_counts_and_ratio():
    gm = lobster_fx.instrument(LeNet300())
    m = lobster_fx.masks(gm)
    with torch.no_grad():
        m["fc1.weight"][:, :392].zero_()  # half of fc1's weights
        m["fc3.bias"].zero_()
    rep = lobster_fx.sparsity_report(gm)
    by_name = {layer.name: layer for layer in rep.layers}
    assert by_name["fc1"].numel == 784 * 300 + 300
    assert by_name["fc1"].nonzero == 392 * 300 + 300 - int((gm.get_parameter("fc1.bias") == 0).sum())
    assert by_name["fc3"].nonzero == 100 * 10
    assert rep.total == 266_610
    assert abs(rep.compression_ratio - rep.total / rep.nonzero) < 1e-12
    table = rep.table()
    assert "fc1" in table and f"{rep.compression_ratio:.2f}x" in table
    d = rep.to_dict()
    assert d["layers"][0]["remaining_pct"] == by_name["fc1"].remaining_pct
