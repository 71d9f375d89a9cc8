"""LOBSTER / SeReNe sparse training in a Hugging Face ``Trainer``: the :class:`LobsterCallback`.

The model the Trainer holds stays the same ``PreTrainedModel`` object: its traceable
submodules are swapped, in place, for their instrumented versions (:func:`lobster_fx.instrument`
of a Hugging Face model traces the submodules below the untraceable top-level ``forward``;
those are moved into the model), so ``save_pretrained``, ``generate``, the config and
``trainer.model`` keep working. Hook by hook:

* ``on_init_end`` (add the callback with ``Trainer(callbacks=[...])``): instruments the model,
  before the Trainer builds its optimizer and wraps the model (DDP).
* ``on_train_begin``: hooks the rule on the Trainer's optimizer and builds the plateau schedule;
  when the Trainer resumes from a checkpoint, restores masks, rule and schedule from that
  checkpoint's ``lobster_state.pt``.
* ``on_evaluate`` (during ``train`` only): steps the schedule with ``metrics[monitor]``
  (default ``eval_loss``) or ``evaluate(model)``; at a plateau it rolls back and prunes (the
  threshold search evaluates the model: ``evaluate``, or by default the mean ``model(**batch).loss``
  over the Trainer's evaluation batches). Evaluate once per epoch (``eval_strategy="epoch"``)
  for ``pwe`` to count epochs.
* ``on_save``: writes ``lobster_state.pt`` (:meth:`lobster_fx.sparsifier.Sparsifier.state_dict`:
  masks, rule, schedule) into the checkpoint folder, atomically.
* ``model.state_dict()`` gives *folded* weights (``weight * mask``) under the original keys and
  no masks, so ``trainer.save_model()`` and the Trainer's checkpoints hold weights that
  ``from_pretrained`` loads into the plain model class (no missing or unexpected keys), and
  loading them back into the instrumented model leaves its masks as they are.

Supported: one device and DDP (``torchrun``; the schedule averages the loss over the ranks),
gradient accumulation, ``fp16`` / ``bf16`` mixed precision. Refused with a message: DeepSpeed,
FSDP, SeReNe with more than one process, and a model whose top-level ``forward`` traces whole
(nothing to swap in place: use :func:`lobster_fx.instrument` and your own loop).
``load_best_model_at_end=True`` loads the best checkpoint's masks with its weights.

Example (``pip install 'lobster_fx[hf]'``)::

    >>> import tempfile, torch, transformers as tf
    >>> from lobster_fx.integrations.transformers import LobsterCallback
    >>> config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                        intermediate_size=64, max_position_embeddings=32)
    >>> model = tf.BertForSequenceClassification(config)
    >>> data = [{"input_ids": torch.randint(0, 100, (16,)), "labels": torch.tensor(i % 2)} for i in range(8)]
    >>> args = tf.TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
    ...                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> callback = LobsterCallback(pwe=1)
    >>> trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> _ = trainer.train()
    {'train_runtime': ...}
    >>> callback.sparsifier.rule.steps, trainer.model is model, any("_mask" in k for k in model.state_dict())
    (2, True, False)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("lobster_fx.integrations.transformers needs Hugging Face transformers: "
                      f"pip install 'lobster_fx[hf]' (or pip install transformers accelerate); {e}") from e

from lobster_fx.checkpoint import atomic_save, load_checkpoint
from lobster_fx.graph.instrument import FilterFn, instrument, masked_parameters
from lobster_fx.graph.state_keys import external_key
from lobster_fx.pruning.prune import Evaluate, ScoreFn
from lobster_fx.sparsifier import Sparsifier

__all__ = ["LobsterCallback", "STATE_FILE", "instrument_in_place"]

#: the file ``on_save`` writes into each Trainer checkpoint folder
STATE_FILE = "lobster_state.pt"

_logger = hf_logging.get_logger(__name__)


def instrument_in_place(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """Instrument ``model``'s traceable submodules in place; return the instrumented module
    (:func:`lobster_fx.instrument`'s result, sharing those submodules) to give the rule and the
    schedule. ``model`` stays the same object and class, and its ``state_dict()`` gives folded
    weights under the original keys (see the module docstring).

    Raises:
        TypeError: ``model``'s own ``forward`` traced whole (nothing to swap in), or a prunable
            parameter is masked at the top level of ``model`` (naming it); ``model`` is unchanged.
    """
    if getattr(model, "_lobster_gm", None) is not None:
        raise ValueError(f"{type(model).__name__} is already instrumented in place by lobster_fx")
    gm = instrument(model, filter_fn=filter_fn)
    inner = getattr(gm, "opaque", None)
    if inner is None or type(inner) is not type(model):
        raise TypeError(
            f"LobsterCallback: {type(model).__name__}.forward traced as one graph, so there are no submodules to "
            "instrument in place; train lobster_fx.instrument(model) in your own loop instead")
    entries = [(e, p, m) for e, p, m in masked_parameters(gm)]
    at_top = [e.name for e, _, _ in entries if e.mask_path.startswith("opaque.parametrizations.")]
    if at_top:
        raise TypeError(f"LobsterCallback: parameters used by {type(model).__name__}'s own forward cannot be masked in "
                        f"place: {at_top[:4]}; pass filter_fn= to leave them out")
    for name, child in inner.named_children():
        if getattr(model, name) is not child:
            setattr(model, name, child)
    # the model's own state dict keys (parametrized weights live under other names) -> original names
    internal = list(model.state_dict(keep_vars=True))
    to_internal = {external_key(k, ""): k for k in internal if external_key(k, "") != k}
    mask_keys = {k for k in internal if k.endswith("_mask") or k.endswith(".0.mask")}
    # a plain attribute, not a submodule: no second copy of the weights in state_dict() / parameters()
    object.__setattr__(model, "_lobster_gm", gm)
    model._lobster_hooks = [
        model.register_state_dict_post_hook(_folded_state_dict),
        model._register_load_state_dict_pre_hook(_LoadOriginalKeys(to_internal)),
        model.register_load_state_dict_post_hook(_MasksNotMissing(mask_keys)),
    ]
    return gm


@torch.no_grad()
def _folded_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict()`` post-hook: original key names, ``weight * mask`` folded, no mask entries."""
    gm = module.__dict__.get("_lobster_gm")
    if gm is None:
        return
    mask_ptrs = {m.data_ptr(): m for _, _, m in masked_parameters(gm)}
    items = list(state_dict.items())
    state_dict.clear()
    renamed = {}
    for k, v in items:
        renamed[prefix + external_key(k[len(prefix):], "") if k.startswith(prefix) else k] = v
    folded: dict[int, torch.Tensor] = {}  # data_ptr of a weight -> its folded tensor: tied weights stay tied
    for k, v in renamed.items():
        if k.endswith("_mask") and v.data_ptr() in mask_ptrs and k[:-5] in renamed:
            continue
        mask = renamed.get(k + "_mask")
        if mask is not None and mask.data_ptr() in mask_ptrs:
            ptr = v.data_ptr()
            if ptr not in folded:
                folded[ptr] = (v * mask).detach().to(v.dtype)
            v = folded[ptr]
        state_dict[k] = v


class _LoadOriginalKeys:
    """``load_state_dict`` pre-hook: original key names to the model's own (parametrized weights)."""

    def __init__(self, to_internal: dict[str, str]) -> None:
        self.to_internal = to_internal

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for name, internal in self.to_internal.items():
            if prefix + name in state_dict and prefix + internal not in state_dict:
                state_dict[prefix + internal] = state_dict.pop(prefix + name)


class _MasksNotMissing:
    """``load_state_dict`` post-hook: folded weights carry no masks, and the masks stay as they are."""

    def __init__(self, mask_keys: set[str]) -> None:
        self.mask_keys = mask_keys

    def __call__(self, module: nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in self.mask_keys]


class LobsterCallback(TrainerCallback):
    """Sparse training (LOBSTER / SeReNe / L2 rule + plateau pruning) of a ``transformers.Trainer``'s model.

    Args:
        evaluate: ``evaluate(model) -> float`` validation loss. When given it decides the
            plateaus (``monitor`` is not read) and drives the pruning search; else the search
            averages ``model(**batch).loss`` over the Trainer's evaluation batches.
        method: ``"lobster"``, ``"serene"`` or ``"l2"``.
        lmbda, twt, pwe: the rule's strength, the pruning tolerance, evaluations without
            improvement before pruning (see :class:`lobster_fx.sparsifier.Sparsifier`).
        monitor: the evaluation metric that decides the plateaus when ``evaluate`` is None.
        rollback, granularity, sensitivity, score_fn, threshold, search_precision, filter_fn, fused: as
            for :class:`~lobster_fx.sparsifier.Sparsifier`.

    Attributes:
        sparsifier: the :class:`~lobster_fx.sparsifier.Sparsifier` (masks, rule, schedule;
            ``sparsifier.history`` lists the pruning phases).
    """

    def __init__(
        self,
        evaluate: Evaluate | None = None,
        *,
        method: str = "lobster",
        lmbda: float = 1e-4,
        twt: float = 0.05,
        pwe: int = 20,
        monitor: str = "eval_loss",
        rollback: bool = True,
        granularity: str | None = None,
        sensitivity: str = "output",
        score_fn: ScoreFn | None = None,
        threshold: float = 0.0,
        search_precision: float = 0.0,
        filter_fn: FilterFn | None = None,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"LobsterCallback: monitor must be an evaluation metric's name, got {monitor!r}")
        self.sparsifier = Sparsifier(
            evaluate, method=method, lmbda=lmbda, twt=twt, pwe=pwe, rollback=rollback, granularity=granularity,
            sensitivity=sensitivity, score_fn=score_fn, threshold=threshold, search_precision=search_precision, filter_fn=filter_fn,
            fused=fused, reuse_val_loss=evaluate is not None,
        )
        self.monitor = monitor
        self._user_evaluate = evaluate
        self._model: nn.Module | None = None
        self._eval_loader: Any = None
        self._training = False

    # --- set-up -------------------------------------------------------------------------------

    def _check_args(self, args: Any) -> None:
        if getattr(args, "deepspeed", None):
            raise RuntimeError("LobsterCallback does not support DeepSpeed (TrainingArguments.deepspeed): masks and "
                               "the per-step rule need whole, unsharded parameters")
        if getattr(args, "fsdp", None):  # None or [] when unused
            raise RuntimeError("LobsterCallback does not support FSDP (TrainingArguments.fsdp): masks and the "
                               "per-step rule need whole, unsharded parameters")
        if self.sparsifier.options["method"] == "serene" and getattr(args, "world_size", 1) > 1:
            raise RuntimeError(f"LobsterCallback: method='serene' with {args.world_size} processes is not supported "
                               "(the sensitivities would not be all-reduced); use method='lobster' or one process")

    def _prepare(self, args: Any, model: nn.Module) -> None:
        self._check_args(args)
        if self.sparsifier.gm is not None:
            if model is not self._model:
                raise RuntimeError("LobsterCallback: this callback already sparsifies another model; use one per Trainer")
            return
        gm = instrument_in_place(model, self.sparsifier.filter_fn)
        self.sparsifier.prepare(gm)
        self._model = model

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Instrument the model in place, before the Trainer builds the optimizer and wraps the model."""
        if model is not None:
            self._prepare(args, model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Hook the rule on the optimizer; on a resume, restore masks, rule and schedule."""
        if self.sparsifier.gm is None:
            if getattr(args, "world_size", 1) > 1:
                raise RuntimeError("LobsterCallback must be given to Trainer(callbacks=[...]) under DDP: added later, "
                                   "the model is wrapped before it is instrumented")
            self._prepare(args, model)
        torch_optimizer = optimizer
        while isinstance(getattr(torch_optimizer, "optimizer", None), torch.optim.Optimizer):
            torch_optimizer = torch_optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
        if not isinstance(torch_optimizer, torch.optim.Optimizer):
            raise TypeError(f"LobsterCallback: the Trainer's optimizer is {type(optimizer).__name__}, not a "
                            "torch.optim.Optimizer: the rule cannot hook it")
        sp = self.sparsifier
        sp.detach()  # a second train() builds a new optimizer: the state carries over
        sp.attach(torch_optimizer, self._user_evaluate or self._eval_loss)
        if state.global_step > 0:
            self._restore(args, state)
        self._training = True

    def _restore(self, args: Any, state: Any) -> None:
        resume = getattr(args, "resume_from_checkpoint", None)
        folder = resume if isinstance(resume, str) and resume else \
            os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"LobsterCallback: resuming at step {state.global_step}, but {path} does not exist: the masks, rule "
                "and schedule of that checkpoint are missing (resume from a checkpoint written with LobsterCallback, "
                "or set TrainingArguments(resume_from_checkpoint=<its folder>) when it is not in output_dir)")
        self.sparsifier.load_state_dict(load_checkpoint(path, required=("format", "options", "rule", "pruner")))

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
        best = getattr(state, "best_model_checkpoint", None)
        if args.load_best_model_at_end and best and os.path.isfile(os.path.join(best, STATE_FILE)):
            # the Trainer loaded that checkpoint's (folded) weights: its masks go with them
            saved = load_checkpoint(os.path.join(best, STATE_FILE), required=("format", "masks"))
            self.sparsifier.load_state_dict({"format": saved["format"], "options": saved["options"],
                                             "masks": saved["masks"]})

    # --- schedule -----------------------------------------------------------------------------

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        """Step the plateau schedule (may roll back and prune); not for evaluations outside ``train``."""
        self._eval_loader = eval_dataloader
        sp = self.sparsifier
        if not self._training or sp.pruner is None:
            return
        val_loss = None
        if self._user_evaluate is None:
            if not metrics or self.monitor not in metrics:
                raise KeyError(f"LobsterCallback: the evaluation metrics have no {self.monitor!r} (got "
                               f"{sorted(metrics or {})}); pass monitor= or evaluate=")
            val_loss = float(metrics[self.monitor])
        result = sp.step(val_loss)
        if result is not None:
            _logger.info(f"LobsterCallback: step {state.global_step}: pruned {result.pruned} parameters, "
                         f"{result.remaining} of {result.total} left (loss {result.loss_before:.4g} -> "
                         f"{result.loss_after:.4g})")

    @torch.no_grad()
    def _eval_loss(self, _: nn.Module) -> float:
        """The default ``evaluate``: mean ``model(**batch).loss`` over the evaluation batches."""
        if self._eval_loader is None:
            raise RuntimeError("LobsterCallback: no evaluation batches to evaluate the pruning on; give the Trainer "
                               "an eval_dataset, or LobsterCallback(evaluate=...)")
        model = self._model
        was_training = model.training
        model.eval()
        total, n = 0.0, 0
        try:
            for batch in self._eval_loader:
                out = model(**batch)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise TypeError("LobsterCallback: the model returned no loss on an evaluation batch (no labels?); "
                                    "the pruning search needs one, or LobsterCallback(evaluate=...)")
                total, n = total + float(loss), n + 1
        finally:
            model.train(was_training)
        if n == 0:
            raise RuntimeError("LobsterCallback: the evaluation dataloader is empty")
        return total / n

    # --- checkpoints --------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        """Write ``lobster_state.pt`` into the checkpoint folder the Trainer just wrote."""
        if self.sparsifier.gm is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"LobsterCallback: the Trainer's checkpoint folder {folder} does not exist "
                                    "(hyper-parameter search runs are not supported)")
        atomic_save(self.sparsifier.state_dict(), os.path.join(folder, STATE_FILE))
