"""The per-step rule seam (issue 14): lobster_fx.methods.base.StepRule.

* a per-unit toy rule (one factor per output row / filter) against a hand computation, on
  both paths (in place before a weight-free update, kept across a weight-reading one), with
  GradScaler's still-scaled gradients of a fused optimizer, and with applies_to;
* any second rule of the base class on one optimizer over the same parameters is refused,
  across different rule classes;
* L2 (decoupled weight decay) against a hand computation, pruned weights pinned, a
  GradScaler skipped step, bfloat16 parameters, an old Lobster.state_dict() loading.
"""

import copy

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters
from lobster_fx.methods import L2, Lobster, StepRule


class RowGradRule(StepRule):
    """Toy per-unit rule: unit n shrinks by ``lmbda * mean_j |g[n, j]|`` of its weights."""

    term_name = "row-gradient"

    def __init__(self, gm, optimizer, lmbda, *, weights_only=False):
        self.weights_only = weights_only
        self.seen = []
        super().__init__(gm, optimizer, lmbda)

    def applies_to(self, info):
        return not self.weights_only or len(info.shape) > 1

    def unit_term(self, name, w, g):
        self.seen.append(name)
        return self.lmbda * g.reshape(g.shape[0], -1).abs().mean(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)


def _loss(gm, x, y):
    return nn.functional.cross_entropy(gm(x), y)


def _grads(gm, x, y):
    gm.zero_grad()
    _loss(gm, x, y).backward()
    return {info.name: p.grad.detach().clone() for info, p, _ in masked_parameters(gm)}


def _hand_unit_delta(w, g, lmbda):
    # the per-unit term written out unit by unit
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        out[n] = lmbda * g[n].abs().mean() * w[n]
    return out


@pytest.mark.parametrize("wd", [0.0, 0.01], ids=["in-place", "after-update"])
def test_per_unit_rule_matches_hand_computation(wd):
    gm = lobster_fx.instrument(_model())
    eta, lmbda = 0.1, 0.3
    opt = torch.optim.SGD(gm.parameters(), lr=eta, weight_decay=wd)
    rule = RowGradRule(gm, opt, lmbda)
    x, y = _data()
    for _ in range(2):
        before = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
        grads = _grads(gm, x, y)
        rule.seen.clear()
        opt.step()
        assert sorted(rule.seen) == sorted(before)  # names in the original model
        for info, p, _ in masked_parameters(gm):
            w, g = before[info.name], grads[info.name]
            expected = w - eta * (g + wd * w) - _hand_unit_delta(w, g, lmbda)
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14, msg=info.name)
    assert rule.steps == 2


def test_per_unit_rule_applies_to_weights_only_and_still_pins_biases():
    gm = lobster_fx.instrument(_model())
    eta, lmbda = 0.1, 0.3
    opt = torch.optim.SGD(gm.parameters(), lr=eta, momentum=0.9)
    rule = RowGradRule(gm, opt, lmbda, weights_only=True)
    lobster_fx.masks(gm)["3.bias"][1] = 0.0
    gm.get_parameter("3.bias").data[1] = 0.0
    x, y = _data()
    for _ in range(3):  # momentum moves the pruned bias entry: the pin puts it back
        before = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
        _grads(gm, x, y)
        opt.step()
    assert set(rule.seen) == {"0.weight", "3.weight"}
    assert gm.get_parameter("3.bias")[1].item() == 0.0
    # the last step: biases got SGD (with momentum) only, no term; check it against a rule-free copy
    ref = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
    for name in ("0.bias",):
        buf = opt.state[gm.get_parameter(name)]["momentum_buffer"]
        torch.testing.assert_close(ref[name], before[name] - eta * buf, rtol=0, atol=1e-14)


def test_per_unit_rule_gets_unscaled_gradients_from_a_fused_optimizer_under_gradscaler():
    # fused Adam unscales inside its step: the rule sees optimizer.grad_scale and must divide
    ref_model = _model()
    x, y = _data()
    out = {}
    for with_rule in (False, True):
        gm = lobster_fx.instrument(copy.deepcopy(ref_model))
        opt = torch.optim.Adam(gm.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        rule = RowGradRule(gm, opt, 0.3) if with_rule else None
        before = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
        gm.zero_grad()
        scaler.scale(_loss(gm, x, y)).backward()
        grads = {info.name: p.grad.detach() / 2.0 ** 10 for info, p, _ in masked_parameters(gm)}
        scaler.step(opt)
        scaler.update()
        out[with_rule] = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
        if rule is not None:
            assert rule.steps == 1
    for name, p in out[True].items():
        # Adam reads no weight: the term came off w_{t-1} in place, Adam's update is unchanged
        expected = out[False][name] - _hand_unit_delta(before[name], grads[name], 0.3)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-12, msg=name)


def _hooks(opt):
    return len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


@pytest.mark.parametrize("first, second", [(Lobster, L2), (L2, Lobster), (L2, RowGradRule)],
                         ids=["lobster-then-l2", "l2-then-lobster", "l2-then-per-unit"])
def test_any_second_rule_on_one_optimizer_is_refused(first, second):
    gm = lobster_fx.instrument(_model())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    attached = first(gm, opt, 0.1)
    with pytest.raises(ValueError, match=r"SGD optimizer \(id 0x[0-9a-f]+\) already has a rule") as e:
        second(gm, opt, 0.1)
    msg = str(e.value)
    assert f"{first.__name__}(lmbda=0.1" in msg and f"the {first.term_name} term" in msg
    assert "'0.weight'" in msg and ".remove()" in msg and "one rule per optimizer" in msg
    assert msg.startswith(f"{second.__name__}:")
    assert _hooks(opt) == (1, 1)  # the refused rule left nothing behind
    attached.remove()
    second(gm, opt, 0.1)  # the optimizer is free again
    assert _hooks(opt) == (1, 1)


def test_second_rule_over_other_parameters_or_another_optimizer():
    gm = lobster_fx.instrument(_model())
    conv = [gm.get_parameter("0.weight"), gm.get_parameter("0.bias")]
    rest = [gm.get_parameter("3.weight"), gm.get_parameter("3.bias")]
    opt = torch.optim.SGD([{"params": conv}], lr=0.1)
    Lobster(gm, opt, 0.1)
    opt.add_param_group({"params": rest})
    # the Lobster was built over the conv only; a rule over the same optimizer still shares
    # the conv parameters (now in the optimizer): refused
    with pytest.raises(ValueError, match="already has a rule"):
        L2(gm, opt, 0.1)
    gm_b = lobster_fx.instrument(_model())
    opt_b = torch.optim.SGD(gm_b.parameters(), lr=0.1)  # kept: a dropped optimizer's rule does not count
    L2(gm_b, opt_b, 0.1)
    with pytest.warns(RuntimeWarning, match="also in another optimizer .* the L2 weight decay term"):
        Lobster(gm_b, torch.optim.Adam(gm_b.parameters()), 0.1)


def test_l2_matches_hand_computation_and_pins_pruned_weights():
    gm = lobster_fx.instrument(_model())
    eta, lmbda, mu, wd = 0.1, 0.05, 0.9, 0.01
    # momentum and weight decay both move pruned weights, and make the update read w
    opt = torch.optim.SGD(gm.parameters(), lr=eta, momentum=mu, weight_decay=wd)
    rule = L2(gm, opt, lmbda)
    masks = lobster_fx.masks(gm)
    masks["3.weight"][:, :5] = 0.0
    gm.get_parameter("3.weight").data[:, :5] = 0.0
    x, y = _data()
    bufs = {}
    for _ in range(3):
        before = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
        grads = _grads(gm, x, y)
        opt.step()
        for info, p, mask in masked_parameters(gm):
            w, g = before[info.name], grads[info.name] + wd * before[info.name]
            bufs[info.name] = g if info.name not in bufs else mu * bufs[info.name] + g
            expected = (w - eta * bufs[info.name] - lmbda * w) * mask
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14, msg=info.name)
    assert torch.all(gm.get_parameter("3.weight")[:, :5] == 0)
    assert rule.steps == 3 and repr(rule).startswith("L2(lmbda=0.05, steps=3")


def test_l2_skips_a_step_gradscaler_skips():
    gm = lobster_fx.instrument(_model())
    eta, lmbda = 0.1, 0.05
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    rule = L2(gm, opt, lmbda)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = _data()
    before = {info.name: p.detach().clone() for info, p, _ in masked_parameters(gm)}
    gm.zero_grad()
    scaler.scale(_loss(gm, x, y) * float("inf")).backward()  # inf gradients: the step is skipped
    scaler.step(opt)
    scaler.update()
    assert rule.steps == 0
    for info, p, _ in masked_parameters(gm):
        assert torch.equal(p.detach(), before[info.name]), info.name  # no decay either
    gm.zero_grad()
    scaler.scale(_loss(gm, x, y)).backward()
    grads = {info.name: p.grad.detach() / scaler.get_scale() for info, p, _ in masked_parameters(gm)}
    scaler.step(opt)
    assert rule.steps == 1
    for info, p, _ in masked_parameters(gm):
        w = before[info.name]
        torch.testing.assert_close(p.detach(), w - eta * grads[info.name] - lmbda * w, rtol=0, atol=1e-14)


def test_l2_on_bfloat16_parameters_decays_like_float32_in_expectation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    gm = lobster_fx.instrument(model)
    opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    lmbda, steps = 1e-4, 100  # 1e-4 |w| is below half a bf16 ulp: round-to-nearest never moves
    L2(gm, opt, lmbda)
    w0 = gm.get_parameter("0.weight").detach().double().abs().mean()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    for _ in range(steps):
        opt.zero_grad()
        gm(x).float().square().mean().backward()
        opt.step()
    ratio = (gm.get_parameter("0.weight").detach().double().abs().mean() / w0).item()
    assert ratio == pytest.approx((1 - lmbda) ** steps, rel=1e-3)


@pytest.mark.parametrize("old", [{"lmbda": 0.2, "steps": 7, "seed": 3}, {"lmbda": 0.2, "steps": 7}],
                         ids=["with-seed", "before-half-precision"])
def test_an_old_lobster_state_dict_loads_into_the_new_rules(old):
    for cls in (Lobster, L2):
        gm = lobster_fx.instrument(_model())
        rule = cls(gm, torch.optim.SGD(gm.parameters(), lr=0.1), 1e-4)
        rule.load_state_dict(dict(old))
        assert (rule.lmbda, rule.steps, rule.seed) == (0.2, 7, old.get("seed", 0))
        assert set(rule.state_dict()) == {"lmbda", "steps", "seed"}


def test_a_rule_without_a_term_or_with_fused_and_no_kernels_is_refused():
    gm = lobster_fx.instrument(_model())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)

    class NoTerm(StepRule):
        pass

    with pytest.raises(TypeError, match="NoTerm defines no term"):
        NoTerm(gm, opt, 0.1)
    with pytest.raises(ValueError, match="RowGradRule: fused=True, but this rule has no fused kernels"):
        rule = RowGradRule.__new__(RowGradRule)
        rule.weights_only = False
        StepRule.__init__(rule, gm, opt, 0.1, fused=True)
    assert _hooks(opt) == (0, 0)
    assert not L2(gm, opt, 0.1).fused


def test_per_unit_rule_on_bfloat16_gets_whole_parameters_and_decays_like_float32(monkeypatch):
    import lobster_fx.methods.base as base

    monkeypatch.setattr(base, "HALF_CHUNK_NUMEL", 100)  # elementwise terms would get 100-element slices

    class ConstantPerUnit(StepRule):
        def unit_term(self, name, w, g):
            shapes.append((name, tuple(w.shape), w.dtype))
            return torch.full((w.shape[0],), self.lmbda)

    shapes = []
    torch.manual_seed(0)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16))
    opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    lmbda, steps = 1e-4, 100
    ConstantPerUnit(gm, opt, lmbda)
    w0 = gm.get_parameter("0.weight").detach().double().abs().mean()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    for _ in range(steps):
        opt.zero_grad()
        gm(x).float().square().mean().backward()
        opt.step()
    assert set(shapes) == {("0.weight", (64, 64), torch.float32), ("0.bias", (64,), torch.float32)}
    ratio = (gm.get_parameter("0.weight").detach().double().abs().mean() / w0).item()
    assert ratio == pytest.approx((1 - lmbda) ** steps, rel=1e-3)


@pytest.mark.parametrize("method", ["lobster", "serene"])
@pytest.mark.parametrize("opt_kwargs", [{}, {"momentum": 0.9, "weight_decay": 1e-3}],
                         ids=["sgd", "sgd-momentum-wd"])
@pytest.mark.parametrize("positional", [False, True])
def test_step_with_a_closure_applies_the_term_of_that_steps_gradient(method, opt_kwargs, positional):
    """``opt.step(closure)`` (Lightning's automatic optimization) computes the gradient inside
    the step: the rule must use it, exactly as ``loss.backward(); opt.step()`` does."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]

    def run(use_closure):
        gm = lobster_fx.instrument(copy.deepcopy(base))
        opt = torch.optim.SGD(gm.parameters(), lr=0.1, **opt_kwargs)
        rule = (Lobster(gm, opt, lmbda=0.05) if method == "lobster"
                else lobster_fx.SeReNe(gm, opt, lmbda=0.05))
        for x, y in data:
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(gm(x), y)
                loss.backward()
                return loss
            if use_closure:
                opt.step(closure) if positional else opt.step(closure=closure)
            else:
                closure()
                opt.step()
        assert rule.steps == len(data)
        rule.remove()
        return [p.detach().clone() for p in gm.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
