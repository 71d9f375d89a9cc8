"""SeReNe (issue 15): lobster_fx.methods.SeReNe against hand computations.

The hand computations run on a separate copy of the original (uninstrumented) model: the
unit outputs ``z`` are caught by forward hooks (which hand a clone downstream, so an in-place
activation cannot overwrite them) and ``d(sum y)/dz`` / ``dL/dz`` come from
``torch.autograd.grad``; then ``W[n] <- W[n] - eta * g - lmbda * relu(1 - S_n) * W[n]``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters
from lobster_fx.methods import SeReNe

ETA = 0.1


def _chain(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():  # sensitivities on both sides of 1: some units gated off, some shrunk
        model[2].weight.mul_(6.0)
        model[4].weight.mul_(6.0)
    return model.double()


def _conv_linear(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        model[3].weight.mul_(15.0)
    return model.double()


def _x(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _zs_and_output(model, x, layers):
    """Forward of a copy of ``model``; returns ({layer: z}, output)."""
    zs = {}

    def catch(name):
        def hook(mod, args, out):
            zs[name] = out
            return out.clone()  # downstream (in-place) ops act on the clone: z stays z
        return hook

    handles = [model.get_submodule(n).register_forward_hook(catch(n)) for n in layers]
    out = model(x)
    for h in handles:
        h.remove()
    return zs, out


def _per_unit_abs_mean(g):
    # units on dim 1; mean over the batch and every other position
    return g.abs().transpose(0, 1).reshape(g.shape[1], -1).mean(1)


def _hand_output_sensitivity(model, x, layers):
    ref = copy.deepcopy(model).train()
    zs, y = _zs_and_output(ref, x, layers)
    grads = torch.autograd.grad(y.sum(), [zs[n] for n in layers])
    c = y.numel() // y.shape[0]
    return {n: _per_unit_abs_mean(g) / c for n, g in zip(layers, grads)}


def _hand_loss_sensitivity(model, x, loss_fn, layers):
    ref = copy.deepcopy(model).train()
    zs, out = _zs_and_output(ref, x, layers)
    grads = torch.autograd.grad(loss_fn(out), [zs[n] for n in layers])
    return {n: g.transpose(0, 1).reshape(g.shape[1], -1).mean(1).abs() for n, g in zip(layers, grads)}


def _hand_grads(model, xs, loss_fn):
    ref = copy.deepcopy(model).train()
    for x in xs:
        loss_fn(ref(x)).backward()
    return {k: p.grad.detach().clone() for k, p in ref.named_parameters()}


def _expected(model, grads, sens, lmbda, include_bias=False):
    out = {}
    for k, p in model.named_parameters():
        layer, _, kind = k.rpartition(".")
        w = p.detach()
        new = w - ETA * grads[k]
        if kind == "weight" or include_bias:
            factor = torch.relu(1 - sens[layer]).reshape((-1,) + (1,) * (w.dim() - 1))
            new = new - lmbda * factor * w
        out[k] = new
    return out


def _params(gm):
    return {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}


def _square_loss(out):
    return (5.0 * out).square().mean()


@pytest.mark.parametrize("make, layers, shape", [
    (_chain, ["0", "2", "4"], (7, 6)),
    (_conv_linear, ["0", "3"], (5, 2, 4, 4)),
], ids=["linear-chain", "conv-then-linear"])
def test_output_sensitivity_update_matches_hand_computation(make, layers, shape):
    model, lmbda = make(), 0.3
    x = _x(shape)
    sens = _hand_output_sensitivity(model, x, layers)
    allsens = torch.cat(list(sens.values()))
    assert (allsens > 1).any() and (allsens < 1).any()  # the gate matters in this test
    grads = _hand_grads(model, [x], _square_loss)
    expected = _expected(model, grads, sens, lmbda)

    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, lmbda)
    opt.zero_grad()
    _square_loss(gm(x)).backward()  # the loop as usual: no retain_graph, no extra call
    opt.step()
    for n in layers:
        torch.testing.assert_close(rule.last_sensitivity[n].double(), sens[n], rtol=1e-6, atol=1e-7)
        assert rule.last_sensitivity[n].shape == (model.get_submodule(n).weight.shape[0],)  # per channel
    got = _params(gm)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-12, msg=k)
    assert rule.steps == 1


def test_include_bias_shrinks_biases_with_the_units_factor():
    model, lmbda, layers = _chain(), 0.3, ["0", "2", "4"]
    x = _x((7, 6))
    sens = _hand_output_sensitivity(model, x, layers)
    expected = _expected(model, _hand_grads(model, [x], _square_loss), sens, lmbda, include_bias=True)
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA, weight_decay=0.0)
    SeReNe(gm, opt, lmbda, include_bias=True)
    _square_loss(gm(x)).backward()
    opt.step()
    got = _params(gm)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-12, msg=k)


def _loss3(out):
    return (1.5 * out).square().mean()


def test_loss_sensitivity_matches_hand_computation():
    model, lmbda, layers = _conv_linear(), 0.3, ["0", "3"]
    x = _x((5, 2, 4, 4))
    sens = _hand_loss_sensitivity(model, x, _loss3, layers)
    allsens = torch.cat(list(sens.values()))
    assert (allsens > 1).any() and (allsens < 1).any()
    expected = _expected(model, _hand_grads(model, [x], _loss3), sens, lmbda)
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, lmbda, sensitivity="loss")
    _loss3(gm(x)).backward()
    opt.step()
    for n in layers:
        torch.testing.assert_close(rule.last_sensitivity[n].double(), sens[n], rtol=1e-6, atol=1e-7)
    got = _params(gm)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-12, msg=k)


def _unit_loss(out):
    return out.square().mean()


@pytest.mark.parametrize("sensitivity", ["output", "loss"])
def test_gradient_accumulation_uses_the_mean_over_micro_batches(sensitivity):
    model, lmbda, layers = _chain(), 0.3, ["0", "2", "4"]
    x1, x2 = _x((7, 6), seed=1), _x((4, 6), seed=2)  # different sizes: a mean of means
    if sensitivity == "output":
        s1, s2 = (_hand_output_sensitivity(model, x, layers) for x in (x1, x2))
    else:  # signed means averaged, then |.|
        def signed(x):
            ref = copy.deepcopy(model).train()
            zs, out = _zs_and_output(ref, x, layers)
            grads = torch.autograd.grad(_unit_loss(out), [zs[n] for n in layers])
            return {n: g.mean(0) for n, g in zip(layers, grads)}
        s1, s2 = signed(x1), signed(x2)
    sens = {n: (s1[n] + s2[n]) / 2 for n in layers}
    if sensitivity == "loss":
        sens = {n: s.abs() for n, s in sens.items()}
    allsens = torch.cat(list(sens.values()))
    assert (allsens > 1).any() and (allsens < 1).any()  # the gate matters in this test
    expected = _expected(model, _hand_grads(model, [x1, x2], _unit_loss), sens, lmbda)

    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, lmbda, sensitivity=sensitivity)
    opt.zero_grad()
    for x in (x1, x2):
        _unit_loss(gm(x)).backward()
    opt.step()
    got = _params(gm)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-12, msg=k)
    # the next step starts a new mean: one micro-batch only
    now = _plain_copy(model, got)
    s3 = (_hand_output_sensitivity(now, x1, layers) if sensitivity == "output"
          else _hand_loss_sensitivity(now, x1, _unit_loss, layers))
    opt.zero_grad()
    _unit_loss(gm(x1)).backward()
    opt.step()
    for n in layers:
        torch.testing.assert_close(rule.last_sensitivity[n].double(), s3[n], rtol=1e-6, atol=1e-7)


def _plain_copy(model, params):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(params[k])
    return ref


def test_loop_unchanged_gradients_equal_a_rule_free_model():
    model = _chain()
    x = _x((7, 6))
    plain = lobster_fx.instrument(copy.deepcopy(model)).train()
    _square_loss(plain(x)).backward()
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    SeReNe(gm, opt, 0.3)
    out = gm(x)
    torch.testing.assert_close(out, plain(x).detach(), rtol=0, atol=0)
    loss = _square_loss(out)
    loss.backward()  # no retain_graph needed after the rule's own backward
    for (k, p), (k2, q) in zip(gm.named_parameters(), plain.named_parameters()):
        assert k == k2
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=k)  # the extra backward left .grad alone
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()  # the graph is freed as usual: nothing retained it past the user's backward
    with torch.no_grad():  # no recording without gradients / in eval mode
        gm(x)
    gm.eval()
    gm(x)
    opt.step()


def test_pinned_units_stay_zero():
    model = _chain()
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    masks = lobster_fx.masks(gm)
    masks["2.weight"][1] = 0
    masks["2.bias"][1] = 0
    with torch.no_grad():
        gm.get_parameter("2.weight")[1] = 0
        gm.get_parameter("2.bias")[1] = 0
    opt = torch.optim.SGD(gm.parameters(), lr=ETA, momentum=0.9, weight_decay=1e-2)
    SeReNe(gm, opt, 0.3, include_bias=True)
    for seed in range(4):
        opt.zero_grad()
        _square_loss(gm(_x((7, 6), seed=seed))).backward()
        opt.step()
    assert torch.all(gm.get_parameter("2.weight")[1] == 0) and gm.get_parameter("2.bias")[1] == 0
    assert torch.all(gm.get_parameter("2.weight")[0] != 0)


@pytest.mark.parametrize("sensitivity, kw", [("output", {}), ("loss", {"momentum": 0.9})])
def test_state_dict_round_trip(sensitivity, kw):
    model = _chain()
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, 0.3, sensitivity=sensitivity, seed=5, **kw)
    for seed in range(2):
        opt.zero_grad()
        _square_loss(gm(_x((7, 6), seed=seed))).backward()
        opt.step()
    state = rule.state_dict()
    assert state["steps"] == 2 and state["lmbda"] == 0.3 and state["seed"] == 5
    assert state["sensitivity"] == sensitivity

    gm2 = copy.deepcopy(gm)  # the taps come along without their listeners
    gm2.load_state_dict(gm.state_dict())
    opt2 = torch.optim.SGD(gm2.parameters(), lr=ETA)
    rule2 = SeReNe(gm2, opt2, 1e-4, sensitivity=sensitivity, **kw)
    rule2.load_state_dict(copy.deepcopy(state))
    assert (rule2.lmbda, rule2.steps, rule2.seed, rule2.momentum) == (0.3, 2, 5, rule.momentum)
    for g, o in ((gm, opt), (gm2, opt2)):  # one more step: the same result (the loss EMA too)
        o.zero_grad()
        _square_loss(g(_x((7, 6), seed=9))).backward()
        o.step()
    for k, v in _params(gm).items():
        torch.testing.assert_close(_params(gm2)[k], v, rtol=0, atol=0, msg=k)
    other = "loss" if sensitivity == "output" else "output"
    gm3 = lobster_fx.instrument(copy.deepcopy(model))
    rule3 = SeReNe(gm3, torch.optim.SGD(gm3.parameters(), lr=ETA), sensitivity=other)
    with pytest.raises(ValueError, match=f"sensitivity='{sensitivity}'"):
        rule3.load_state_dict(state)
    assert rule3.steps == 0


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.head(h), h


class _NoUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, i):
        return self.emb(i).sum(1)


def _hooks(opt):
    return len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


@pytest.mark.parametrize("case, error, match", [
    ("negative-lmbda", ValueError, "lmbda must be a finite float >= 0"),
    ("tuple-output", ValueError, "returns several values.*output_fn="),
    ("no-units", ValueError, "no prunable Linear / Conv unit"),
    ("bad-sensitivity", ValueError, r"sensitivity must be one of \('output', 'loss'\), got 'grad'"),
    ("bad-output-fn", TypeError, "output_fn must be a callable"),
])
def test_bad_input_is_refused_and_changes_nothing(case, error, match):
    torch.manual_seed(0)
    model = {"tuple-output": _TwoOutputs, "no-units": _NoUnits}.get(case, _chain)()
    x = torch.randint(0, 10, (3, 2)) if case == "no-units" else torch.randn(3, 6, dtype=torch.float64 if
                                                                            case not in ("tuple-output",) else torch.float32)
    gm = lobster_fx.instrument(model).train()
    if case == "no-units":
        assert lobster_fx.masks(gm)  # something is masked, but no Linear / Conv unit
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    before_out, before_code = gm(x), gm.code
    before_hooks = (_hooks(opt), len(gm._forward_hooks), len(gm._forward_pre_hooks))
    kw = {"lmbda": -1e-4} if case == "negative-lmbda" else {}
    kw |= {"sensitivity": "grad"} if case == "bad-sensitivity" else {}
    kw |= {"output_fn": "first"} if case == "bad-output-fn" else {}
    with pytest.raises(error, match=match):
        SeReNe(gm, opt, **kw)
    assert (_hooks(opt), len(gm._forward_hooks), len(gm._forward_pre_hooks)) == before_hooks
    assert gm.code == before_code  # no tap was installed
    after = gm(x)
    for a, b in zip(after if isinstance(after, tuple) else (after,),
                    before_out if isinstance(before_out, tuple) else (before_out,)):
        assert torch.equal(a, b)
    for p in gm.parameters():
        assert p.grad is None
    if case == "tuple-output":  # with output_fn it works, and y is the chosen tensor
        ref = copy.deepcopy(model).train()
        zs, out = _zs_and_output(ref, x, ["fc", "head"])
        g = torch.autograd.grad(out[0].sum(), [zs["fc"], zs["head"]])
        rule = SeReNe(gm, opt, output_fn=lambda out: out[0])
        gm(x)[0].square().mean().backward()
        opt.step()
        torch.testing.assert_close(rule.last_sensitivity["fc"], g[0].abs().mean(0) / 3)
        torch.testing.assert_close(rule.last_sensitivity["head"], g[1].abs().mean(0) / 3)


def test_remove_takes_the_taps_out():
    gm = lobster_fx.instrument(_chain()).train()
    code = gm.code
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, 0.3)
    assert gm.code != code
    rule.remove()
    assert gm.code == code and _hooks(opt) == (0, 0) and not gm._forward_hooks


# --- neuron pruning, fold, slim on a model with BatchNorm and a residual connection ------------

class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))  # residual: conv1's and conv2's channels are one group
        h = nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _res_net():
    torch.manual_seed(0)
    model = _ResNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):  # BN(0) is a non-zero constant: zeroing the conv alone is not enough
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        # weak units (the ones neuron pruning should take); conv2's unit 6 is weak but conv1's is not:
        # the residual add keeps that channel
        for layer, bn, weak in ((model.conv1, model.bn1, [1, 4]), (model.conv2, model.bn2, [1, 4, 6]),
                                (model.fc1, None, [2, 3, 9, 12])):
            layer.weight[weak] *= 1e-3
            if bn is not None:
                bn.running_mean[weak] = 0
                bn.bias[weak] = 0
    return model.eval()


def test_serene_then_neuron_prune_fold_slim_removes_exactly_the_dead_units():
    model = _res_net()
    x = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = model(x)
    gm = lobster_fx.instrument(model).train()
    for bn in ("bn1", "bn2"):  # running statistics while training: the target stays reachable
        gm.get_submodule(bn).eval()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    rule = SeReNe(gm, opt, 0.05)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(gm(x), target).backward()
        opt.step()
    assert rule.steps == 10 and set(rule.last_sensitivity) == {"conv1", "conv2", "fc1", "fc2"}

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return 1.0 + float(nn.functional.mse_loss(m(x), target) / target.var())

    result = lobster_fx.prune(gm, evaluate, 0.02, granularity="neuron", channel_multiple=1)  # the rule's taps still in
    masks = lobster_fx.masks(gm)
    dead = {n: masks[f"{n}.weight"].flatten(1).eq(0).all(1) for n in ("conv1", "conv2", "fc1")}
    assert result.units_pruned == sum(int(d.sum()) for d in dead.values())
    for n, total in (("conv1", 8), ("conv2", 8), ("fc1", 16)):
        assert 0 < int(dead[n].sum()) < total, n
    for n, bn in (("conv1", "bn1"), ("conv2", "bn2")):  # found through the taps: BN entries go too
        assert torch.all(gm.get_parameter(f"{bn}.weight").detach()[dead[n]] == 0), n
        assert torch.all(gm.get_parameter(f"{bn}.bias").detach()[dead[n]] == 0), n
    assert torch.all(masks["fc2.weight"] == 1)  # the logits are never pruned, with taps installed too
    rule.remove()
    gm.eval()
    slim = lobster_fx.slim(lobster_fx.fold(gm), (x,), channel_multiple=1)
    shapes = {k: tuple(p.shape) for k, p in slim.named_parameters()}
    # the residual add joins conv1's and conv2's channels: neuron pruning asks slim and prunes them
    # together (conv2's weak unit 6 stays: conv1's unit 6 is strong), so slim removes every pruned channel
    assert torch.equal(dead["conv1"], dead["conv2"]) and not bool(dead["conv2"][6])
    group = dead["conv1"] & dead["conv2"]
    kept = {"fc1": 16 - int(dead["fc1"].sum()), "res": 8 - int(group.sum())}
    assert shapes["conv1.weight"] == (kept["res"], 3, 3, 3) and shapes["bn1.weight"] == (kept["res"],)
    assert shapes["conv2.weight"] == (kept["res"], kept["res"], 3, 3) and shapes["bn2.weight"] == (kept["res"],)
    assert shapes["fc1.weight"] == (kept["fc1"], kept["res"]) and shapes["fc2.weight"] == (4, kept["fc1"])
    # the kept units are the live ones, in order
    torch.testing.assert_close(slim.get_parameter("conv1.weight"), gm.get_parameter("conv1.weight")[~group])
    torch.testing.assert_close(slim.get_parameter("fc1.weight"),
                               gm.get_parameter("fc1.weight")[~dead["fc1"]][:, ~group])
    with torch.no_grad():
        torch.testing.assert_close(slim(x), gm(x), rtol=0, atol=1e-5)


# --- DDP: 2 gloo ranks against one process -----------------------------------------------------

DDP_STEPS, DDP_BATCH = 4, 16


def _ddp_body(rank, mutant=False):
    """Half the batch per rank (``rank=None``: the whole batch in one process); ``mutant``: no
    all-reduce of the sensitivities (each rank keeps its own)."""
    x = _x((DDP_BATCH, 6), seed=4)
    if rank is not None:
        half = DDP_BATCH // 2
        x = x[rank * half:(rank + 1) * half]
    gm = lobster_fx.instrument(_chain()).train()
    wrapper = gm if rank is None else nn.parallel.DistributedDataParallel(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=ETA, momentum=0.9)
    rule = SeReNe(wrapper, opt, 0.3)
    if mutant:
        rule._group = None
    sens = []
    for _ in range(DDP_STEPS):
        opt.zero_grad()
        _unit_loss(wrapper(x)).backward()
        opt.step()
        sens.append({n: s.clone() for n, s in rule.last_sensitivity.items()})
    return {"params": _params(gm), "sens": sens, "steps": rule.steps}


def _ddp_run(tmp_path, mutant):
    pytest.importorskip("torch.distributed")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is needed")
    from test_ddp import _run_ddp, _worker  # the spawn helpers of the LOBSTER DDP test

    return _run_ddp(str(tmp_path), mutant=mutant, target=functools.partial(_worker, body=_ddp_body))


def _gap(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_ddp_two_ranks_identical_and_equal_to_one_process(tmp_path):
    r0, r1 = _ddp_run(tmp_path, mutant=False)
    single = _ddp_body(None)
    assert r0["steps"] == r1["steps"] == DDP_STEPS
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # bit-identical ranks
    for s0, s1, s in zip(r0["sens"], r1["sens"], single["sens"]):
        for n in s:
            assert torch.equal(s0[n], s1[n]), n
            torch.testing.assert_close(s0[n], s[n], rtol=1e-6, atol=1e-7, msg=n)  # the full batch's mean
    assert _gap(r0["params"], single["params"]) < 1e-12


def test_ddp_without_the_all_reduce_the_ranks_drift(tmp_path):
    # the negative control: each rank's own sensitivity gives different terms per rank
    r0, r1 = _ddp_run(tmp_path, mutant=True)
    assert _gap(r0["params"], r1["params"]) > 1e-4


def test_loss_sensitivity_under_gradscaler_is_unscaled_with_scaler():
    model, x = _conv_linear().float(), _x((5, 2, 4, 4)).float()
    out = {}
    for case in ("plain", "scaler", "scaler-not-passed"):
        gm = lobster_fx.instrument(copy.deepcopy(model)).train()
        opt = torch.optim.SGD(gm.parameters(), lr=ETA)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if case != "plain" else None
        rule = SeReNe(gm, opt, 0.3, sensitivity="loss", scaler=scaler if case == "scaler" else None)
        loss = _loss3(gm(x))
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        out[case] = (rule.last_sensitivity, _params(gm))
    for n, s in out["plain"][0].items():
        torch.testing.assert_close(out["scaler"][0][n], s, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["scaler-not-passed"][0][n], 256 * s, rtol=1e-5, atol=1e-5)
    for k, v in out["plain"][1].items():
        torch.testing.assert_close(out["scaler"][1][k], v, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_and_parameters_run_and_track_float32():
    model, x = _conv_linear().float(), _x((5, 2, 4, 4)).float()
    sens = {}
    for case in ("float32", "autocast", "bf16-params"):
        m = copy.deepcopy(model).to(torch.bfloat16) if case == "bf16-params" else copy.deepcopy(model)
        gm = lobster_fx.instrument(m).train()
        opt = torch.optim.SGD(gm.parameters(), lr=ETA)
        rule = SeReNe(gm, opt, 0.3)
        xin = x.to(torch.bfloat16) if case == "bf16-params" else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            loss = _unit_loss(gm(xin).float())
        loss.backward()
        opt.step()
        assert rule.steps == 1
        sens[case] = rule.last_sensitivity
    for case in ("autocast", "bf16-params"):
        for n, s in sens["float32"].items():
            assert sens[case][n].dtype == torch.float32
            torch.testing.assert_close(sens[case][n], s, rtol=5e-2, atol=5e-3, msg=f"{case} {n}")


def test_with_plateau_pruner_neuron_phases_pruned_units_stay_zero():
    model = _res_net()
    x = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = model(x)
    gm = lobster_fx.instrument(model).train()
    for bn in ("bn1", "bn2"):
        gm.get_submodule(bn).eval()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    rule = SeReNe(gm, opt, 0.05)

    def evaluate(m):
        was = m.training
        m.eval()
        with torch.no_grad():
            loss = 1.0 + float(nn.functional.mse_loss(m(x), target) / target.var())
        m.train(was)
        for bn in ("bn1", "bn2"):
            m.get_submodule(bn).eval()
        return loss

    pruner = lobster_fx.PlateauPruner(gm, evaluate, twt=0.02, every_n_iterations=4, optimizer=opt,
                                      granularity="neuron")
    dead_seen = 0
    for _ in range(12):
        opt.zero_grad()
        nn.functional.mse_loss(gm(x), target).backward()
        opt.step()
        pruner.step(evaluate(gm))
        masks = lobster_fx.masks(gm)
        for n in ("conv1", "conv2", "fc1"):
            rows = masks[f"{n}.weight"].flatten(1).eq(0).all(1)
            dead_seen = max(dead_seen, int(rows.sum()))
            assert torch.all(gm.get_parameter(f"{n}.weight").detach()[rows] == 0), n  # pinned by the rule's step
    assert dead_seen > 0 and rule.steps == 12


def test_copies_and_pickles_of_the_model_leave_the_rule_behind():
    import pickle

    gm = lobster_fx.instrument(_chain()).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, 0.3)
    x = _x((7, 6))
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        _square_loss(other(x)).backward()  # the copy trains as a plain model: nothing recorded here
        assert not rule._sums and not rule._edges
        with torch.no_grad():
            torch.testing.assert_close(other(x), gm(x), rtol=0, atol=0)
    _square_loss(gm(x)).backward()
    opt.step()
    assert rule.steps == 1 and set(rule.last_sensitivity) == {"0", "2", "4"}


def test_torch_compile_of_the_model_gives_the_eager_result():
    model, x = _chain().float(), _x((7, 6)).float()
    out = {}
    for case in ("eager", "compiled"):
        gm = lobster_fx.instrument(copy.deepcopy(model)).train()
        opt = torch.optim.SGD(gm.parameters(), lr=ETA)
        rule = SeReNe(gm, opt, 0.3)
        run = torch.compile(gm, backend="aot_eager") if case == "compiled" else gm
        for _ in range(2):
            opt.zero_grad()
            _unit_loss(run(x)).backward()
            opt.step()
        out[case] = (rule.last_sensitivity, _params(gm))
    assert set(out["compiled"][0]) == {"0", "2", "4"}
    for n, s in out["eager"][0].items():
        torch.testing.assert_close(out["compiled"][0][n], s)
    for k, v in out["eager"][1].items():
        torch.testing.assert_close(out["compiled"][1][k], v)


def test_a_step_gradscaler_skips_applies_nothing_and_its_batch_counts_towards_the_next():
    # documented behaviour: a skipped step never reaches the optimizer's hooks
    model, layers = _chain().float(), ["0", "2", "4"]
    x1, x2 = _x((7, 6), seed=1).float(), _x((7, 6), seed=2).float()
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    opt = torch.optim.SGD(gm.parameters(), lr=ETA)
    rule = SeReNe(gm, opt, 0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = _params(gm)
    scaler.scale(_unit_loss(gm(x1)) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert rule.steps == 0 and all(torch.equal(p, before[k]) for k, p in _params(gm).items())
    opt.zero_grad()
    scaler.scale(_unit_loss(gm(x2))).backward()
    scaler.step(opt)
    s1, s2 = (_hand_output_sensitivity(model, x, layers) for x in (x1, x2))
    assert rule.steps == 1
    for n in layers:
        torch.testing.assert_close(rule.last_sensitivity[n], (s1[n] + s2[n]).float() / 2)
