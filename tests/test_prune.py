"""The pruning phase: threshold guarantee, evaluation count, edge cases, errors."""

import importlib
import math

import pytest
import torch
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters

prune_module = importlib.import_module("lobster_fx.pruning.prune")


def _known_loss_model(seed=0):
    torch.manual_seed(seed)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 5)))
    originals = {n: p.detach().clone() for n, p in gm.named_parameters()}
    seen = []

    def evaluate(model):
        # loss = 1 + sum of squares of the zeroed weights: known for any threshold
        lost = sum(float(originals[n][p == 0].square().sum()) for n, p in model.named_parameters())
        seen.append(min((float(p.detach().abs()[p != 0].min()) for _, p in model.named_parameters()), default=math.inf))
        return 1.0 + lost

    return gm, originals, evaluate, seen


def _largest_admissible_threshold(originals, twt):
    mags = torch.cat([w.abs().flatten() for w in originals.values()]).double()
    best = -math.inf
    for t in torch.unique(mags):  # by hand: try every candidate
        if 1.0 + float(mags[mags <= t].square().sum()) <= 1.0 + twt:
            best = float(t)
    return best


@pytest.mark.parametrize("twt", [0.05, 0.3, 1.0])
def test_threshold_is_largest_admissible_and_evaluated(twt):
    gm, originals, evaluate, _ = _known_loss_model()
    n = sum(w.numel() for w in originals.values())
    result = lobster_fx.prune(gm, evaluate, twt)
    expected = _largest_admissible_threshold(originals, twt)
    assert result.threshold == pytest.approx(expected, rel=1e-6)
    assert result.loss_after <= (1 + twt) * result.loss_before
    assert result.loss_after == pytest.approx(evaluate(gm))  # the state we kept was evaluated
    assert result.evaluations <= math.ceil(math.log2(n + 1)) + 2
    assert result.pruned == sum(int((w.abs() <= result.threshold).sum()) for w in originals.values())
    for info, p, mask in masked_parameters(gm):
        w = originals[info.name]
        assert torch.equal(mask == 0, w.abs() <= result.threshold)
        assert torch.equal(p.detach(), w * mask)


@pytest.mark.parametrize("precision", [0.01, 0.1])
def test_coarse_search_saves_evaluations_and_stays_within_precision(precision):
    gm_exact, originals, evaluate_exact, _ = _known_loss_model()
    exact = lobster_fx.prune(gm_exact, evaluate_exact, 0.3)
    gm, originals, evaluate, _ = _known_loss_model()
    result = lobster_fx.prune(gm, evaluate, 0.3, precision=precision)
    n = sum(w.numel() for w in originals.values())  # all distinct here
    assert result.threshold <= exact.threshold
    assert result.loss_after <= 1.3 * result.loss_before
    assert result.loss_after == pytest.approx(evaluate(gm))  # still an evaluated state
    assert exact.pruned - result.pruned <= precision * n
    # bisection stops log2(precision * n) halvings early
    assert result.evaluations <= exact.evaluations - math.floor(math.log2(precision * n)) + 1
    assert result.evaluations < exact.evaluations


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_bad_precision(bad):
    gm, _, evaluate, _ = _known_loss_model()
    with pytest.raises(ValueError, match="precision"):
        lobster_fx.prune(gm, evaluate, 0.05, precision=bad)
    with pytest.raises(ValueError, match="search_precision"):
        lobster_fx.PlateauPruner(gm, evaluate, search_precision=bad)


def test_pruned_stay_pinned_across_rounds():
    gm, _, evaluate, _ = _known_loss_model()
    lobster_fx.prune(gm, evaluate, 0.05)
    first = {k: v.clone() for k, v in lobster_fx.masks(gm).items()}
    with torch.no_grad():  # weights that were pruned would come back if not pinned
        for _, p, mask in masked_parameters(gm):
            p.add_(1.0).mul_(mask)
    lobster_fx.prune(gm, lambda m: 1.0, 0.05)
    for k, mask in lobster_fx.masks(gm).items():
        assert torch.all(mask[first[k] == 0] == 0)


def test_twt_zero_prunes_only_free_weights():
    gm = lobster_fx.instrument(nn.Linear(4, 3))
    with torch.no_grad():
        gm.get_parameter("bias").zero_()
    x = torch.randn(16, 4)
    y = gm(x).detach()  # any change but zeroing the zero bias costs loss
    result = lobster_fx.prune(gm, lambda m: float(nn.functional.mse_loss(m(x), y)), 0.0)
    assert result.pruned == 3  # only the zero bias costs nothing
    assert torch.all(lobster_fx.masks(gm)["weight"] == 1)


def test_all_zero_layer_and_nothing_left():
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    with torch.no_grad():
        gm.get_parameter("0.weight").zero_()
    result = lobster_fx.prune(gm, lambda m: 1.0, 0.1)  # flat loss: everything goes
    assert result.remaining == 0 and result.pruned == result.total
    again = lobster_fx.prune(gm, lambda m: 1.0, 0.1)
    assert again.pruned == 0 and again.threshold == -math.inf and again.evaluations == 1


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_bad_twt(bad):
    gm = lobster_fx.instrument(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="twt"):
        lobster_fx.prune(gm, lambda m: 1.0, bad)


def test_nan_loss_is_an_error_and_model_untouched():
    gm = lobster_fx.instrument(nn.Linear(4, 3))
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    calls = []

    def evaluate(model):
        calls.append(1)
        return 1.0 if len(calls) < 3 else float("nan")

    with pytest.raises(ValueError, match="nan"):
        lobster_fx.prune(gm, evaluate, 0.1)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="nan"):
        lobster_fx.prune(gm, lambda m: float("nan"), 0.1)


def test_prune_restores_the_active_graph_with_the_mode():
    # regression: restoring only the .training flags left the eval graph active in train mode
    import torchvision

    torch.manual_seed(0)
    gm = lobster_fx.instrument(torchvision.models.convnext_tiny(num_classes=3)).train()
    train_graph = gm.graph
    x = torch.randn(2, 3, 32, 32)

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            return float(model(x).square().mean())

    lobster_fx.prune(gm, evaluate, 0.0)
    assert gm.training and gm.graph is train_graph


def test_distinct_magnitudes_equal_torch_unique_over_live_entries():
    """The lean candidate list is exactly torch.unique over the unmasked |w| (ties, zeros, masks, dtypes)."""
    from lobster_fx.pruning.prune import distinct_magnitudes

    g = torch.Generator().manual_seed(0)
    weights = [
        torch.randint(-50, 50, (30, 7), generator=g).float() / 8,  # many ties, both signs, zeros
        torch.randn(13, generator=g).half(),  # another dtype: promoted, every value exact
        torch.randn(4, 4, generator=g).double(),
    ]
    masks = [(torch.rand(w.shape, generator=g) > 0.3).to(w.dtype) for w in weights]
    got = distinct_magnitudes(weights, masks)
    want = torch.unique(torch.cat([w.double().abs()[m != 0] for w, m in zip(weights, masks)]))
    assert got.dtype == torch.float64
    assert torch.equal(got, want)
    f32 = distinct_magnitudes(weights[:1], masks[:1])
    assert f32.dtype == torch.float32 and torch.equal(f32.double(), torch.unique(weights[0].abs()[masks[0] != 0]).double())
    everything_masked = distinct_magnitudes(weights[:1], [torch.zeros_like(weights[0])])
    assert everything_masked.numel() == 0
    assert distinct_magnitudes([], []).numel() == 0


# --- the loss all-reduce runs on the process group's device (NCCL rejects CPU tensors) ---


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("nccl", "cuda:3"), ("gloo", "cpu"), ("mpi", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("xccl", "xpu:3")],
)
def test_reduction_device_follows_the_backend(monkeypatch, backend, expected):
    """Chosen from the backend's name alone, so it is checked without CUDA or a process group."""
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "current_device", lambda: 3)
    elif backend == "xccl":
        pytest.skip("this torch has no torch.xpu")
    assert prune_module._reduction_device() == torch.device(expected)


def test_all_reduce_mean_reduces_on_the_reduction_device(monkeypatch):
    """The wiring without CUDA: the tensor handed to all_reduce lives where _reduction_device says."""
    seen = []

    class Reduced(Exception):
        pass

    def fake_all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise Reduced  # a meta tensor has no value to read back

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(prune_module, "_reduction_device", lambda group=None: torch.device("meta"), raising=False)
    with pytest.raises(Reduced):
        prune_module._all_reduce_mean(1.5)
    assert seen == [torch.device("meta")]


def _init_single_rank(backend: str, tmp_path) -> None:
    torch.distributed.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_prune_under_a_real_gloo_group_reduces_on_cpu(tmp_path):
    _init_single_rank("gloo", tmp_path)
    try:
        assert prune_module._reduction_device() == torch.device("cpu")
        assert prune_module._all_reduce_mean(1.25) == 1.25
        gm, _, evaluate, _ = _known_loss_model()
        assert lobster_fx.prune(gm, evaluate, 0.05).pruned > 0
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                    reason="needs CUDA and NCCL")
def test_prune_under_a_real_nccl_group(tmp_path):
    """Regression: the CPU tensor of the old all-reduce made NCCL raise at the first pruning phase."""
    torch.cuda.set_device(0)
    _init_single_rank("nccl", tmp_path)
    try:
        assert prune_module._reduction_device() == torch.device("cuda", 0)
        assert prune_module._all_reduce_mean(1.25) == 1.25
        gm, _, evaluate, _ = _known_loss_model()
        assert lobster_fx.prune(gm, evaluate, 0.05).pruned > 0
    finally:
        torch.distributed.destroy_process_group()
