"""instrument: masks everywhere, bit-identical outputs in both modes, fallbacks, errors."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import lobster_fx
from lobster_fx.graph.instrument import masked_parameters

# a sample of torchvision classification models in CI, chosen to cover what breaks
# naive tracing: stochastic depth (convnext, efficientnet, swin, maxvit), auxiliary
# heads (googlenet), MultiheadAttention (vit), squeeze-excite (mobilenet_v3).
SAMPLE = [
    ("resnet18", 64),
    ("googlenet", 64),
    ("convnext_tiny", 64),
    ("efficientnet_b0", 64),
    ("mobilenet_v3_small", 64),
    ("swin_t", 64),
    ("vit_b_16", 224),
    ("maxvit_t", 224),
]


def _outputs_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_outputs_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_outputs_equal(x, y) for x, y in zip(a, b))
    return a == b


def _check_both_modes(model, gm, *inputs):
    for mode in (False, True, False):
        model.train(mode)
        gm.train(mode)
        # train mode runs with autograd on, as in training (with autograd off and
        # dropout on, SDPA may pick another kernel for a parametrized MHA)
        with torch.set_grad_enabled(mode):
            torch.manual_seed(123)
            expected = model(*inputs)
            torch.manual_seed(123)
            got = gm(*inputs)
        assert _outputs_equal(expected, got), f"outputs differ in {'train' if mode else 'eval'} mode"


@pytest.mark.parametrize("name,size", SAMPLE, ids=[n for n, _ in SAMPLE])
def test_torchvision_bit_identical_in_both_modes(name, size):
    torch.manual_seed(0)
    kwargs = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    if name == "vit_b_16":  # keep CI fast: two encoder layers are enough to cover the route
        model.encoder.layers = model.encoder.layers[:2]
    model.eval()  # instrumented in eval mode, then switched to train mode in the check
    gm = lobster_fx.instrument(model)
    assert isinstance(gm, torch.fx.GraphModule)
    x = torch.randn(2, 3, size, size)
    _check_both_modes(model, gm, x)
    masked = lobster_fx.masks(gm)
    for fqn, p in model.named_parameters():
        owner = model.get_submodule(fqn.rpartition(".")[0])
        if lobster_fx.default_filter(owner, fqn):
            assert fqn in masked, fqn
            assert masked[fqn].shape == p.shape and torch.all(masked[fqn] == 1)
        else:
            assert fqn not in masked, fqn


def test_masks_apply_in_forward_and_are_in_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    gm = lobster_fx.instrument(model).eval()
    model.eval()
    assert set(lobster_fx.masks(gm)) == {"0.weight", "0.bias", "4.weight", "4.bias"}  # BN excluded
    assert {"0.weight_mask", "4.weight_mask"} <= set(gm.state_dict())
    m = lobster_fx.masks(gm)["4.weight"]
    m.bernoulli_(0.5)
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[4].weight.mul_(m)
    torch.testing.assert_close(gm(x), ref(x), rtol=0, atol=0)
    # gradients of masked entries are zero
    gm(x).sum().backward()
    assert torch.all(gm.get_parameter("4.weight").grad[m == 0] == 0)


def test_tied_parameter_gets_one_mask():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    model = Tied()
    gm = lobster_fx.instrument(model)
    assert list(lobster_fx.masks(gm)) == ["emb.weight"]
    idx = torch.randint(0, 10, (4,))
    assert torch.equal(gm(idx), model(idx))
    lobster_fx.masks(gm)["emb.weight"][3].zero_()
    out = gm(idx)
    ref_w = model.emb.weight.detach().clone()
    ref_w[3] = 0
    torch.testing.assert_close(out, nn.functional.embedding(idx, ref_w) @ ref_w.T, rtol=0, atol=0)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            return self.inner(x) * self.scale
        return self.inner(x) - self.scale


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Untraceable()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_untraceable_submodule_falls_back_and_masks_everything():
    torch.manual_seed(0)
    model = _Outer()
    # by default a raw parameter used only in code that does not trace is not pruned (nothing
    # tells that its zero means "no connection"); the summary says why
    default = lobster_fx.instrument(model).meta["lobster"]
    assert "block.scale" not in default.params and "does not trace" in default.skipped["block.scale"]
    gm = lobster_fx.instrument(model, filter_fn=lambda module, fqn: True)
    info = gm.meta["lobster"]
    assert set(lobster_fx.masks(gm)) == {"block.inner.weight", "block.inner.bias", "block.scale", "head.weight", "head.bias"}
    assert info.params["block.scale"].route == "module"
    assert "block" in info.trace.opaque and "block.inner" in info.trace.traced
    assert "opaque" in str(info)
    for x in (torch.ones(3, 4), -torch.ones(3, 4)):  # both branches
        assert torch.equal(gm(x), model(x))
    lobster_fx.masks(gm)["block.scale"].zero_()
    x = torch.ones(3, 4)
    torch.testing.assert_close(gm(x), model.head(model.block.inner(x) * 0), rtol=0, atol=0)
    # the original model was not modified
    assert type(model.block) is _Untraceable and not hasattr(model.block, "parametrizations")


def test_multihead_attention_masked_at_module_level():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    gm = lobster_fx.instrument(model)
    routes = {k: v.route for k, v in gm.meta["lobster"].params.items()}
    assert routes["self_attn.in_proj_weight"] == "module" and routes["linear1.weight"] == "graph"
    x = torch.randn(2, 5, 16)
    _check_both_modes(model, gm, x)
    lobster_fx.masks(gm)["self_attn.in_proj_weight"].zero_()
    gm.eval()
    out = gm(x)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.zero_()
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


def test_detection_model_instruments_and_keeps_outputs():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    )
    model.eval()
    gm = lobster_fx.instrument(model)
    info = gm.meta["lobster"]
    assert "" in info.trace.opaque  # the top level iterates over a list of images
    assert any(q.startswith("backbone") for q in info.trace.traced)
    n_prunable = sum(
        p.numel() for f, p in model.named_parameters() if lobster_fx.default_filter(model.get_submodule(f.rpartition(".")[0]), f)
    )
    assert sum(m.numel() for m in lobster_fx.masks(gm).values()) == n_prunable
    images = [torch.rand(3, 120, 160), torch.rand(3, 100, 100)]
    with torch.no_grad():
        assert _outputs_equal(model(images), gm(images))
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}] * 2
    model.train()
    gm.train()
    torch.manual_seed(1)
    expected = model(images, targets)
    torch.manual_seed(1)
    got = gm(images, targets)
    assert _outputs_equal(expected, got)


def test_filter_fn_overrides_default():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    gm = lobster_fx.instrument(model, filter_fn=lambda module, fqn: fqn.endswith("weight"))
    assert set(lobster_fx.masks(gm)) == {"0.weight", "1.weight"}


def test_bad_input_is_a_clear_error_and_nothing_modified():
    with pytest.raises(TypeError, match="nn.Module"):
        lobster_fx.instrument("not a model")
    model = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no prunable parameters"):
        lobster_fx.instrument(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no prunable parameters"):
        lobster_fx.instrument(nn.ReLU())
    gm = lobster_fx.instrument(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already instrumented"):
        lobster_fx.instrument(gm)


def test_shares_parameters_with_original_and_deepcopy_keeps_modes():
    torch.manual_seed(0)
    model = torchvision.models.get_model("convnext_tiny", weights=None, num_classes=4)
    gm = lobster_fx.instrument(model)
    assert gm.get_parameter("classifier.2.weight") is model.classifier[2].weight
    clone = copy.deepcopy(gm)
    assert clone.get_parameter("classifier.2.weight") is not model.classifier[2].weight
    x = torch.randn(1, 3, 32, 32)
    _check_both_modes(model, clone, x)
    assert sum(1 for _ in masked_parameters(clone)) == len(lobster_fx.masks(gm))


class _KwargsRoot(nn.Module):
    """Hugging Face style: forward takes **kwargs, and the root does not trace."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, scale=None, *extra, **kwargs):
        h = self.body(x)
        if h.sum() > 0:  # data-dependent: the root stays opaque
            h = h * 2
        if scale is not None:
            h = h * scale
        return self.head(h) + kwargs.get("shift", 0) + sum(extra)


def test_opaque_root_with_var_args_and_kwargs():
    """Regression: an untraceable root whose forward has *args / **kwargs (every
    Hugging Face model) used to raise 'cannot wrap ... with *args/**kwargs'."""
    torch.manual_seed(0)
    model = _KwargsRoot()
    gm = lobster_fx.instrument(model)
    assert "" in gm.meta["lobster"].trace.opaque
    assert gm.meta["lobster"].params["body.weight"].route == "graph"
    x = torch.randn(3, 4)
    for args, kwargs in [((x,), {}), ((x, 2.0), {}), ((x, 2.0, 1.0, 3.0), {"shift": 5.0}), ((x,), {"scale": 3.0})]:
        assert torch.equal(gm(*args, **kwargs), model(*args, **kwargs))
    lobster_fx.masks(gm)["head.weight"].zero_()
    torch.testing.assert_close(gm(x, shift=1.0), model.head.bias.expand(3, 2) + 1.0, rtol=0, atol=0)
    folded = lobster_fx.fold(gm)
    assert torch.equal(folded(x, shift=1.0), gm(x, shift=1.0))
    # fx.Interpreter (slim, export diagnostics) feeds the **kwargs placeholder a list
    assert torch.equal(torch.fx.Interpreter(gm).run(x, 2.0), gm(x, 2.0))


class _PositionEmbedding(nn.Embedding):
    """BART style: computes its own positions when none are given."""

    def forward(self, x, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return super().forward(position_ids + 1)


class _CallsWithAndWithoutNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc_pos = _PositionEmbedding(12, 4)
        self.dec_pos = _PositionEmbedding(12, 4)
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: the root stays opaque, its children are traced alone
            return x
        positions = torch.arange(x.shape[1]).flip(0).expand(x.shape[0], -1)
        return self.proj(self.enc_pos(x) + self.dec_pos(x, position_ids=positions))


def test_child_branching_on_none_argument_is_not_traced_with_one_branch():
    """Regression: a submodule traced alone got a proxy for ``position_ids=None``, so
    ``if position_ids is None`` was False while tracing and the graph kept only the
    other branch; called without the argument it crashed ('NoneType' object has no
    attribute ...). Such a submodule is now left opaque and masked at module level."""
    torch.manual_seed(0)
    model = _CallsWithAndWithoutNone()
    gm = lobster_fx.instrument(model)
    info = gm.meta["lobster"]
    assert "enc_pos" in info.trace.opaque and "is None" in info.trace.errors["enc_pos"]
    assert "proj" in info.trace.traced
    assert info.params["enc_pos.weight"].route == "module"
    x = torch.randn(2, 5, 4)
    assert torch.equal(gm(x), model(x))
    lobster_fx.masks(gm)["enc_pos.weight"][:3] = 0
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.enc_pos.weight[:3] = 0
    torch.testing.assert_close(gm(x), ref(x), rtol=0, atol=0)
    assert torch.equal(lobster_fx.fold(gm)(x), gm(x))


def _fit_window(window: list, size: list) -> list:
    """Edits its list argument in place, like torchvision's Swin3D helper."""
    for i in range(len(window)):
        if size[i] < window[i]:
            window[i] = size[i]
    return window


torch.fx.wrap("_fit_window")


class _MutatesListLiteral(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        window = _fit_window([8, 3], [x.shape[0], x.shape[1]])
        return self.proj(x)[: window[0], : window[1]]


def test_wrapped_function_may_edit_its_list_argument():
    """Regression: FX keeps list literals as immutable_list and fx.Interpreter (used by
    torch.export and by slim) passes them as they are, so Swin3D's
    ``_get_window_and_shift_size`` raised "'immutable_list' object does not support
    mutation" in slim and export_onnx. Calls to non-torch functions now get a fresh list."""
    torch.manual_seed(0)
    model = _MutatesListLiteral()
    gm = lobster_fx.instrument(model)
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert torch.equal(torch.fx.Interpreter(gm).run(x), model(x))
    assert torch.equal(torch.fx.Interpreter(gm).run(x), model(x))  # twice: nothing was edited in the graph
    slimmed = lobster_fx.slim(lobster_fx.fold(gm), (x,))
    assert torch.equal(slimmed(x), model(x))


def test_channels_last_masked_weights_keep_their_layout():
    """A channels-last weight with a size-1 dim (conv1 of LeNet-5: 20x1x5x5) came out of
    ``w * mask`` with NCHW strides; the convolution's backward then ran in NCHW and converted
    to and from channels-last every step (LeNet-5 step 26.8 ms masked vs 17.0 ms plain).
    The masked weight keeps the parameter's strides."""
    from torch.fx import Interpreter

    from lobster_fx.graph.instrument import masked_weight
    from lobster_fx.models import LeNet5

    for shape in [(20, 1, 5, 5), (64, 32, 1, 1), (8, 1, 3, 3)]:
        w = torch.randn(shape).to(memory_format=torch.channels_last).requires_grad_()
        mask = (torch.rand(shape) > 0.5).float().to(memory_format=torch.channels_last)
        out = masked_weight(w, mask)
        assert out.stride() == w.stride() and torch.equal(out, w * mask)
        out.backward(torch.ones_like(out))
        assert torch.equal(w.grad, mask)  # d(w * mask)/dw, through the restriding

    torch.manual_seed(0)
    model = LeNet5()
    gm = lobster_fx.instrument(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).to(memory_format=torch.channels_last)
    masked: dict[str, torch.Tensor] = {}

    class Record(Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if "lobster_mask" in n.meta:
                masked[n.meta["lobster_mask"]] = result
            return result

    out = Record(gm).run(x)
    params = dict(gm.named_parameters())
    assert set(masked) == set(params)
    for name, t in masked.items():
        assert t.stride() == params[name].stride(), name
    assert torch.allclose(out, model.to(memory_format=torch.channels_last)(x), atol=1e-6)


def test_masked_weight_nodes_survive_pickling():
    """Unpickling re-traces a GraphModule from its code: masked_weight must stay one node
    (its stride check would be control flow on a Proxy), so the restriding survives too."""
    import pickle

    from lobster_fx.graph.instrument import masked_weight
    from lobster_fx.models import LeNet5

    gm = lobster_fx.instrument(LeNet5())
    back = pickle.loads(pickle.dumps(gm))
    targets = [n.target for n in back.graph.nodes if n.op == "call_function"]
    assert targets.count(masked_weight) == len(lobster_fx.masks(gm))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(back(x), gm(x))


def test_all_ones_mask_returns_the_weight_and_a_written_mask_is_applied_at_once():
    """Before any pruning, eager ``masked_weight`` skips ``w * 1`` (bit-identical) and returns
    the parameter itself; any in-place write to the mask (prune's ``masked_fill_``, ``mask[i] = 0``,
    ``load_state_dict``) bumps its version and the next forward multiplies again."""
    from lobster_fx.graph.instrument import masked_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    gm = lobster_fx.instrument(copy.deepcopy(model))
    w, mask = gm.get_parameter("0.weight"), lobster_fx.masks(gm)["0.weight"]
    assert masked_weight(w, mask) is w
    x = torch.randn(4, 6)
    assert torch.equal(gm(x), model(x))

    mask[1, 2] = 0  # an in-place write, no prune
    assert masked_weight(w, mask) is not w
    with torch.no_grad():
        model[0].weight[1, 2] = 0  # the independent reference: the weight zeroed by hand
    assert torch.equal(gm(x), model(x))
    gm(x).sum().backward()
    assert gm.get_parameter("0.weight").grad[1, 2] == 0  # d(w * mask)/dw is 0 where masked

    mask.fill_(1)
    assert masked_weight(w, mask) is w
    mask.data = torch.zeros(5, 6)  # a new storage, same tensor object and version
    assert masked_weight(w, mask) is not w
    mask.fill_(1)
    gm.load_state_dict({**gm.state_dict(), "0.weight_mask": torch.zeros(5, 6)})
    assert masked_weight(w, mask) is not w
    assert torch.count_nonzero(masked_weight(w, mask)) == 0


def test_recorders_keep_the_multiply_of_an_all_ones_mask():
    """jit.trace, make_fx and torch.compile record ops instead of only running them: with an
    all-ones mask skipped, a mask pruned later would be ignored by the recording."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    gm = lobster_fx.instrument(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    x = torch.randn(4, 6)
    traced = torch.jit.trace(gm, (x,))
    fx_graph = make_fx(gm)(x)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)  # and no graph break of ours
    assert torch.equal(compiled(x), gm(x))
    n_mul = sum(n.target == torch.ops.aten.mul.Tensor for n in fx_graph.graph.nodes)
    assert n_mul == len(lobster_fx.masks(gm))

    mask = lobster_fx.masks(gm)["0.weight"]
    mask[:, :3] = 0
    expected = gm(x)
    assert torch.equal(traced(x), expected)
    assert torch.equal(compiled(x), expected)
    assert torch.equal(fx_graph(x), expected)
    assert not torch.allclose(expected, _unmasked(gm, x))  # the zeroed mask entries change the output


def _unmasked(gm, x):
    """gm's function with every mask ignored (the raw parameters), computed by hand."""
    h = torch.relu(x @ gm.get_parameter("0.weight").T + gm.get_parameter("0.bias"))
    return h @ gm.get_parameter("2.weight").T + gm.get_parameter("2.bias")


def test_a_mask_that_requires_grad_gets_its_gradient_while_all_ones():
    """Skipping ``w * 1`` would cut the path to a learned mask: d(w * m)/dm = w."""
    from lobster_fx.graph.instrument import masked_weight

    w = torch.randn(4, 3)
    mask = torch.ones(4, 3, requires_grad=True)
    out = masked_weight(w, mask)
    assert out is not w
    out.sum().backward()
    assert torch.equal(mask.grad, w)


def test_an_all_ones_mask_that_would_broadcast_or_promote_is_multiplied():
    from lobster_fx.graph.instrument import masked_weight

    w = torch.randn(3, 4, dtype=torch.float16)
    for mask in (torch.ones(3, 4), torch.ones(2, 3, 4, dtype=torch.float16), torch.ones(4, dtype=torch.float16)):
        out = masked_weight(w, mask)
        assert out is not w and out.dtype == (w * mask).dtype and out.shape == (w * mask).shape


def test_all_ones_cache_forgets_dead_masks():
    import gc

    from lobster_fx.graph.instrument import _MASK_FACTS, mask_has_zeros, mask_is_all_ones, masked_weight

    w = torch.randn(3, 3)
    mask = torch.ones(3, 3)
    assert masked_weight(w, mask) is w
    assert mask_is_all_ones(mask) and not mask_has_zeros(mask)
    mask.fill_(0.5)  # a soft mask: multiplied in the forward, never pinned (it has no zero)
    assert not mask_is_all_ones(mask) and not mask_has_zeros(mask)
    assert torch.equal(masked_weight(w, mask), w * 0.5)
    mask[0, 0] = 0
    assert not mask_is_all_ones(mask) and mask_has_zeros(mask)
    key = id(mask)
    assert key in _MASK_FACTS
    del mask
    gc.collect()
    assert key not in _MASK_FACTS


def _module_state(model):
    """Every module's attributes, buffers, parameters and children, and the tensor values."""
    layout = {
        name: (sorted(vars(m)), sorted(m._buffers), sorted(m._parameters), sorted(m._modules))
        for name, m in model.named_modules()
    }
    return layout, {k: v.clone() for k, v in model.state_dict().items()}


def test_original_model_left_exactly_as_it_was():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            self.last_batch = x.shape[0]  # an attribute set while running
            return self.fc(x) * torch.tensor([2.0, 1.0, 1.0, 1.0])  # a trace-time constant

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Head()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.head(x))

    model = Net()
    layout, values = _module_state(model)
    gm = lobster_fx.instrument(model)
    layout_after, values_after = _module_state(model)
    # before: FX stored _tensor_constant0/1 on the traced original, and forward's attribute stuck
    assert layout_after == layout
    assert values_after.keys() == values.keys() and all(torch.equal(values[k], values_after[k]) for k in values)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    assert gm.get_parameter("head.fc.weight") is model.head.fc.weight  # still shares the tensors


class _TiedHead(nn.Module):
    """Uses a weight tied to an embedding, in code that does not trace."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, h):
        if h.sum() > -1e9:  # data-dependent branch: opaque to FX
            return h @ self.weight.t()
        return h


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = _TiedHead(self.emb.weight)

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_tied_weight_is_masked_in_untraceable_code_too():
    torch.manual_seed(0)
    model = _TiedLM()
    gm = lobster_fx.instrument(model)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(gm(idx), model(idx))
    entry = gm.meta["lobster"].params["emb.weight"]
    assert entry.also_masked_in and "also masked in" in str(gm.meta["lobster"])
    mask = lobster_fx.masks(gm)["emb.weight"]
    mask[:, 1:] = 0  # keep feature 0 only, on every use
    w0 = model.emb.weight.detach().clone()
    w0[:, 1:] = 0
    expected = w0[idx] @ w0.t()
    assert torch.allclose(gm(idx), expected)  # before: the head still used the raw weight
    mask.zero_()
    assert gm(idx).abs().max() == 0
    folded = lobster_fx.fold(gm)
    assert folded(idx).abs().max() == 0
    assert not any(k.endswith("mask") for k in folded.state_dict())


class _RawWeights(nn.Module):
    """Raw parameters: one multiplies inputs (through ``.T``), the others do not."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(4, 4))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))  # CLIP-like: zero is not "no connection"
        self.A_log = nn.Parameter(torch.zeros(4))  # Mamba-like: zero sets A = -1
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        h = x @ self.proj.T
        return self.norm(self.fc(h) * -torch.exp(self.A_log)) * self.logit_scale.exp()


def test_default_prunes_only_weights_that_multiply_inputs():
    torch.manual_seed(0)
    model = _RawWeights()
    gm = lobster_fx.instrument(model)
    info = gm.meta["lobster"]
    assert set(info.params) == {"proj", "fc.weight", "fc.bias"}
    for name in ("logit_scale", "A_log"):
        assert "not the weight of a linear/conv/matmul op" in info.skipped[name], name
    assert "normalisation" in info.skipped["norm.weight"]
    assert "A_log" in str(info)  # listed in the printed summary
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    # the use through .T is masked (a getattr of "T" was once taken for a metadata read)
    lobster_fx.masks(gm)["proj"].zero_()
    with torch.no_grad():
        expected = model.norm(model.fc(torch.zeros(3, 4)) * -torch.exp(model.A_log)) * model.logit_scale.exp()
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    # filter_fn opts the others in
    everything = lobster_fx.instrument(model, filter_fn=lambda module, fqn: True)
    assert {"logit_scale", "A_log", "norm.weight"} <= set(everything.meta["lobster"].params)
