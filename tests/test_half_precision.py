"""The LOBSTER rule with bfloat16 / float16 parameters (issue 12, item 1).

At lmbda=1e-4 the term ``lmbda * w * relu(1 - |g|)`` is below half an ulp of ``w`` in
both half formats (bf16: 2**-9 relative, fp16: 2**-12), so ``w - term`` rounded to
nearest is ``w`` again and the weights never shrink. The rule computes half parameters
in float32 and rounds stochastically, which moves them like float32 in expectation.
"""

import copy

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]


def _fixed_grads(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for n, p in model.named_parameters():
        grad = 0.05 * torch.randn(p.shape, generator=g)
        grad.view(-1)[::17] = 2.0  # |g| > 1: no shrink there
        grads[n] = grad
    return grads


def _run_fixed(dtype, make_opt, fused, steps=200, lmbda=1e-4):
    """``steps`` rule steps with a fixed gradient; the model starts from bf16-representable
    values, so every dtype starts from the same weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(torch.bfloat16).to(dtype)
    gm = lobster_fx.instrument(model)
    opt = make_opt(gm.parameters())
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused)
    grads = _fixed_grads(model)
    w0 = gm.get_parameter("0.weight").detach().double().abs().mean()
    for _ in range(steps):
        for n, p in gm.named_parameters():
            p.grad = grads[n].to(dtype)
        opt.step()
    assert rule.steps == steps and rule.fused == fused
    return (gm.get_parameter("0.weight").detach().double().abs().mean() / w0).item(), gm


OPTS = {
    # lr=0: only the rule moves the weights. Plain SGD takes the in-place shrink before the
    # step; weight_decay makes the update read w, so the term is added after the step
    "shrink-before": lambda ps: torch.optim.SGD(ps, lr=0.0),
    "term-after": lambda ps: torch.optim.SGD(ps, lr=0.0, weight_decay=1e-2),
}


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("path", list(OPTS))
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_params_shrink_like_float32(dtype, path, fused):
    ref, _ = _run_fixed(torch.float32, OPTS[path], fused=False)
    assert 0.975 < ref < 0.985  # float32: about 0.980 after 200 steps
    got, _ = _run_fixed(dtype, OPTS[path], fused=fused)
    # Stochastic rounding is unbiased; its noise per weight after 200 steps is at most
    # sqrt(200 / 4) = 7 ulp, ~2**-7 * 7 = 5% of |w| in bf16, and ~8e-4 on the mean of 4096
    # weights (fp16: 8x less). 2e-3 is 2.5 of those, and 10x below the fall itself (2e-2),
    # which round-to-nearest never starts
    assert got == pytest.approx(ref, rel=2e-3), f"{dtype}: mean |w| ratio {got} vs float32 {ref}"


@pytest.mark.parametrize("path", list(OPTS))
def test_large_half_params_are_rounded_in_slices_with_the_same_result_on_average(monkeypatch, path):
    import lobster_fx.methods.base as rule_mod

    monkeypatch.setattr(rule_mod, "HALF_CHUNK_NUMEL", 1000)  # 0.weight (4096) in 5 slices
    seen = []
    real = rule_mod._stochastic_round
    monkeypatch.setattr(rule_mod, "_stochastic_round", lambda v, *a: seen.append(v.numel()) or real(v, *a))
    ref, _ = _run_fixed(torch.float32, OPTS[path], fused=False)
    got, _ = _run_fixed(torch.bfloat16, OPTS[path], fused=False, steps=200)
    assert max(seen) == 1000 and seen[:5] == [1000, 1000, 1000, 1000, 96]
    assert got == pytest.approx(ref, rel=2e-3)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_training_loop_shrinks_like_float32(dtype):
    # the same through backward(): the brief's case, lr=0, lmbda=1e-4, 200 steps
    ratios = {}
    for dt in (torch.float32, dtype):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16).to(dt)
        gm = lobster_fx.instrument(model)
        opt = torch.optim.SGD(gm.parameters(), lr=0.0)
        lobster_fx.Lobster(gm, opt, lmbda=1e-4)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 32, generator=g).to(dt), torch.randn(16, 4, generator=g).to(dt)
        w0 = gm.get_parameter("0.weight").detach().double().abs().mean()
        for _ in range(200):
            opt.zero_grad()
            nn.functional.mse_loss(gm(x), y).backward()
            opt.step()
        ratios[dt] = (gm.get_parameter("0.weight").detach().double().abs().mean() / w0).item()
    assert ratios[torch.float32] < 0.985
    # 1024 weights: the rounding noise on the mean is 2x the test above's
    assert ratios[dtype] == pytest.approx(ratios[torch.float32], rel=4e-3), ratios


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_stochastic_round_is_exact_on_the_grid_and_unbiased_between(dtype):
    from lobster_fx.methods.base import _stochastic_round

    gen = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    # on the grid (zeros of either sign, subnormals, the extremes, infinities, NaN with a full
    # payload, which a carry would turn into 0): returned unchanged
    grid = torch.tensor([0.0, -0.0, 1.0, -3.5, info.tiny, info.smallest_normal / 4, -info.smallest_normal / 2,
                         info.max, -info.max, float("inf"), -float("inf"), float("nan")], dtype=dtype).float()
    grid = torch.cat([grid, torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)])  # NaNs
    before = grid.clone()
    out = _stochastic_round(grid, dtype, gen)
    assert torch.equal(grid.view(torch.int32), before.view(torch.int32))  # the input is left alone
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), grid, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(out[:-3]), torch.signbit(grid[:-3]))  # -0.0 stays -0.0
    # between two neighbours (normal, negative, subnormal, just below the smallest normal,
    # large): only those two, up with the probability of the distance from the lower one
    n = 200_000
    cases = [(1.0, 0.3), (-1.5, 0.01), (info.smallest_normal / 8, 0.7), (-info.smallest_normal / 3, 0.25),
             (info.smallest_normal * (1 - info.eps), 0.5), (1000.0, 0.5)]
    for lo, frac in cases:
        lo_t = torch.tensor(lo, dtype=dtype)
        hi_t = (lo_t.view(torch.int16) + 1).view(dtype)  # the next value away from zero
        v = lo_t.float() + frac * (hi_t.float() - lo_t.float())
        out = _stochastic_round(v.expand(n).contiguous(), dtype, gen).float()
        assert set(out.unique().tolist()) <= {lo_t.item(), hi_t.item()}, (lo, frac)
        up = (out == hi_t.float()).double().mean().item()
        assert up == pytest.approx(frac, abs=5 * (frac * (1 - frac) / n) ** 0.5 + 1e-4), (lo, frac, up)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_pruned_half_params_stay_exactly_zero(dtype):
    torch.manual_seed(0)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype))
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    lobster_fx.Lobster(gm, opt, lmbda=1e-2)
    x, y = torch.randn(8, 16).to(dtype), torch.randn(8, 4).to(dtype)
    for step in range(6):
        if step == 3:  # after momentum has built up
            with torch.no_grad():
                for _, p, mask in masked_parameters(gm):
                    mask.copy_((torch.arange(mask.numel()) % 2).view_as(mask).to(mask.dtype))
                    p.mul_(mask)
        opt.zero_grad()
        nn.functional.mse_loss(gm(x), y).backward()
        opt.step()
    for _, p, mask in masked_parameters(gm):
        assert p.dtype == dtype
        assert torch.all(p[mask == 0] == 0) and torch.all(p[mask == 1] != 0)


def _run_steps(gm, opt, grads, steps):
    for _ in range(steps):
        for n, p in gm.named_parameters():
            p.grad = grads[n].to(p.dtype)
        opt.step()


def test_rounding_is_the_same_on_every_rank_and_a_resumed_run_equals_an_uninterrupted_one():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(torch.bfloat16)
    grads = _fixed_grads(base)

    def fresh(seed=0):
        gm = lobster_fx.instrument(copy.deepcopy(base))
        opt = torch.optim.SGD(gm.parameters(), lr=0.0)
        return gm, opt, lobster_fx.Lobster(gm, opt, lmbda=1e-3, seed=seed)

    # two "ranks": same seed, same gradients, no communication -> the same bits
    (a, a_opt, _), (b, b_opt, _) = fresh(), fresh()
    _run_steps(a, a_opt, grads, 20)
    _run_steps(b, b_opt, grads, 20)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # another seed rounds differently (the bits come from the seed, not from torch's global RNG)
    c, c_opt, _ = fresh(seed=1)
    _run_steps(c, c_opt, grads, 20)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))

    # resume: 10 steps, checkpoint, 10 more in a new process-like setup == 20 uninterrupted
    d, d_opt, d_rule = fresh(seed=7)
    _run_steps(d, d_opt, grads, 10)
    torch.manual_seed(123)  # the global RNG state differs after a restart
    ckpt = {"model": copy.deepcopy(d.state_dict()), "rule": d_rule.state_dict()}
    assert ckpt["rule"]["seed"] == 7 and ckpt["rule"]["steps"] == 10
    e, e_opt, e_rule = fresh(seed=0)
    e.load_state_dict(ckpt["model"])
    e_rule.load_state_dict(ckpt["rule"])
    _run_steps(e, e_opt, grads, 10)
    f, f_opt, _ = fresh(seed=7)
    _run_steps(f, f_opt, grads, 20)
    for p, q in zip(e.parameters(), f.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_mixed_precision_model_float32_layer_keeps_eq6_exactly(fused):
    # a float32 layer next to a bf16 one: the float32 one gets today's arithmetic (eq. (6) by
    # hand), the bf16 one the rounded path; no cross-talk between the two lists
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].to(torch.bfloat16)
    gm = lobster_fx.instrument(model)
    eta, lmbda = 0.1, 0.05
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = {n: 0.5 * torch.randn(p.shape, generator=g).to(p.dtype) for n, p in gm.named_parameters()}
        before = {n: p.detach().clone() for n, p in gm.named_parameters()}
        for n, p in gm.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        assert rule.fused == fused
        for n in ("0.weight", "0.bias"):
            w, gr = before[n], grads[n]
            expected = w - eta * gr - lmbda * w * torch.relu(1 - gr.abs())
            torch.testing.assert_close(gm.get_parameter(n).detach(), expected, rtol=0, atol=1e-7)
        for n in ("1.weight", "1.bias"):
            w, gr = before[n].float(), grads[n].float()
            w32 = w - eta * gr - lmbda * w * torch.relu(1 - gr.abs())
            got = gm.get_parameter(n).detach()
            assert got.dtype == torch.bfloat16
            # SR's pick of a neighbour (< 1 ulp) plus SGD's own rounding in bf16 (<= 1/2 ulp), an
            # ulp being <= 2**-7 of the operands' magnitude (w - eta*g can cancel)
            bound = 1.5 * 2 ** -7 * (w.abs() + eta * gr.abs())
            assert torch.all((got.float() - w32).abs() <= bound), n
