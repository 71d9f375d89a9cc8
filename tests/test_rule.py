"""The LOBSTER rule against eq. (6) computed by hand, under every optimizer setting."""

import copy

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _grads(model, x, y, scale=1.0):
    model.zero_grad()
    (nn.functional.mse_loss(model(x), y) * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def hand_eq6(w, g, eta, lmbda):
    # eq. (6) of the paper: w_t = w_{t-1} - eta*g - lambda*w_{t-1}*relu(1-|g|)
    shrink = torch.where(1 - g.abs() > 0, 1 - g.abs(), torch.zeros_like(g))
    return w - eta * g - lmbda * w * shrink


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_matches_eq6_by_hand(dtype):
    model = _model().to(dtype)
    gm = lobster_fx.instrument(model)
    x, y = (t.to(dtype) for t in _data())
    eta, lmbda = 0.1, 0.05  # large lambda so the term is far above rounding
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    lobster_fx.Lobster(gm, opt, lmbda=lmbda)
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = _grads(gm, x, y)
        opt.step()
        for n, p in model.named_parameters():
            expected = hand_eq6(before[n], grads[n], eta, lmbda)
            tol = 1e-15 if dtype == torch.float64 else 1e-7  # rounding of eta*g only
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=tol)
            assert not torch.equal(p.detach(), before[n] - eta * grads[n])  # the term did act


def test_large_gradients_get_plain_sgd():
    gm = lobster_fx.instrument(nn.Linear(3, 1, bias=False))
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    lobster_fx.Lobster(gm, opt, lmbda=0.5)
    w = gm.get_parameter("weight")
    before = w.detach().clone()
    w.grad = torch.tensor([[2.0, -1.5, 0.5]])
    opt.step()
    expected = before - 0.01 * w.grad
    expected[0, 2] -= 0.5 * before[0, 2] * 0.5
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    ],
    ids=["sgd-momentum-wd", "adam", "adamw", "rmsprop"],
)
def test_any_optimizer_is_own_update_plus_decoupled_term(make_opt):
    lmbda = 0.02
    ref = _model()
    gm = lobster_fx.instrument(copy.deepcopy(ref))
    ref_opt, opt = make_opt(ref.parameters()), make_opt(gm.parameters())
    lobster_fx.Lobster(gm, opt, lmbda=lmbda)
    x, y = _data()
    ref_params = dict(ref.named_parameters())
    for _ in range(4):
        # the reference: the optimizer's own update, then the term computed at w_{t-1}
        before = {n: p.detach().clone() for n, p in ref_params.items()}
        grads = _grads(ref, x, y)
        ref_opt.step()
        with torch.no_grad():
            for n, p in ref_params.items():
                p.sub_(lmbda * before[n] * torch.relu(1 - grads[n].abs()))
        _grads(gm, x, y)
        opt.step()
    for n, p in ref_params.items():
        torch.testing.assert_close(gm.get_parameter(n), p, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_runs_rule_once_on_accumulated_gradient():
    model = _model()
    gm = lobster_fx.instrument(model)
    eta, lmbda = 0.1, 0.05
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda)
    x, y = _data(n=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        (nn.functional.mse_loss(gm(xb), yb) / 4).backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    assert rule.steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), hand_eq6(before[n], accumulated[n], eta, lmbda), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fused_rule", [False, True], ids=["eager-rule", "fused-rule"])
@pytest.mark.parametrize("fused_opt", [False, True], ids=["sgd", "fused-sgd"])
def test_grad_scaler_sees_unscaled_gradient_and_skipped_step_skips_rule(fused_opt, fused_rule):
    # A fused optimizer gets still-scaled gradients from GradScaler, which sets
    # optimizer.grad_scale / found_inf for that step (regression: the rule read them from the
    # step's kwargs only, saw |g| > 1 and skipped the shrink). Eq. (6) is on the true gradient.
    model = _model()
    gm = lobster_fx.instrument(model)
    eta, lmbda = 0.1, 0.05
    opt = torch.optim.SGD(gm.parameters(), lr=eta, fused=fused_opt)
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused_rule)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data()
    true_grads = _grads(copy.deepcopy(model), x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(gm(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert rule.steps == 1 and rule.fused == fused_rule
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), hand_eq6(before[n], true_grads[n], eta, lmbda), rtol=1e-6, atol=1e-7)
    # an inf gradient: GradScaler skips the step, and the rule with it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(gm(x), y)).backward()
    next(iter(gm.parameters())).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert rule.steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def _prune_half(gm):
    with torch.no_grad():
        for _, p, mask in masked_parameters(gm):
            mask.copy_((torch.arange(mask.numel()) % 2).view_as(mask).to(mask.dtype))
            p.mul_(mask)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "adamw"],
)
def test_pruned_parameters_stay_exactly_zero(make_opt):
    from lobster_fx.graph.instrument import masked_parameters

    gm = lobster_fx.instrument(_model())
    opt = make_opt(gm.parameters())
    lobster_fx.Lobster(gm, opt, lmbda=1e-3)
    x, y = _data()
    for _ in range(3):  # build up momentum / Adam state while everything is alive
        _grads(gm, x, y)
        opt.step()
    _prune_half(gm)
    for _ in range(5):
        _grads(gm, x, y)
        opt.step()
    for _, p, mask in masked_parameters(gm):
        assert torch.all(p[mask == 0] == 0)
        assert torch.all((p * mask)[mask == 0] == 0)
        assert torch.all(p[mask == 1] != 0)


def test_parameters_without_gradient_are_skipped():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["used"](x)

    gm = lobster_fx.instrument(Wrapper())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lobster_fx.Lobster(gm, opt, lmbda=0.1)
    unused = model["unused"].weight.detach().clone()
    gm(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert torch.equal(model["unused"].weight, unused)


def test_remove_detaches_and_state_dict_roundtrip():
    gm = lobster_fx.instrument(_model())
    eta = 0.1
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    rule = lobster_fx.Lobster(gm, opt, lmbda=0.05)
    x, y = _data()
    _grads(gm, x, y)
    opt.step()
    state = rule.state_dict()
    rule.remove()
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    grads = _grads(gm, x, y)
    opt.step()
    for n, p in gm.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - eta * grads[n])
    other = lobster_fx.Lobster(gm, torch.optim.SGD(gm.parameters(), lr=eta), lmbda=1.0)
    other.load_state_dict(state)
    assert other.lmbda == 0.05 and other.steps == 1


@pytest.mark.parametrize("bad", [-1e-4, float("nan"), float("inf")])
def test_bad_lambda_is_a_clear_error(bad):
    gm = lobster_fx.instrument(_model())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lmbda"):
        lobster_fx.Lobster(gm, opt, lmbda=bad)
    assert not opt._optimizer_step_pre_hooks


def test_optimizer_without_model_parameters_is_an_error():
    gm = lobster_fx.instrument(_model())
    with pytest.raises(ValueError, match="none of the instrumented"):
        lobster_fx.Lobster(gm, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="not produced by lobster_fx.graph.instrument"):
        lobster_fx.Lobster(_model(), torch.optim.SGD(_model().parameters(), lr=0.1))


def test_fsdp_sharded_parameters_are_a_clear_error(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gm = lobster_fx.instrument(_model())
        fully_shard(gm)
        opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        with pytest.raises(NotImplementedError, match="FSDP"):
            lobster_fx.Lobster(gm, opt)
        assert not opt._optimizer_step_pre_hooks
    finally:
        dist.destroy_process_group()


# --- the fused (torch.compile) rule: same arithmetic as the eager one, to float rounding ---


def test_fused_rule_matches_eq6_by_hand_and_pins_pruned_weights():
    model = _model().double()
    gm = lobster_fx.instrument(model)
    x, y = (t.double() for t in _data())
    eta, lmbda = 0.1, 0.05
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=True)
    for step in range(4):
        if step == 2:
            _prune_half(gm)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = _grads(gm, x, y)
        opt.step()
        assert rule.fused  # still the compiled path, no silent fallback
        for (n, p), (_, _, mask) in zip(model.named_parameters(), masked_parameters(gm)):
            expected = hand_eq6(before[n], grads[n], eta, lmbda)
            if step >= 2:
                expected = expected * mask
                assert torch.all(p[mask == 0] == 0)
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
            assert not torch.equal(p.detach(), (before[n] - eta * grads[n]) * (mask if step >= 2 else 1))
    rule.lmbda = 0.0  # a changed lambda takes effect in the compiled kernel (no stale constant)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(gm, x, y)
    opt.step()
    for (n, p), (_, _, mask) in zip(model.named_parameters(), masked_parameters(gm)):
        torch.testing.assert_close(p.detach(), (before[n] - eta * grads[n]) * mask, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),  # term after the update
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),  # shrink in place before it
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
    ],
    ids=["sgd-momentum-wd", "adamw", "sgd-momentum", "adam"],
)
def test_fused_and_eager_rule_agree(make_opt):
    ref = _model()
    eager_gm, fused_gm = lobster_fx.instrument(copy.deepcopy(ref)), lobster_fx.instrument(copy.deepcopy(ref))
    eager_opt, fused_opt = make_opt(eager_gm.parameters()), make_opt(fused_gm.parameters())
    lobster_fx.Lobster(eager_gm, eager_opt, lmbda=0.02, fused=False)
    fused_rule = lobster_fx.Lobster(fused_gm, fused_opt, lmbda=0.02, fused=True)
    x, y = _data()
    for step in range(6):
        if step == 3:
            _prune_half(eager_gm)
            _prune_half(fused_gm)
        for gm, opt in ((eager_gm, eager_opt), (fused_gm, fused_opt)):
            _grads(gm, x, y)
            opt.step()
    assert fused_rule.fused
    for (n, p), q in zip(eager_gm.named_parameters(), fused_gm.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)
        assert not torch.equal(p, ref.get_parameter(n))


def test_fused_compile_failure_warns_and_falls_back_to_the_eager_rule(monkeypatch):
    from lobster_fx.methods import base as rule_module

    def broken_compile(fn):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nlong traceback")
        return run

    monkeypatch.setattr(rule_module, "_compile_private", broken_compile)
    model = _model()
    gm = lobster_fx.instrument(model)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    rule = lobster_fx.Lobster(gm, opt, lmbda=0.05, fused=True)
    x, y = _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(gm, x, y)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        opt.step()
    assert not rule.fused and rule.steps == 1
    for n, p in model.named_parameters():  # the step still got the whole rule
        torch.testing.assert_close(p.detach(), hand_eq6(before[n], grads[n], 0.1, 0.05), rtol=0, atol=1e-7)


def test_fused_auto_follows_parameter_count_and_bad_value_is_an_error(monkeypatch):
    from lobster_fx.methods import base as rule_module

    gm = lobster_fx.instrument(_model())
    assert not lobster_fx.Lobster(gm, torch.optim.SGD(gm.parameters(), lr=0.1)).fused  # 53 weights
    monkeypatch.setattr(rule_module, "FUSE_MIN_NUMEL", 53)
    assert lobster_fx.Lobster(gm, torch.optim.SGD(gm.parameters(), lr=0.1)).fused
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fused must be"):
        lobster_fx.Lobster(gm, opt, fused="yes")
    assert not opt._optimizer_step_pre_hooks


class _ShrinkingSGD(torch.optim.SGD):
    """An update that reads the weight (w <- 0.9 w - lr g) and is not in the weight-free list."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(0.9).sub_(group["lr"] * p.grad)


@pytest.mark.parametrize("fused", [False, True], ids=["eager-rule", "fused-rule"])
def test_optimizer_that_reads_weights_gets_the_term_after_its_update(fused):
    # the in-place shrink before the step is only taken for the listed optimizers without
    # weight decay; here it would give 0.9 * (w - term) - lr g instead of 0.9 w - lr g - term
    from lobster_fx.methods.base import _update_reads_weights

    model = _model()
    gm = lobster_fx.instrument(model)
    eta, lmbda = 0.1, 0.05
    opt = _ShrinkingSGD(gm.parameters(), lr=eta)
    assert _update_reads_weights(opt) and not _update_reads_weights(torch.optim.SGD(gm.parameters(), lr=eta))
    lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused)
    x, y = _data()
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = _grads(gm, x, y)
        opt.step()
        for n, p in model.named_parameters():
            g = grads[n]
            expected = 0.9 * before[n] - eta * g - lmbda * before[n] * torch.relu(1 - g.abs())
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_compiled_optimizer_step_traces_the_rule_without_breaks_of_ours():
    # torch.compile(opt.step): the hooks are traced into the graph (the fused kernels and the
    # cached mask check step aside while compiling); same parameters as the eager step
    import torch._dynamo

    ref = _model()
    x, y = _data()
    params = {}
    for kind in ("eager", "compiled"):
        gm = lobster_fx.instrument(copy.deepcopy(ref))
        opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
        rule = lobster_fx.Lobster(gm, opt, lmbda=0.05, fused=True)
        step = torch.compile(opt.step, backend="aot_eager") if kind == "compiled" else opt.step
        for i in range(4):
            if i == 2:
                _prune_half(gm)
            _grads(gm, x, y)
            step()
        assert rule.steps == 4
        params[kind] = [p.detach().clone() for p in gm.parameters()]
        if kind == "compiled":
            _grads(gm, x, y)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(opt.step)()
            ours = [str(r.reason) for r in explained.break_reasons
                    if any("lobster_fx" in frame.filename for frame in r.user_stack)]
            assert ours == []
    for e, c in zip(params["eager"], params["compiled"]):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    for _, p, mask in masked_parameters(gm):
        assert torch.all(p[mask == 0] == 0)


def test_fused_rule_follows_a_changing_lambda_without_recompiling_out_of_the_fused_path():
    # regression: lambda went into the compiled kernels as a Python float, so each new value
    # recompiled, and the 9th hit dynamo's recompile limit, which dropped the rule to eager
    import warnings

    model = _model().double()
    gm = lobster_fx.instrument(model)
    x, y = (t.double() for t in _data())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    rule = lobster_fx.Lobster(gm, opt, lmbda=0.01, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        for step in range(12):
            rule.lmbda = 0.01 * (step + 1)  # e.g. a lambda warm-up schedule
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = _grads(gm, x, y)
            opt.step()
            assert rule.fused
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.detach(), hand_eq6(before[n], grads[n], 0.1, rule.lmbda), rtol=0, atol=1e-15)


@pytest.mark.parametrize("keep_buffers", [True, False])
def test_eager_rule_reuses_its_gradient_buffers_and_still_matches_eq6(monkeypatch, keep_buffers):
    """The eager rule keeps its |g| buffers across steps on small models (a fresh 1 MB buffer per
    step was page-faulted back in every step on LeNet-300); above SCRATCH_MAX_NUMEL it allocates
    per step. Both give eq. (6), with weight decay too (the term kept across the step)."""
    import lobster_fx.methods.base as rule_mod

    if not keep_buffers:
        monkeypatch.setattr(rule_mod, "SCRATCH_MAX_NUMEL", 0)
    for wd in (0.0, 0.01):
        model = _model().double()
        gm = lobster_fx.instrument(model)
        x, y = (t.double() for t in _data())
        eta, lmbda = 0.1, 0.05
        opt = torch.optim.SGD(gm.parameters(), lr=eta, weight_decay=wd)
        rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=False)
        seen = []
        for _ in range(3):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = _grads(gm, x, y)
            opt.step()
            seen.append([id(b) for b in rule._scratch[1]] if rule._scratch[1] is not None else None)
            for n, p in model.named_parameters():
                g = grads[n] + wd * before[n]
                shrink = torch.where(1 - grads[n].abs() > 0, 1 - grads[n].abs(), torch.zeros_like(g))
                expected = before[n] - eta * g - lmbda * before[n] * shrink
                torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
        if keep_buffers:
            assert seen[0] is not None and seen[0] == seen[1] == seen[2]
        else:
            assert seen == [None, None, None]
