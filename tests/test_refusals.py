"""Issue 13, the rule / pruning / instrumentation part: bad input is refused with a message
naming the problem, and a refused or failed call leaves the model and optimizer unchanged.

* a second ``Lobster`` on one optimizer (it would apply the term twice) is refused;
* ``lmbda`` / ``twt`` / ... of the wrong type or out of range name the argument;
* ``PlateauPruner.step`` is all or nothing, also when the rollback itself fails;
* meta-device models, DDP / DataParallel / ``torch.compile`` wrappers and scripted modules
  are refused by ``instrument``; ``gm.to_empty()`` leaves masks of ones, and ``.to()`` keeps
  a mask shared by two modules one tensor.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def _grads(gm):
    x, y = _batch()
    gm.zero_grad()
    nn.functional.mse_loss(gm(x), y).backward()


def _hooks(opt) -> tuple[int, int]:
    return len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


# --- 1. one rule per optimizer ---


def test_second_rule_on_the_same_optimizer_is_refused_and_changes_nothing():
    gm = lobster_fx.instrument(_model())
    eta, lmbda = 0.1, 0.5
    opt = torch.optim.SGD(gm.parameters(), lr=eta)
    first = lobster_fx.Lobster(gm, opt, lmbda=lmbda)
    with pytest.raises(ValueError, match=r"SGD optimizer \(id 0x[0-9a-f]+\) already has a rule") as e:
        lobster_fx.Lobster(gm, opt, lmbda=lmbda)
    assert "'0.weight'" in str(e.value) and ".remove()" in str(e.value) and "one rule per optimizer" in str(e.value)
    assert _hooks(opt) == (1, 1)  # the refused rule left no hook behind
    # one step applies eq. (6) once: w - eta * g - lmbda * w * relu(1 - |g|)
    _grads(gm)
    expected = {info.name: (p - eta * p.grad - lmbda * p * torch.relu(1 - p.grad.abs())).detach()
                for info, p, _ in masked_parameters(gm)}
    opt.step()
    for info, p, _ in masked_parameters(gm):
        torch.testing.assert_close(p.detach(), expected[info.name])
    # remove() frees the optimizer for another rule
    first.remove()
    second = lobster_fx.Lobster(gm, opt, lmbda=lmbda)
    assert _hooks(opt) == (1, 1) and second.optimizer is opt


def test_second_rule_through_a_second_instrumentation_of_the_same_model_is_refused():
    model = _model()
    gm_a, gm_b = lobster_fx.instrument(model), lobster_fx.instrument(model)  # both share model's weights
    opt = torch.optim.SGD(gm_a.parameters(), lr=0.1)
    lobster_fx.Lobster(gm_a, opt)
    with pytest.raises(ValueError, match="already has a rule"):
        lobster_fx.Lobster(gm_b, opt)


def test_rules_over_disjoint_models_may_share_an_optimizer():
    gm_a, gm_b = lobster_fx.instrument(_model(0)), lobster_fx.instrument(_model(1))
    opt = torch.optim.SGD([*gm_a.parameters(), *gm_b.parameters()], lr=0.1)
    lobster_fx.Lobster(gm_a, opt, lmbda=0.5)
    lobster_fx.Lobster(gm_b, opt, lmbda=0.5)  # no parameter in common: each applies the term once
    assert _hooks(opt) == (2, 2)


def test_rule_on_another_optimizer_over_the_same_parameters_warns_unless_the_first_is_gone():
    gm = lobster_fx.instrument(_model())
    lobster_fx.Lobster(gm, torch.optim.SGD(gm.parameters(), lr=0.1))  # rule and optimizer dropped at once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = lobster_fx.Lobster(gm, torch.optim.Adam(gm.parameters()))  # the dropped rule does not count
    opt_b = torch.optim.SGD(gm.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"'0.weight'.*also in another optimizer \(Adam"):
        lobster_fx.Lobster(gm, opt_b)
    assert kept.optimizer is not opt_b


# --- 2. argument checks name the argument ---


@pytest.mark.parametrize(("bad", "error"), [
    ("abc", TypeError), ("1e-4", TypeError), (True, TypeError), (None, TypeError), ([1e-4], TypeError),
    (float("nan"), ValueError), (float("inf"), ValueError), (-1e-4, ValueError),
])
def test_bad_lmbda_names_the_argument_and_registers_nothing(bad, error):
    gm = lobster_fx.instrument(_model())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    expected = f"Lobster: lmbda must be a finite float >= 0, got {bad!r} ({type(bad).__name__})"
    with pytest.raises(error) as e:
        lobster_fx.Lobster(gm, opt, lmbda=bad)
    assert str(e.value) == expected
    assert _hooks(opt) == (0, 0)
    lobster_fx.Lobster(gm, opt, lmbda=1e-4)  # the failed one did not claim the optimizer


def test_good_lmbda_types_are_taken():
    gm = lobster_fx.instrument(_model())
    for value in (0, 1e-4, np.float32(1e-4), torch.tensor(1e-4)):
        rule = lobster_fx.Lobster(gm, torch.optim.SGD(gm.parameters(), lr=0.1), lmbda=value)
        assert isinstance(rule.lmbda, float) and rule.lmbda == pytest.approx(float(value))
        rule.remove()


def test_rule_load_state_dict_checks_lmbda():
    gm = lobster_fx.instrument(_model())
    rule = lobster_fx.Lobster(gm, torch.optim.SGD(gm.parameters(), lr=0.1), lmbda=0.1)
    with pytest.raises(TypeError, match=r"Lobster.load_state_dict: lmbda must be .* got True \(bool\)"):
        rule.load_state_dict({"lmbda": True, "steps": 3, "seed": 0})
    assert rule.lmbda == 0.1


@pytest.mark.parametrize(("kw", "error", "message"), [
    ({"twt": None}, TypeError, "prune: twt must be a finite float >= 0, got None (NoneType)"),
    ({"twt": "x"}, TypeError, "prune: twt must be a finite float >= 0, got 'x' (str)"),
    ({"twt": True}, TypeError, "prune: twt must be a finite float >= 0, got True (bool)"),
    ({"twt": float("nan")}, ValueError, "prune: twt must be a finite float >= 0, got nan (float)"),
    ({"twt": -0.5}, ValueError, "prune: twt must be a finite float >= 0, got -0.5 (float)"),
    ({"precision": 1}, ValueError, "prune: precision must be a float in [0, 1), got 1 (int)"),
    ({"loss_before": "1.0"}, TypeError, "prune: loss_before must be a finite float, got '1.0' (str)"),
    ({"loss_before": float("inf")}, ValueError, "prune: loss_before must be a finite float, got inf (float)"),
    ({"evaluate": None}, TypeError, "prune: evaluate must be a callable model -> float loss, got None (NoneType)"),
])
def test_prune_arguments_are_named_and_the_model_is_untouched(kw, error, message):
    gm = lobster_fx.instrument(_model())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    kw = {"evaluate": lambda m: 1.0, "twt": 0.05, **kw}
    with pytest.raises(error) as e:
        lobster_fx.prune(gm, **kw)
    assert str(e.value) == message
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


@pytest.mark.parametrize(("kw", "error", "message"), [
    ({"twt": None}, TypeError, "twt must be a finite float >= 0, got None (NoneType)"),
    ({"twt": "x"}, TypeError, "twt must be a finite float >= 0, got 'x' (str)"),
    ({"pwe": 2.5}, TypeError, "pwe must be an int >= 1, got 2.5 (float)"),
    ({"pwe": True}, TypeError, "pwe must be an int >= 1, got True (bool)"),
    ({"pwe": 0}, ValueError, "pwe must be an int >= 1, got 0 (int)"),
    ({"rollback": "no"}, TypeError, "rollback must be True or False, got 'no' (str)"),
    ({"every_n_iterations": "10"}, TypeError, "every_n_iterations must be an int >= 1, got '10' (str)"),
    ({"threshold": None}, TypeError, "threshold must be a float in [0, 1), got None (NoneType)"),
    ({"search_precision": float("nan")}, ValueError, "search_precision must be a float in [0, 1), got nan (float)"),
    ({"sync_distributed": None}, TypeError, "sync_distributed must be True or False, got None (NoneType)"),
    ({"evaluate": "loss"}, TypeError, "evaluate must be a callable model -> float loss, got 'loss' (str)"),
])
def test_plateau_pruner_arguments_are_named(kw, error, message):
    kw = {"evaluate": lambda m: 1.0, **kw}
    with pytest.raises(error) as e:
        lobster_fx.PlateauPruner(lobster_fx.instrument(_model()), **kw)
    assert str(e.value) == f"PlateauPruner: {message}"


def test_plateau_pruner_on_a_model_that_is_not_instrumented_is_refused_at_once():
    with pytest.raises(TypeError, match="not produced by lobster_fx.graph.instrument"):
        lobster_fx.PlateauPruner(_model(), lambda m: 1.0)


def test_plateau_pruner_accepts_integral_floats_and_keeps_types():
    pruner = lobster_fx.PlateauPruner(lobster_fx.instrument(_model()), lambda m: 1.0, twt=0, pwe=3.0,
                                      every_n_iterations=4, rollback=1)
    assert (pruner.twt, pruner.pwe, pruner.every_n_iterations, pruner.rollback) == (0.0, 3, 4, True)
    assert type(pruner.pwe) is int and type(pruner.twt) is float


def test_plateau_pruner_load_state_dict_is_checked_before_anything_changes():
    pruner = lobster_fx.PlateauPruner(lobster_fx.instrument(_model()), lambda m: 1.0, pwe=2)
    pruner.step(1.0)
    state = pruner.state_dict()
    before = dict(pruner.__dict__)
    with pytest.raises(TypeError, match=r"PlateauPruner.load_state_dict: pwe must be an int >= 1, got None"):
        pruner.load_state_dict({**state, "twt": 0.3, "pwe": None})
    assert pruner.__dict__ == before  # twt (checked before pwe) was not taken either


# --- 3. PlateauPruner.step is all or nothing ---


class _Boom(RuntimeError):
    pass


def _pruner_after_a_plateau(optimizer_cls=torch.optim.Adam):
    """A pruner with a best snapshot, then worse epochs: the next step(2.0) rolls back and prunes.

    Between the snapshot and now the weights, the Adam moments and step counts and a mask
    all changed, so the rolled-back state differs from the current one in each of them."""
    gm = lobster_fx.instrument(_model())
    opt = optimizer_cls(gm.parameters(), lr=0.01)
    x, y = _batch()

    def evaluate(m):
        with torch.no_grad():
            return float(nn.functional.mse_loss(m(x), y))

    pruner = lobster_fx.PlateauPruner(gm, evaluate, twt=0.05, pwe=2, optimizer=opt)
    for val in (1.0, 1.5):  # best epoch (snapshot), then one bad epoch
        _grads(gm)
        opt.step()
        assert pruner.step(val) is None
    _grads(gm)
    opt.step()
    with torch.no_grad():
        lobster_fx.masks(gm)["0.weight"][0, :3] = 0  # a mask edited after the snapshot
    return gm, opt, pruner


def _everything(gm, opt, pruner):
    return {
        "model": {k: v.clone() for k, v in gm.state_dict().items()},  # weights and masks
        "masks": {k: v.clone() for k, v in lobster_fx.masks(gm).items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "counters": (pruner.calls, pruner.bad_epochs, pruner.best, len(pruner.history)),
        "best_state": {k: v.clone() for k, v in pruner._best_state.items()},
    }


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        # bit for bit: same dtype, shape and bytes (NaN payloads and signed zeros included)
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return a == b


@pytest.mark.parametrize("fail_at", [1, 3])  # the loss before pruning, or inside the bisection
@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_failing_pruning_phase_restores_weights_masks_adam_state_and_counters(fail_at, error):
    gm, opt, pruner = _pruner_after_a_plateau()
    before = _everything(gm, opt, pruner)
    assert not _same(before["model"], pruner._best_state)  # a rollback would show
    real, calls = pruner.evaluate, []

    def failing(m):
        calls.append(1)
        if len(calls) == fail_at:
            raise error("evaluation failed")
        return real(m)

    pruner.evaluate = failing
    with pytest.raises(error):
        pruner.step(2.0)
    assert len(calls) == fail_at
    assert _same(_everything(gm, opt, pruner), before)


def test_failing_rollback_restores_the_state_from_before_the_call(monkeypatch):
    gm, opt, pruner = _pruner_after_a_plateau()
    before = _everything(gm, opt, pruner)
    real_load, loads = opt.load_state_dict, []

    def load_fails_once(state):  # e.g. out of memory while copying the snapshot's moments
        loads.append(1)
        if len(loads) == 1:
            raise _Boom("out of memory")
        return real_load(state)

    monkeypatch.setattr(opt, "load_state_dict", load_fails_once)
    with pytest.raises(_Boom):
        pruner.step(2.0)
    assert _same(_everything(gm, opt, pruner), before)  # not the rolled-back weights


@pytest.mark.parametrize(("val_loss", "error"), [(None, ValueError), ("abc", TypeError), (float("nan"), ValueError)])
def test_bad_val_loss_leaves_the_counters_as_they_were(val_loss, error):
    pruner = lobster_fx.PlateauPruner(lobster_fx.instrument(_model()), lambda m: 1.0, pwe=2)
    pruner.step(1.0)
    counters = (pruner.calls, pruner.bad_epochs, pruner.best)
    with pytest.raises(error, match="val_loss"):
        pruner.step(val_loss)
    assert (pruner.calls, pruner.bad_epochs, pruner.best) == counters


# --- 4. meta models, to_empty, shared masks under .to() ---


def test_meta_model_is_refused_with_what_to_do():
    model = _model().to("meta")
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the meta device.*to_empty\(device=") as e:
        lobster_fx.instrument(model)
    assert "load_state_dict" in str(e.value)


def test_to_empty_then_loading_the_original_weights_gives_masks_of_ones():
    model = _model()
    reference = copy.deepcopy(model)
    gm = lobster_fx.instrument(model)
    with torch.no_grad():
        for mask in lobster_fx.masks(gm).values():
            mask.zero_()  # memory to_empty may hand back: the old masks' zeros
    gm.to_empty(device="cpu")
    gm.load_state_dict(reference.state_dict())  # the original's checkpoint: no masks
    assert all(torch.equal(m, torch.ones_like(m)) for m in lobster_fx.masks(gm).values())
    x, _ = _batch()
    assert torch.equal(gm(x), reference(x))


class _TiedHead(nn.Module):
    """Uses a weight tied to an embedding, in code that does not trace (masked by a parametrization)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.sum() > -1e9:  # data-dependent branch: opaque to FX
            return h @ self.weight.t()
        return h


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = _TiedHead(self.emb.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def _mask_buffers(gm) -> dict[str, torch.Tensor]:
    return {n: b for n, b in gm.named_buffers(remove_duplicate=False) if "mask" in n}


@pytest.mark.parametrize("convert", ["double", "to_empty"])
def test_a_mask_shared_by_two_uses_stays_one_tensor_after_conversion(convert):
    torch.manual_seed(0)
    gm = lobster_fx.instrument(_TiedLM())
    assert len({id(b) for b in _mask_buffers(gm).values()}) == 1 < len(_mask_buffers(gm))
    if convert == "double":
        gm.double()
    else:
        gm.to_empty(device="cpu")
    buffers = _mask_buffers(gm)
    assert len({id(b) for b in buffers.values()}) == 1, sorted(buffers)  # before: one tensor per module
    mask = lobster_fx.masks(gm)["emb.weight"]
    assert all(b is mask for b in buffers.values())


# --- 5. wrappers and scripted modules ---


def test_data_parallel_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match=r"got a DataParallel wrapper: instrument the module before wrapping it"):
        lobster_fx.instrument(nn.DataParallel(_model()))


@pytest.fixture
def gloo_group():
    """A single-process gloo group for the test, destroyed after it."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is needed")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture
def shard(gloo_group):
    """FSDP2's ``fully_shard`` on a one-rank CPU mesh: ``shard(module)``."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) is needed")
    from torch.distributed.device_mesh import init_device_mesh

    return lambda module: fsdp.fully_shard(module, mesh=init_device_mesh("cpu", (1,)))


@pytest.mark.usefixtures("gloo_group")
def test_ddp_is_refused_with_what_to_do():
    ddp = nn.parallel.DistributedDataParallel(_model())
    with pytest.raises(TypeError, match=r"DistributedDataParallel\(gm, \.\.\.\)"):
        lobster_fx.instrument(ddp)


@pytest.mark.parametrize("where", ["root", "child"])
def test_fsdp2_sharded_model_is_refused_with_what_to_do_and_left_alone(where, shard):
    # before the refusal, fully_shard'ed models failed inside tracing: "FSDP does not support deepcopy"
    model = _model()
    shard(model if where == "root" else next(m for m in model.modules() if isinstance(m, nn.Linear)))

    def whole(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    before = {k: whole(v).clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"sharded with FSDP .*not supported.*DistributedDataParallel"):
        lobster_fx.instrument(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], whole(after[k])) for k in before)
    assert not any("lobster" in type(m).__name__.lower() for m in model.modules())


def test_a_rule_refuses_a_model_sharded_after_instrument(shard):
    """instrument, then fully_shard: the masks stay plain tensors, so the rule refuses, naming the DTensor."""
    from lobster_fx.graph.instrument import is_dtensor

    gm = lobster_fx.instrument(_model())
    assert not any(is_dtensor(p) for p in gm.parameters())
    try:
        shard(gm)
    except Exception as e:  # noqa: BLE001 - a torch that cannot shard a GraphModule: nothing to test
        pytest.skip(f"fully_shard refused the instrumented module: {type(e).__name__}: {e}")
    assert any(is_dtensor(p) for p in gm.parameters())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match=r"FSDP / DTensor-sharded parameters.*is a DTensor"):
        lobster_fx.Lobster(gm, opt)


def test_torch_compile_wrapper_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match=r"torch.compile wrapper \(OptimizedModule\).*torch.compile\(gm\)"):
        lobster_fx.instrument(torch.compile(_model()))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_scripted_modules_are_refused(how):
    model = _model()
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(2, 6))
    with pytest.raises(TypeError, match=r"scripted modules \(torch.jit.ScriptModule.*instrument the nn.Module before"):
        lobster_fx.instrument(scripted)


def test_wrapped_instrumented_model_still_works_with_rule_and_prune():
    """Refusing wrappers at instrument time keeps the documented order working: instrument, then wrap."""
    gm = lobster_fx.instrument(_model())
    dp = nn.DataParallel(gm)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    rule = lobster_fx.Lobster(dp, opt, lmbda=0.1)
    _grads(dp)
    opt.step()
    assert rule.steps == 1
    x, y = _batch()
    result = lobster_fx.prune(dp, lambda m: float(nn.functional.mse_loss(m(x), y)), twt=1.0)
    assert result.total > 0
