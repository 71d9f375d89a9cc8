"""Unit taps: per-unit statistics of z and dL/dz equal plain autograd; idle taps change nothing."""

import copy
import pickle

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.taps import TAP_PREFIX, UnitTap, install_taps, mean_abs, per_unit, remove_taps, tap_point


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 6 * 6, 12)
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


LAYERS = ("conv", "fc1", "fc2")


def _model(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def _by_hand(model, batches):
    """Per batch and layer: z and dL/dz from forward hooks and retain_grad on the original model."""
    zs, grads = [], []
    for x, t in batches:
        seen = {}
        hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name, seen=seen: seen.__setitem__(name, o))
                 for name in LAYERS]
        loss = nn.functional.cross_entropy(model(x), t)
        for z in seen.values():
            z.retain_grad()
        loss.backward()
        for h in hooks:
            h.remove()
        zs.append({k: v.detach() for k, v in seen.items()})
        grads.append({k: v.grad for k, v in seen.items()})
    return zs, grads


def test_tracked_output_and_gradient_statistics_equal_plain_autograd():
    batches = _batches()
    zs, grads = _by_hand(_model(), batches)
    gm = lobster_fx.instrument(_model())
    taps = install_taps(gm)
    assert sorted(taps) == sorted(LAYERS)
    out_stat = taps.track(mean_abs, on="output")
    grad_stat = taps.track(lambda u: u.mean(1), on="grad")  # SeReNe's loss-based term: mean_b dL/dz_n
    for x, t in batches:
        nn.functional.cross_entropy(gm(x), t).backward()  # the user's loop, unchanged
    for name in LAYERS:
        dim = taps[name].channel_dim
        want_out = torch.stack([per_unit(z[name], dim).abs().mean(1) for z in zs]).double().mean(0).float()
        want_grad = torch.stack([per_unit(g[name], dim).mean(1) for g in grads]).double().mean(0).float()
        assert torch.equal(out_stat.values()[name], want_out), name
        assert torch.equal(grad_stat.values()[name], want_grad), name
        assert out_stat.calls[name] == grad_stat.calls[name] == len(batches)
    assert out_stat.values()["conv"].shape == (4,) and grad_stat.values()["fc1"].shape == (12,)


def test_keep_all_in_eval_mode_gives_each_batchs_outputs():
    """NEq's input: every unit's outputs over a validation subset, under eval() (the other graph)."""
    batches = _batches(2)
    model = _model().eval()
    zs, _ = _by_hand(model, batches)
    gm = lobster_fx.instrument(_model()).eval()
    taps = install_taps(gm)
    outputs = taps.track(lambda u: u.clone(), on="output", keep="all")
    with torch.no_grad():
        for x, _ in batches:
            gm(x)
    for name in LAYERS:
        got = outputs.values()[name]
        assert len(got) == 2
        for value, z in zip(got, zs):
            assert torch.equal(value, per_unit(z[name], taps[name].channel_dim))
    outputs.reset()
    assert outputs.values() == {}


def _step(gm, x, t):
    gm.zero_grad(set_to_none=True)
    out = gm(x)
    nn.functional.cross_entropy(out, t).backward()
    return out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters()}


def _bit_identical(a, b):
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_idle_taps_leave_outputs_and_gradients_bit_identical():
    (x, t), = _batches(1)
    plain = lobster_fx.instrument(_model())
    tapped = lobster_fx.instrument(_model())
    with torch.no_grad():  # a pruned model: the masks multiply
        for gm in (plain, tapped):
            lobster_fx.masks(gm)["fc1.weight"][:, ::3] = 0
    taps = install_taps(tapped)
    assert _bit_identical(_step(plain, x, t), _step(tapped, x, t))  # installed, nobody listening
    stat = taps.track(mean_abs, on="grad")
    assert _bit_identical(_step(plain, x, t), _step(tapped, x, t))  # listening: the gradient is only read
    taps.disable()
    assert _bit_identical(_step(plain, x, t), _step(tapped, x, t))
    assert stat.calls == {name: 1 for name in LAYERS}  # disabled: not called
    taps.enable()
    stat.close()
    assert all(tap._idle for tap in taps.values())
    assert _bit_identical(_step(plain, x, t), _step(tapped, x, t))
    assert sorted(tapped.state_dict()) == sorted(plain.state_dict())  # taps hold no state
    plain.eval(), tapped.eval()
    assert torch.equal(plain(x), tapped(x))


def test_handles_remove_and_install_twice_returns_the_same_taps():
    gm = lobster_fx.instrument(_model())
    taps = install_taps(gm)
    again = install_taps(gm)
    assert all(again[k] is taps[k] for k in taps)
    assert sum(n.target is tap_point for n in gm.graph.nodes) == 3
    seen = []
    handle = taps["fc2"].on_output(lambda z, tap: seen.append(tuple(z.shape)))
    gm(torch.randn(2, 2, 6, 6))
    handle.remove()
    handle.remove()  # twice is harmless
    gm(torch.randn(2, 2, 6, 6))
    assert seen == [(2, 3)] and taps["fc2"]._idle


def test_remove_gives_back_the_graph_and_slim_works_after():
    model = _model().eval()
    gm = lobster_fx.instrument(model)
    code = {mode: gm.mode_graphs[mode].python_code("self").src for mode in (True, False)}
    taps = install_taps(gm)
    taps.remove()
    assert not any(k.startswith(TAP_PREFIX) for k in dir(gm)) and len(taps) == 0
    assert {mode: gm.mode_graphs[mode].python_code("self").src for mode in (True, False)} == code
    remove_taps(gm)  # nothing left: no error
    x = torch.randn(4, 2, 6, 6)
    slim = lobster_fx.slim(lobster_fx.fold(gm.eval()), (x,))
    assert torch.allclose(slim(x), model(x), atol=1e-6)


def test_copies_and_pickles_keep_the_taps_but_not_the_listeners():
    gm = lobster_fx.instrument(_model())
    taps = install_taps(gm)
    stat = taps.track(mean_abs)
    x = torch.randn(2, 2, 6, 6)
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        tap = getattr(clone, f"{TAP_PREFIX}0")
        assert isinstance(tap, UnitTap) and tap._idle and tap._output_fns == []
        assert torch.equal(clone(x), gm(x))
        assert all(sum(n.target is tap_point for n in g.nodes) == 3 for g in clone.mode_graphs.values())
        clone_taps = install_taps(clone)  # the copy's own taps, found again
        assert clone_taps["conv"] is tap
        on_clone = clone_taps.track(mean_abs)
        clone(x)
        assert on_clone.calls == {name: 1 for name in LAYERS}
    assert stat.calls["conv"] == 2  # only the original's taps were called


def test_refusals_name_the_problem():
    with pytest.raises(TypeError, match="not produced by lobster_fx.graph.instrument"):
        install_taps(_model())
    gm = lobster_fx.instrument(nn.Sequential(nn.Embedding(5, 3)))
    with pytest.raises(ValueError, match="no Linear / Conv layer with a masked weight"):
        install_taps(gm)
    taps = install_taps(lobster_fx.instrument(_model()))
    with pytest.raises(ValueError, match="on must be 'output' or 'grad'"):
        taps.track(mean_abs, on="input")
    with pytest.raises(ValueError, match="keep must be"):
        taps.track(mean_abs, keep="max")
    with pytest.raises(TypeError, match="reduce must be a callable"):
        taps.track(None)
