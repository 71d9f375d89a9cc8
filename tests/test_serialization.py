"""torch.save / torch.load of an instrumented module keeps both modes, masks and meta."""

import io

import torch
import torchvision

import lobster_fx


def test_pickle_roundtrip_keeps_train_and_eval_graphs_and_folds():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=3)  # stochastic depth: graphs differ by mode
    gm = lobster_fx.instrument(model)
    lobster_fx.masks(gm)["classifier.2.weight"][0].zero_()
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    for mode in (False, True, False):
        gm.train(mode)
        loaded.train(mode)
        with torch.set_grad_enabled(mode):
            torch.manual_seed(1)
            a = gm(x)
            torch.manual_seed(1)
            b = loaded(x)
        assert torch.equal(a, b), mode
    assert lobster_fx.masks(loaded).keys() == lobster_fx.masks(gm).keys()
    assert torch.equal(lobster_fx.masks(loaded)["classifier.2.weight"], lobster_fx.masks(gm)["classifier.2.weight"])
    folded = lobster_fx.fold(loaded).eval()
    loaded.eval()
    assert torch.equal(folded(x), loaded(x))
    assert not any("mask" in k for k in folded.state_dict())
