"""LobsterPruning with a real lightning.Trainer on CPU: pruning happens, and a fit resumed from a
checkpoint keeps masks, rule and schedule and ends where the uninterrupted fit ends."""

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from lobster_fx.integrations.lightning import LobsterPruning  # noqa: E402

EPOCHS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(L.LightningModule):
    def __init__(self, log_metric: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        self.log_metric = log_metric

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        if self.log_metric:
            self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loaders():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(640, 16, generator=g)
    y = (x[:, :4].argmax(1))  # learnable from 4 of the 16 inputs: the rest can go
    train = torch.utils.data.TensorDataset(x[:576], y[:576])
    val = torch.utils.data.TensorDataset(x[576:], y[576:])
    return (torch.utils.data.DataLoader(train, batch_size=64), torch.utils.data.DataLoader(val, batch_size=32))


def _callback(**kw):
    # threshold 0.2: an epoch must improve the loss by 20% to count, so plateaus come early
    return LobsterPruning(lmbda=1e-3, twt=0.02, pwe=1, threshold=0.2, **kw)


def _trainer(tmp_path, callbacks, epochs=EPOCHS, **kw):
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                     deterministic=True, **kw)


def _no_ckpt(tmp_path, callbacks, **kw):
    return _trainer(tmp_path, callbacks, enable_checkpointing=False, **kw)


def test_fit_prunes_and_masks_are_applied(tmp_path):
    net, cb = Net(), _callback()
    _no_ckpt(tmp_path, [cb]).fit(net, *_loaders())
    gm = net.model
    assert gm is cb.sparsifier.gm
    history = cb.sparsifier.history
    assert history, "no pruning phase ran"
    masks = cb.sparsifier.masks
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros == history[-1]["total"] - history[-1]["remaining"] > 0
    # pruned weights are exactly zero, and the model computes the masked network (written out here)
    w0, b0 = gm.get_parameter("0.weight"), gm.get_parameter("0.bias")
    w2, b2 = gm.get_parameter("2.weight"), gm.get_parameter("2.bias")
    for name, w in (("0.weight", w0), ("0.bias", b0), ("2.weight", w2), ("2.bias", b2)):
        assert torch.all(w[masks[name] == 0] == 0), name
    x = torch.randn(5, 16)
    by_hand = F.linear(torch.relu(F.linear(x, w0 * masks["0.weight"], b0 * masks["0.bias"])),
                       w2 * masks["2.weight"], b2 * masks["2.bias"])
    gm.eval()
    torch.testing.assert_close(gm(x), by_hand, rtol=0, atol=1e-6)
    assert cb.sparsifier.rule.steps == EPOCHS * 9  # 576 / 64 batches per epoch


class _Probe(L.Callback):
    """What the run looks like when training (re)starts, after Lightning restored the checkpoint."""

    def __init__(self, lobster: LobsterPruning) -> None:
        self.lobster = lobster

    def on_train_start(self, trainer, pl_module):
        sp = self.lobster.sparsifier
        self.masks = {k: v.clone() for k, v in sp.masks.items()}
        self.history = list(sp.pruner.history)
        self.steps = sp.rule.steps


def test_resume_from_checkpoint_keeps_masks_and_continues(tmp_path):
    # the uninterrupted run, checkpointing every epoch
    ckpts = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                                filename="{epoch}")
    full_net, full_cb = Net(), _callback()
    _trainer(tmp_path, [full_cb, ckpts]).fit(full_net, *_loaders())
    assert full_cb.sparsifier.history
    # resume after the first epoch that pruned (its checkpoint is written after the pruning)
    first = full_cb.sparsifier.history[0]["call"]  # 1-based validation count = epoch number
    assert first < EPOCHS
    path = tmp_path / "ckpt" / f"epoch={first - 1}.ckpt"
    saved = torch.load(path, weights_only=True)  # plain data: loads without unpickling code
    saved_masks = {k.removeprefix("model.").removesuffix("_mask"): v for k, v in saved["state_dict"].items()
                   if k.endswith("_mask")}
    assert any((m == 0).any() for m in saved_masks.values()), "the checkpoint holds no pruned mask"
    saved_lobster = saved["callbacks"]["LobsterPruning{'attribute': 'model'}"]

    net, cb = Net(), _callback()
    probe = _Probe(cb)
    _no_ckpt(tmp_path, [cb, probe]).fit(net, *_loaders(), ckpt_path=path)
    # restored: masks, schedule and rule as the checkpoint holds them
    assert probe.masks.keys() == saved_masks.keys()
    for k in saved_masks:
        assert torch.equal(probe.masks[k], saved_masks[k]), k
    assert probe.history == saved_lobster["pruner"]["history"] and len(probe.history) >= 1
    assert probe.steps == saved_lobster["rule"]["steps"] == first * 9
    # continued: it trained the remaining epochs and ends where the uninterrupted run ended
    assert cb.sparsifier.rule.steps == EPOCHS * 9
    assert cb.sparsifier.history == full_cb.sparsifier.history
    for (k, a), b in zip(net.model.state_dict().items(), full_net.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    # pruned weights stayed pruned
    for k, m in cb.sparsifier.masks.items():
        assert torch.all(m[saved_masks[k] == 0] == 0), k


def test_default_evaluate_is_validation_step_mean_and_fold_on_fit_end(tmp_path):
    net, cb = Net(), _callback(fold_on_fit_end=True)
    train, val = _loaders()
    _no_ckpt(tmp_path, [cb]).fit(net, train, val)
    assert cb.sparsifier.history
    # folded at the end: a plain module without masks, the masked model's outputs
    assert "lobster" not in getattr(net.model, "meta", {})
    assert not any(k.endswith("_mask") for k in net.model.state_dict())
    gm = cb.sparsifier.gm.eval()
    net.model.eval()
    x = torch.randn(7, 16)
    torch.testing.assert_close(net.model(x), gm(x), rtol=0, atol=0)
    # evaluate=None: the search's loss is the mean over the val batches of validation_step (by hand here)
    with torch.no_grad():
        by_hand = sum(float(F.cross_entropy(gm(x), y)) for x, y in val) / len(val)
    assert len(val) == 2
    assert cb.sparsifier.evaluate(gm) == pytest.approx(by_hand, rel=1e-6)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match="attribute"):
        LobsterPruning(attribute="")
    with pytest.raises(ValueError, match="method"):
        LobsterPruning(method="magnitude")
    with pytest.raises(AttributeError, match="'net'"):
        _no_ckpt(tmp_path, [_callback(attribute="net")], epochs=1).fit(Net(), *_loaders())
    net = Net(log_metric=False)
    with pytest.raises(KeyError, match="'val_loss' was not logged"):
        _no_ckpt(tmp_path, [_callback()], epochs=1).fit(net, *_loaders())


def test_unsupported_strategy_is_refused_before_anything_changes():
    # setup() is the first hook a strategy runs callbacks in; a real FSDPStrategy object, no fit
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    net, cb = Net(), _callback()
    before = net.model
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=1)
    with pytest.raises(RuntimeError, match="FSDPStrategy strategy"):
        cb.setup(trainer, net, "fit")
    assert net.model is before and cb.sparsifier.gm is None
    serene = _callback(method="serene")
    ddp = SimpleNamespace(strategy=L.pytorch.strategies.DDPStrategy(), world_size=2)
    with pytest.raises(RuntimeError, match="method='serene' with 2 processes"):
        serene.setup(ddp, net, "fit")
    assert net.model is before


def test_first_step_is_eq6_with_this_steps_gradient(tmp_path):
    # Lightning runs training_step inside optimizer.step(closure): the rule must still see this
    # step's gradient. One step of SGD (momentum's first step is plain SGD), by hand:
    net, cb = Net(), LobsterPruning(lmbda=0.05, pwe=5)
    train, val = _loaders()
    x, y = next(iter(train))
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ref.load_state_dict(net.model.state_dict())
    F.cross_entropy(ref(x), y).backward()
    expected = {k: (p - 0.1 * p.grad - 0.05 * p * torch.relu(1 - p.grad.abs())).detach()
                for k, p in ref.named_parameters()}
    _no_ckpt(tmp_path, [cb], max_steps=1).fit(net, train, val)
    assert cb.sparsifier.rule.steps == 1
    for k, w in net.model.state_dict().items():
        if k in expected:
            torch.testing.assert_close(w, expected[k], rtol=0, atol=1e-6, msg=k)


def test_gradient_accumulation_and_bf16_mixed_precision(tmp_path):
    # 9 batches, an optimizer step every 3: the rule runs once per optimizer step, under autocast
    net, cb = Net(), _callback()
    _no_ckpt(tmp_path, [cb], epochs=1, accumulate_grad_batches=3, precision="bf16-mixed").fit(net, *_loaders())
    assert cb.sparsifier.rule.steps == 3
    assert net.model.get_parameter("0.weight").dtype == torch.float32
