"""Sparsifier: one object for masks, rule and plateau schedule, in a plain loop."""

import io

import pytest
import torch
import torch.nn.functional as F

from lobster_fx.methods.l2 import L2
from lobster_fx.methods.lobster import Lobster
from lobster_fx.methods.serene import SeReNe
from lobster_fx.sparsifier import STATE_FORMAT, Sparsifier


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    return x, x[:, :3].argmax(1)


X, Y = _data()


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _val(model):
    return float(F.cross_entropy(model(X[64:]), Y[64:]))


def _epoch(gm, opt):
    for i in range(0, 64, 16):
        opt.zero_grad()
        F.cross_entropy(gm(X[i:i + 16]), Y[i:i + 16]).backward()
        opt.step()


def _run(sp, gm, opt, epochs):
    for _ in range(epochs):
        _epoch(gm, opt)
        sp.step()  # val_loss None: the sparsifier evaluates


def _start(**kw):
    sp = Sparsifier(_val, lmbda=1e-3, twt=0.05, pwe=1, threshold=0.3, **kw)
    gm = sp.prepare(_net())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    sp.attach(opt)
    return sp, gm, opt


def test_plain_loop_prunes_and_folds():
    sp, gm, opt = _start()
    _run(sp, gm, opt, 6)
    assert isinstance(sp.rule, Lobster) and sp.history
    zeros = sum(int((m == 0).sum()) for m in sp.masks.values())
    assert zeros == sp.history[-1]["total"] - sp.history[-1]["remaining"] > 0
    folded = sp.fold()
    assert not any(k.endswith("_mask") for k in folded.state_dict())
    w = gm.get_parameter("0.weight") * sp.masks["0.weight"]
    torch.testing.assert_close(folded.state_dict()["0.weight"], w, rtol=0, atol=0)
    gm.eval()
    folded.eval()
    torch.testing.assert_close(folded(X), gm(X), rtol=0, atol=0)


def test_state_dict_resumes_a_plain_loop_exactly():
    # uninterrupted: 8 epochs
    full, full_gm, full_opt = _start()
    _run(full, full_gm, full_opt, 8)
    # interrupted after 4: weights, optimizer and the sparsifier's state through torch.save / weights_only load
    a, gm, opt = _start()
    _run(a, gm, opt, 4)
    assert a.history, "the first half should prune"
    buf = io.BytesIO()
    torch.save({"model": gm.state_dict(), "opt": opt.state_dict(), "sparsifier": a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["sparsifier"]["format"] == STATE_FORMAT
    b = Sparsifier(_val, lmbda=1e-3, twt=0.05, pwe=1, threshold=0.3)
    gm_b = b.prepare(_net())
    gm_b.load_state_dict({k: v for k, v in saved["model"].items() if not k.endswith("_mask")})
    assert all(bool((m == 1).all()) for m in b.masks.values())  # masks come from the sparsifier's state
    opt_b = torch.optim.SGD(gm_b.parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(saved["opt"])
    b.load_state_dict(saved["sparsifier"])  # masks now, rule and schedule at attach
    for k, m in a.masks.items():
        assert torch.equal(b.masks[k], m), k
    b.attach(opt_b)
    assert b.rule.steps == a.rule.steps == 16 and b.history == a.history
    _run(b, gm_b, opt_b, 4)
    assert b.history == full.history
    for (k, v), w in zip(gm_b.state_dict().items(), full_gm.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_detach_keeps_the_state_for_the_next_optimizer():
    sp, gm, opt = _start()
    _run(sp, gm, opt, 4)
    history, steps = list(sp.history), sp.rule.steps
    sp.detach()
    assert sp.rule is None and sp.history == history
    w = gm.get_parameter("0.weight").detach().clone()
    opt.zero_grad()
    F.cross_entropy(gm(X[:16]), Y[:16]).backward()
    opt.step()  # a plain step now: no term, no pinning
    opt2 = torch.optim.SGD(gm.parameters(), lr=0.1)
    sp.attach(opt2)
    assert sp.rule.steps == steps and sp.history == history
    assert not torch.equal(w, gm.get_parameter("0.weight"))


def test_methods_and_their_rules():
    sp, gm, _ = _start(method="serene")
    assert isinstance(sp.rule, SeReNe) and sp.pruner.granularity == "neuron"
    assert sp.pruner.score_fn is None and sp.state_dict()["options"]["score_fn"] is None  # the default
    sp.detach()
    sp, gm, _ = _start(method="serene", score_fn="norm")
    assert sp.pruner.score_fn == "norm" and sp.state_dict()["options"]["score_fn"] == "norm"
    sp.detach()
    # L2 with lr 0: one step is w <- (1 - lmbda) w, written out
    sp = Sparsifier(_val, method="l2", lmbda=0.25)
    gm = sp.prepare(_net())
    opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    sp.attach(opt)
    assert isinstance(sp.rule, L2)
    w0 = gm.get_parameter("2.weight").detach().clone()
    F.cross_entropy(gm(X), Y).backward()
    opt.step()
    torch.testing.assert_close(gm.get_parameter("2.weight"), 0.75 * w0)


def test_bad_input_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="method must be one of"):
        Sparsifier(method="magnitude")
    with pytest.raises(ValueError, match="pwe"):
        Sparsifier(pwe=0)
    with pytest.raises(TypeError, match="evaluate"):
        Sparsifier("not callable")
    with pytest.raises(ValueError, match="granularity"):
        Sparsifier(granularity="row")
    with pytest.raises(ValueError, match="unknown unit score 'l1'"):
        Sparsifier(method="serene", score_fn="l1")
    with pytest.raises(ValueError, match="score_fn scores units"):
        Sparsifier(method="lobster", score_fn="norm")
    sp = Sparsifier()
    with pytest.raises(RuntimeError, match="prepare"):
        sp.attach(torch.optim.SGD(_net().parameters(), lr=0.1))
    gm = sp.prepare(_net())
    with pytest.raises(TypeError, match="evaluate"):
        sp.attach(torch.optim.SGD(gm.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="attach"):
        sp.step(1.0)

    src, src_gm, src_opt = _start()
    _run(src, src_gm, src_opt, 4)
    good = src.state_dict()
    target, gm, _ = _start()
    before = {k: v.clone() for k, v in target.masks.items()}
    rule_before = target.rule.state_dict()
    with pytest.raises(ValueError, match="not a Sparsifier state"):
        target.load_state_dict({"masks": {}})
    with pytest.raises(ValueError, match="method 'serene' -> 'lobster'"):
        target.load_state_dict({**good, "options": {**good["options"], "method": "serene"}})
    with pytest.raises(ValueError, match="mask names differ"):
        target.load_state_dict({**good, "masks": {"0.weight": good["masks"]["0.weight"]}})
    bad_shape = dict(good["masks"], **{"0.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"mask '0.weight' has shape \(3, 3\)"):
        target.load_state_dict({**good, "masks": bad_shape})
    for k, v in target.masks.items():
        assert torch.equal(v, before[k]), k
    assert target.rule.state_dict() == rule_before and not target.history
