"""NEq (issue 16): the measurement by hand, exact freezing under any optimizer, state, bad input, DDP."""

import functools
import io

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.methods.lobster import Lobster
from lobster_fx.methods.neq import NEq

# --- helpers ---------------------------------------------------------------------------------


def _chain(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 6), nn.ReLU(), nn.Linear(6, 3))


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _epoch(gm, opt, x, y, batch=8):
    for i in range(0, x.shape[0], batch):
        opt.zero_grad()
        nn.functional.cross_entropy(gm(x[i:i + batch]), y[i:i + batch]).backward()
        opt.step()


# --- phi, dphi and the velocity by hand --------------------------------------------------------


def _hand_outputs(x, w1, b1, w2, b2):
    z1 = x @ w1.T + b1
    z2 = torch.relu(z1) @ w2.T + b2
    return {"0": z1.T, "2": z2.T}  # (units, samples)


def _hand_cos(a, b):
    return torch.tensor([float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(a.shape[0])],
                        dtype=torch.float64)


def test_phi_dphi_velocity_and_decisions_by_hand():
    gm = lobster_fx.instrument(_chain()).double()
    opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mu = 0.5
    neq = NEq(gm, opt, x, eps=1e-3, mu=mu, batch_size=4)  # 2 batches: concatenation over samples
    g = torch.Generator().manual_seed(3)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    base = {n: gm.get_parameter(n).detach().clone() for n in names}
    # weights at each measurement: perturbations of shrinking size, one unit per layer moving on
    weights = []
    for scale in [0.0, 0.3, 0.1, 0.03, 0.02]:
        w = {n: base[n] + scale * torch.randn(base[n].shape, dtype=torch.float64, generator=g) for n in names}
        w["0.weight"][0] = torch.randn(3, dtype=torch.float64, generator=g)  # a new direction each time
        weights.append(w)
    prev = phi_prev = None
    v = {"0": torch.zeros(4, dtype=torch.float64), "2": torch.zeros(2, dtype=torch.float64)}
    seen_frozen = seen_active = 0
    expected_next: list[torch.Tensor] = []
    for t, w in enumerate(weights):
        with torch.no_grad():
            for n in names:
                gm.get_parameter(n).copy_(w[n])
        if t == 4:  # a threshold between the units' |v|: some freeze, some do not
            ordered = sorted(torch.cat(expected_next).tolist())
            neq.eps = 0.5 * (ordered[2] + ordered[3])
        neq.step()
        outs = _hand_outputs(x, w["0.weight"], w["0.bias"], w["2.weight"], w["2.bias"])
        if prev is None:
            assert neq.phi == {}
        else:
            phi = {n: _hand_cos(outs[n], prev[n]) for n in outs}
            for n in phi:
                torch.testing.assert_close(neq.phi[n], phi[n], rtol=0, atol=1e-12)
            if phi_prev is not None:
                for n in phi:
                    v[n] = (phi[n] - phi_prev[n]) - mu * v[n]  # v^t = dphi^t - mu v^{t-1}
                    torch.testing.assert_close(neq.velocity[n], v[n], rtol=0, atol=1e-12)
                    expect = v[n].abs() < neq.eps
                    assert torch.equal(neq.frozen[n], expect), (t, n)
                    seen_frozen += int(expect.sum())
                    seen_active += int((~expect).sum())
            else:  # no dphi yet: nothing frozen, v still 0
                assert not any(f.any() for f in neq.frozen.values())
                assert all(not vv.any() for vv in neq.velocity.values())
            phi_prev = phi
        prev = outs
        if t == 3:  # what step 4 will give, to place eps between the values
            nxt = _hand_outputs(x, weights[4]["0.weight"], weights[4]["0.bias"], weights[4]["2.weight"],
                                weights[4]["2.bias"])
            expected_next = [((_hand_cos(nxt[n], outs[n]) - phi_prev[n]) - mu * v[n]).abs() for n in ("0", "2")]
    assert seen_frozen and seen_active  # the decisions were tested both ways
    assert not neq.frozen["0"][0]  # the unit that keeps moving never freezes


def test_pruned_unit_has_phi_one_and_cosine_helper():
    from lobster_fx.methods.neq import cosine_per_unit
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-2.0, -4.0]])
    torch.testing.assert_close(cosine_per_unit(a, b), torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))


# --- frozen units do not move -----------------------------------------------------------------


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-3)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def _state_rows(opt, p, idx):
    return {k: t[idx].clone() for k, t in opt.state[p].items() if isinstance(t, torch.Tensor) and t.shape == p.shape}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("rule", [None, "lobster-first", "lobster-after"])
@pytest.mark.parametrize("fast", [True, False])
def test_frozen_units_bit_identical_across_an_epoch(kind, rule, fast):
    gm = lobster_fx.instrument(_convnet()).train()
    opt = _optimizer(kind, gm.parameters())
    x, y = _data()
    lob = Lobster(gm, opt, lmbda=0.05) if rule == "lobster-first" else None
    neq = NEq(gm, opt, x[:8], random_rate=0.0, fast=fast, seed=5)
    if rule == "lobster-after":
        lob = Lobster(gm, opt, lmbda=0.05)
    neq.step()
    _epoch(gm, opt, x, y)  # optimizer state exists now
    neq.random_rate = {"0": 0.5, "4": 0.5, "6": 1.0 / 3}
    neq.step()
    frozen = {n: f.nonzero().flatten() for n, f in neq.frozen.items()}
    assert [len(frozen[n]) for n in ("0", "4", "6")] == [2, 3, 1]
    groups = {"0": ["0.weight", "0.bias", "1.weight", "1.bias"], "4": ["4.weight", "4.bias"],
              "6": ["6.weight", "6.bias"]}
    before = {p: gm.get_parameter(p).detach().clone() for ps in groups.values() for p in ps}
    state = {p: _state_rows(opt, gm.get_parameter(p), frozen[n]) for n, ps in groups.items() for p in ps}
    running = gm.get_buffer("1.running_mean").clone()
    _epoch(gm, opt, x, y)
    for n, ps in groups.items():
        idx = frozen[n]
        active = torch.ones(before[ps[0]].shape[0], dtype=torch.bool)
        active[idx] = False
        for p in ps:
            now = gm.get_parameter(p).detach()
            assert torch.equal(now[idx], before[p][idx]), p  # bit-identical
            assert not torch.equal(now[active], before[p][active]), p  # the others trained
            for k, rows in _state_rows(opt, gm.get_parameter(p), idx).items():
                assert torch.equal(rows, state[p][k]), (p, k)
    assert not torch.equal(gm.get_buffer("1.running_mean"), running)  # BN statistics keep updating
    if lob is not None:
        assert lob.steps > 0


def test_gradscaler_and_accumulation_keep_frozen_rows():
    gm = lobster_fx.instrument(_convnet()).train()
    opt = _optimizer("sgd", gm.parameters())
    x, y = _data()
    neq = NEq(gm, opt, x[:8], random_rate=0.0)
    neq.step()
    _epoch(gm, opt, x, y)
    neq.random_rate = 0.5
    neq.step()
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i in range(0, 32, 8):
        opt.zero_grad()
        for j in (i, i + 4):  # two micro-batches per step
            loss = nn.functional.cross_entropy(gm(x[j:j + 4]), y[j:j + 4]) / 2
            scaler.scale(loss).backward()
        if i == 8:  # an overflow: the scaler skips the step (no hook runs), nothing moves
            gm.get_parameter("4.weight").grad[0, 0] = float("inf")
            snap = {n: p.detach().clone() for n, p in gm.named_parameters()}
        scaler.step(opt)
        scaler.update()
        if i == 8:
            assert all(torch.equal(p, snap[n]) for n, p in gm.named_parameters())
    for layer, names in {"0": ["0.weight", "1.weight"], "4": ["4.weight", "4.bias"]}.items():
        f = neq.frozen[layer]
        for n in names:
            p = gm.get_parameter(n).detach()
            assert torch.equal(p[f], before[n][f]) and not torch.equal(p[~f], before[n][~f]), n


def test_fully_frozen_layer_thaws_and_trains_again():
    gm = lobster_fx.instrument(_convnet()).train()
    opt = _optimizer("sgd", gm.parameters())
    x, y = _data()
    neq = NEq(gm, opt, x[:8], random_rate={"0": 1.0})
    neq.step()
    w = gm.get_parameter("0.weight").detach().clone()
    _epoch(gm, opt, x, y)
    assert torch.equal(gm.get_parameter("0.weight"), w)
    assert not gm.get_parameter("0.weight").requires_grad  # the fast path: no dW, no backward below
    neq.random_rate = 0.0
    neq.step()
    assert gm.get_parameter("0.weight").requires_grad
    _epoch(gm, opt, x, y)
    assert not torch.equal(gm.get_parameter("0.weight"), w)


def test_everything_frozen_still_backpropagates():
    gm = lobster_fx.instrument(_convnet()).train()
    opt = _optimizer("adamw", gm.parameters())
    x, y = _data()
    neq = NEq(gm, opt, x[:8], random_rate=1.0)
    neq.step()
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    _epoch(gm, opt, x, y)  # the loss still has a graph (the last layer keeps zero-row gradients)
    for n, p in gm.named_parameters():
        assert torch.equal(p, before[n]), n


def test_exclude_is_never_frozen():
    gm = lobster_fx.instrument(_convnet())
    opt = _optimizer("sgd", gm.parameters())
    neq = NEq(gm, opt, _data()[0][:4], random_rate=1.0, exclude=["6"])
    neq.step()
    assert not neq.frozen["6"].any() and neq.frozen["0"].all()


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, x, match", [
    ({"eps": -1e-3}, None, "eps"),
    ({"mu": 1.0}, None, "mu"),
    ({"mu": -0.1}, None, "mu"),
    ({"mu": float("nan")}, None, "mu"),
    ({}, torch.empty(0, 1, 8, 8), "val_inputs is empty"),
    ({}, torch.randn(4, 3, 8, 8), "cannot run val_inputs of shape"),
    ({}, torch.randn(4, 1, 5), "cannot run val_inputs of shape"),
    ({"exclude": ["fc9"]}, None, "exclude"),
    ({"random_rate": 1.5}, None, "random_rate"),
])
def test_bad_input_clear_error_nothing_modified(kwargs, x, match):
    gm = lobster_fx.instrument(_convnet())
    opt = _optimizer("sgd", gm.parameters())
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    mode = gm.training
    with pytest.raises(ValueError, match=match):
        NEq(gm, opt, _data()[0][:4] if x is None else x, **kwargs)
    assert gm.code == code and gm.training == mode
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(p.requires_grad for p in gm.parameters())
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    with pytest.raises(TypeError, match="val_inputs must be a tensor"):
        NEq(gm, opt, [1, 2])
    assert gm.code == code


def test_remove_restores_graph_and_requires_grad():
    gm = lobster_fx.instrument(_convnet())
    opt = _optimizer("sgd", gm.parameters())
    x = _data()[0][:4]
    with torch.no_grad():
        ref = gm.eval()(x)
    neq = NEq(gm, opt, x, random_rate={"0": 1.0, "4": 0.5})
    neq.step()
    assert "neq_layer" in gm.train().code
    neq.remove()
    assert "neq_layer" not in gm.code and all(p.requires_grad for p in gm.parameters())
    assert not opt._optimizer_step_pre_hooks
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), ref)


# --- state_dict: a resumed run equals the uninterrupted one ------------------------------------


def _resumable_run(epochs, state=None, stop=None):
    gm = lobster_fx.instrument(_convnet()).train()
    opt = _optimizer("sgd", gm.parameters())
    x, y = _data(48)
    neq = NEq(gm, opt, x[:16], eps=2e-2)
    start = 0
    if state is not None:
        gm.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        neq.load_state_dict(state["neq"])
        start = state["epoch"]
    history = []
    for epoch in range(start, epochs):
        neq.step()
        history.append({n: f.clone() for n, f in neq.frozen.items()})
        _epoch(gm, opt, x, y)
        if stop is not None and epoch + 1 == stop:
            buf = io.BytesIO()
            torch.save({"model": gm.state_dict(), "opt": opt.state_dict(), "neq": neq.state_dict(),
                        "epoch": stop}, buf)
            buf.seek(0)
            return torch.load(buf, weights_only=True), history
    return (gm, neq), history


def test_resume_equals_uninterrupted():
    (gm_a, neq_a), hist_a = _resumable_run(7)
    state, hist_b1 = _resumable_run(7, stop=4)
    (gm_b, neq_b), hist_b2 = _resumable_run(7, state=state)
    assert any(f.any() for h in hist_a for f in h.values())  # something froze on the way
    for ha, hb in zip(hist_a, hist_b1 + hist_b2):
        assert all(torch.equal(ha[n], hb[n]) for n in ha)
    for n, p in gm_a.state_dict().items():
        assert torch.equal(p, gm_b.state_dict()[n]), n
    for n in neq_a.phi:
        assert torch.equal(neq_a.phi[n], neq_b.phi[n]) and torch.equal(neq_a.velocity[n], neq_b.velocity[n])


def test_random_baseline_resumes_its_draws():
    gm = lobster_fx.instrument(_convnet())
    neq = NEq(gm, _optimizer("sgd", gm.parameters()), None, random_rate=0.5, seed=3)
    neq.step()
    state = neq.state_dict()
    neq.step()
    second = {n: f.clone() for n, f in neq.frozen.items()}
    neq.load_state_dict(state)
    neq.step()
    assert all(torch.equal(second[n], neq.frozen[n]) for n in second)


# --- DDP: identical decisions on every rank -----------------------------------------------------


def _ddp_train(rank, mutant):
    gm = lobster_fx.instrument(_convnet()).train()
    wrapper = nn.parallel.DistributedDataParallel(gm)
    opt = _optimizer("sgd", gm.parameters())
    x, y = _data(32, seed=10 + rank)  # rank-local data and validation inputs
    neq = NEq(wrapper, opt, x[:8], eps=5e-2)
    if mutant:
        neq._broadcast = lambda: None
    frozen = []
    for _ in range(5):
        neq.step()
        frozen.append({n: f.clone() for n, f in neq.frozen.items()})
        _epoch(wrapper, opt, x, y)
    return {"frozen": frozen, "params": {n: p.detach().clone() for n, p in gm.named_parameters()}}


def _ddp_body(rank, mutant=False):
    # one spawn for both: NEq as it is, and the negative control without the broadcast
    return {"neq": _ddp_train(rank, False), "mutant": _ddp_train(rank, True)}


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is needed")
    from test_ddp import _run_ddp, _worker

    return _run_ddp(str(tmp_path_factory.mktemp("neq_ddp")), target=functools.partial(_worker, body=_ddp_body))


def test_ddp_ranks_decide_identically(ddp_ranks):
    r0, r1 = (r["neq"] for r in ddp_ranks)
    assert any(f.any() for h in r0["frozen"] for f in h.values())
    for h0, h1 in zip(r0["frozen"], r1["frozen"]):
        assert all(torch.equal(h0[n], h1[n]) for n in h0)
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


def test_ddp_without_the_broadcast_ranks_disagree(ddp_ranks):
    r0, r1 = (r["mutant"] for r in ddp_ranks)  # the negative control: rank-local measurements differ
    assert any(not torch.equal(h0[n], h1[n]) for h0, h1 in zip(r0["frozen"], r1["frozen"]) for n in h0)
