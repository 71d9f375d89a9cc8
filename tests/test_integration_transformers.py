"""LobsterCallback with a real transformers.Trainer on a tiny BERT built from a config (no download):
pruning happens, save_model + from_pretrained give the pruned weights in the plain class, and a
Trainer checkpoint resumes with masks, rule and schedule."""

import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lobster_fx.integrations.transformers import STATE_FILE, LobsterCallback, instrument_in_place  # noqa: E402

EPOCHS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return tf.BertForSequenceClassification(config)


def _data(n, seed):
    # the label is written in the first token (7 or 8): a tiny model learns it in an epoch or two
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, 100, (n, 12), generator=g)
    labels = torch.arange(n) % 2
    ids[:, 0] = 7 + labels
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _callback():
    # threshold 0.6: an evaluation must improve the loss by 60% to count, so plateaus come early
    return LobsterCallback(lmbda=1e-3, twt=0.05, pwe=1, threshold=0.6)


def _trainer(out, model, callback, epochs=EPOCHS, save=True, **kw):
    args = tf.TrainingArguments(
        str(out), num_train_epochs=epochs, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=3e-3, eval_strategy="epoch", save_strategy="epoch" if save else "no", logging_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, **kw,
    )
    return tf.Trainer(model=model, args=args, train_dataset=_data(96, 1), eval_dataset=_data(64, 2),
                      callbacks=[callback])


def _prunable_state(model, masks):
    """What save_model must write, computed here: every masked weight times its mask."""
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    return state


def test_trainer_prunes_and_save_model_loads_into_the_plain_class(tmp_path):
    model, cb = _model(), _callback()
    trainer = _trainer(tmp_path / "run", model, cb, save=False)
    trainer.train()
    assert type(trainer.model) is tf.BertForSequenceClassification and trainer.model is model
    assert cb.sparsifier.history, "no pruning phase ran"
    masks = cb.sparsifier.masks
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    last = cb.sparsifier.history[-1]
    assert zeros == last["total"] - last["remaining"] > 0
    expected = _prunable_state(model, masks)

    trainer.save_model(str(tmp_path / "saved"))
    loaded, info = tf.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"),
                                                                    output_loading_info=True)
    assert type(loaded) is tf.BertForSequenceClassification
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    got = dict(loaded.named_parameters())
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    n_zero = sum(int((got[k] == 0).sum()) for k in masks)
    assert n_zero >= zeros
    # the plain model computes what the instrumented one does
    ids = torch.randint(0, 100, (3, 12))
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_resume_from_a_trainer_checkpoint_keeps_masks_and_continues(tmp_path):
    full_model, full_cb = _model(), _callback()
    _trainer(tmp_path, full_model, full_cb).train()
    history = full_cb.sparsifier.history
    assert history
    # one epoch = 6 steps; the checkpoint of the first epoch that pruned (written after the pruning)
    step = history[0]["call"] * 6
    assert history[0]["call"] < EPOCHS
    ckpt = tmp_path / f"checkpoint-{step}"
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert any((m == 0).any() for m in saved["masks"].values())

    model, cb = _model(), _callback()
    seen = {}

    class Probe(tf.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["masks"] = {k: v.clone() for k, v in cb.sparsifier.masks.items()}
            seen["history"] = list(cb.sparsifier.history)
            seen["steps"] = cb.sparsifier.rule.steps

    trainer = _trainer(tmp_path, model, cb)
    trainer.add_callback(Probe())  # after LobsterCallback: sees what it restored
    trainer.train(resume_from_checkpoint=str(ckpt))
    for k, m in saved["masks"].items():
        assert torch.equal(seen["masks"][k], m), k
    assert seen["history"] == saved["pruner"]["history"] and seen["steps"] == saved["rule"]["steps"] == step
    # continued to the end, pruned weights stayed pruned, and it ends where the uninterrupted run ended
    assert cb.sparsifier.rule.steps == EPOCHS * 6
    for k, m in cb.sparsifier.masks.items():
        assert torch.all(m[saved["masks"][k] == 0] == 0), k
    assert cb.sparsifier.history == full_cb.sparsifier.history
    for (k, a), b in zip(model.state_dict().items(), full_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_state_dict_is_folded_and_loads_back_with_masks_kept():
    model = _model()
    gm = instrument_in_place(model)
    from lobster_fx.graph.instrument import masks as all_masks

    masks = all_masks(gm)
    with torch.no_grad():
        masks["classifier.weight"][0] = 0  # pruned by hand; the weight itself is not zeroed
    state = model.state_dict()
    assert not any(k.endswith("_mask") for k in state)
    assert torch.all(state["classifier.weight"][0] == 0)
    torch.testing.assert_close(state["classifier.weight"][1], model.classifier.get_parameter("weight")[1])
    fresh, fresh_gm = _model(), None
    fresh_gm = instrument_in_place(fresh)
    result = fresh.load_state_dict(state)  # strict: no missing mask keys reported
    assert not result.missing_keys and not result.unexpected_keys
    assert all(bool((m == 1).all()) for m in all_masks(fresh_gm).values())  # masks are not in the weights
    with pytest.raises(ValueError, match="already instrumented"):
        instrument_in_place(model)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="method"):
        LobsterCallback(method="magnitude")
    with pytest.raises(TypeError, match="monitor"):
        LobsterCallback(monitor="")
    cb = _callback()
    model = _model()
    args = tf.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, fsdp="full_shard")
    with pytest.raises(RuntimeError, match="FSDP"):
        cb.on_init_end(args, None, None, model=model)
    assert not hasattr(model, "_lobster_gm") and cb.sparsifier.gm is None


def test_gradient_accumulation_and_bf16(tmp_path):
    # 6 batches per epoch, an optimizer step every 2, bf16 autocast on CPU: one rule step per optimizer step
    model, cb = _model(), _callback()
    trainer = _trainer(tmp_path, model, cb, epochs=1, save=False, gradient_accumulation_steps=2, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert cb.sparsifier.rule.steps == trainer.state.global_step == 3


def test_load_best_model_at_end_brings_that_checkpoints_masks(tmp_path):
    model, cb = _model(), _callback()
    trainer = _trainer(tmp_path, model, cb, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and cb.sparsifier.history
    saved = torch.load(f"{best}/{STATE_FILE}", weights_only=True)["masks"]
    last = torch.load(f"{tmp_path}/checkpoint-{trainer.state.global_step}/{STATE_FILE}", weights_only=True)["masks"]
    assert any(not torch.equal(saved[k], last[k]) for k in saved), "best and last should differ here"
    for k, m in cb.sparsifier.masks.items():
        assert torch.equal(m, saved[k]), k
