"""NEq: stop updating neurons at equilibrium (Bragagnolo, Tartaglione, Grangetto 2022).

Once per epoch, :meth:`NEq.step` measures every prunable Linear / Conv unit's outputs ``z``
(before the activation) on a fixed validation subset, in eval mode and without gradients, and
computes per unit (the paper's formulas)::

    phi^t  = cos(z^t, z^{t-1})              over all samples and positions together
    dphi^t = phi^t - phi^{t-1}
    v^t    = dphi^t - mu * v^{t-1}          (v = 0 before the first dphi)
    frozen for the next epoch  iff  |v^t| < eps

``phi`` exists from the second measurement on, ``dphi`` and ``v`` from the third, so the
first units can freeze after the third call (call it before each epoch's training, the first
time before any). Every unit is re-tested at every call: a frozen unit can thaw. A unit whose
outputs are all zero at both measurements (pruned) has ``phi = 1``; one zero, one not: ``0``.

Freezing semantics ("a frozen unit does not move at all during the epoch"): an optimizer step
pre-hook copies the frozen rows of each parameter (weight rows / filters, bias entries, the
affine weight and bias entries of a BatchNorm right after the layer) and the same rows of
every optimizer state tensor shaped like the parameter (``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ...); a post-hook writes them back. So with any
``torch.optim`` optimizer there is no gradient step, no weight decay, no momentum / moment
update and no LOBSTER / SeReNe shrink on a frozen row, bit for bit. State that is one scalar
per tensor (Adam's ``step``) cannot be per row: it still advances, which changes the bias
correction a thawed unit's moments get (their moments themselves are untouched). State created
by this very step (SGD / Adam initialise lazily) gets zeros in the frozen rows, as if never
updated. Hook order: NEq's pre-hook is moved to the front of the optimizer's pre-hooks and its
post-hook to the back of the post-hooks at every step, so it saves the rows before any rule's
pre-hook shrinks them in place and restores them after every rule's post-hook, whichever was
created first. BatchNorm running statistics keep updating (the paper's code does the same):
only its affine parameters are rows of the frozen unit. Parameters without a gradient are left
alone (``torch.optim`` optimizers skip them).

Real savings (:mod:`lobster_fx.methods.neq_backward`): with ``fast=True`` fully frozen layers get
``requires_grad_(False)`` (the backward stops below the lowest layer that still trains) and
partially frozen ones a backward computing ``dW`` rows of active units only. The optimizer
hook keeps the semantics exact either way; the fast path only avoids work.

DDP: the measurement runs on each rank's ``val_inputs`` (the wrapped module, no collective),
then ``phi``, the velocity and the decisions are broadcast from rank 0, so every rank freezes
the same units. GradScaler: a skipped step calls no hook. Accumulation: nothing per micro-batch.

Example::

    >>> import torch, lobster_fx
    >>> from lobster_fx.methods.neq import NEq
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> gm = lobster_fx.instrument(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
    ...                                                 torch.nn.Linear(3, 2)))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    >>> neq = NEq(gm, opt, torch.randn(16, 4), eps=1.0)
    >>> for epoch in range(3):
    ...     fractions = neq.step()  # measure, decide: frozen fraction per layer
    ...     gm(torch.randn(8, 4)).square().mean().backward(); opt.step(); opt.zero_grad()
    >>> fractions, neq.frozen["0"]  # eps=1: every unit's |v| < 1
    ({'0': 1.0, '2': 1.0}, tensor([True, True, True]))
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lobster_fx.graph.instrument import lobster_info, unwrap
from lobster_fx.graph.taps import install_taps
from lobster_fx.methods.neq_backward import LayerCtl, install_fast_path, remove_fast_path

__all__ = ["NEq", "cosine_per_unit"]

_ATTACHED: weakref.WeakSet[NEq] = weakref.WeakSet()


def cosine_per_unit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``(units, n)`` tensors in float64; 1 where both rows are zero,
    0 where only one is."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return cos.clamp(-1.0, 1.0)


class _Layer:
    """One unit layer: its parameters (rows = units) and its fast-path control."""

    def __init__(self, name: str, count: int, params: list[nn.Parameter]) -> None:
        self.name, self.count, self.params = name, count, params
        self.ctl: LayerCtl | None = None


class NEq:
    """Freeze the units of ``gm`` whose outputs on ``val_inputs`` have settled (module docstring).

    Args:
        gm: a module returned by :func:`lobster_fx.instrument` (or a DDP / ``torch.compile``
            wrapper of one). Its unit taps are installed (idle outside :meth:`step`).
        optimizer: any ``torch.optim.Optimizer`` over ``gm``'s parameters.
        val_inputs: a non-empty tensor of model inputs (the first dim is the batch), run in
            batches of ``batch_size``; may be None only with ``random_rate``.
        eps: the velocity threshold, >= 0.
        mu: the velocity's momentum, in [0, 1).
        exclude: layer names (``fnmatch`` patterns allowed) never frozen, e.g. ``["fc2"]``.
        random_rate: the random-freezing baseline: instead of measuring, each :meth:`step`
            freezes ``round(rate * units)`` units drawn at random per layer; a float in [0, 1]
            or ``{layer: rate}`` (missing layers: 0). Settable between steps.
        fast: skip the backward work of frozen units (:mod:`lobster_fx.methods.neq_backward`).
        row_wise_min: with ``fast``, a partly frozen layer runs the row-wise ``dW`` backward only
            when at least this share of its units is frozen; below it the row selection copies
            most of ``dL/dz`` to save a few rows, and the full backward runs instead (LeNet-5,
            conv1 with 5% frozen: 1.035x the step time row-wise vs 1.022x full, within the
            probe's +-2% noise; from 10% the row-wise path was as fast or faster:
            ``benchmarks/results/neq.md``). Frozen units stay exact either way.
        batch_size: the measurement's batch size.
        seed: the random baseline's generator seed.
        process_group: DDP group to broadcast decisions over (default: the wrapper's, else
            the default group when ``torch.distributed`` is initialised).

    Attributes ``phi``, ``velocity`` (float64 per unit) and ``frozen`` (bool per unit) are
    dicts keyed by the layer's name in the original model (``phi`` is empty until the second
    measurement). The previous measurement's outputs are kept (``units x samples x positions``
    per layer, in the model's dtype): keep ``val_inputs`` small (the paper: 500 CIFAR images).
    Not tested under ``torch.compile``.

    Raises:
        TypeError: ``optimizer`` is no optimizer, ``gm`` is not instrumented, ``val_inputs``
            is not a tensor.
        ValueError: ``eps < 0``, ``mu`` outside [0, 1), empty ``val_inputs``, inputs the model
            cannot run, an unknown ``exclude`` name, a bad ``random_rate``. Nothing is modified.
    """

    def __init__(self, gm: nn.Module, optimizer: torch.optim.Optimizer, val_inputs: torch.Tensor | None, *,
                 eps: float = 1e-3, mu: float = 0.5, exclude: Iterable[str] = (),
                 random_rate: float | dict[str, float] | None = None, fast: bool = True,
                 batch_size: int = 256, seed: int = 0, process_group: Any = None,
                 row_wise_min: float = 0.1) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"NEq expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.eps = self._real(eps, "eps", lo=0.0)
        self.mu = self._real(mu, "mu", lo=0.0)
        self.row_wise_min = self._real(row_wise_min, "row_wise_min", lo=0.0)
        if not self.row_wise_min <= 1.0:
            raise ValueError(f"NEq: row_wise_min must be in [0, 1], got {row_wise_min!r}")
        if not self.mu < 1.0:
            raise ValueError(f"NEq: mu must be in [0, 1), got {mu!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"NEq: batch_size must be a positive int, got {batch_size!r}")
        self.wrapper = gm
        self.gm = unwrap(gm)
        info = lobster_info(self.gm)  # TypeError if not instrumented
        self.batch_size = batch_size
        if val_inputs is None and random_rate is None:
            raise ValueError("NEq: val_inputs is None; it is required unless random_rate is given")
        if val_inputs is not None:
            self._check_inputs(val_inputs)
        self.val_inputs = val_inputs
        from lobster_fx.graph.taps import find_units
        units = find_units(self.gm)
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        for pat in exclude:
            if not any(fnmatch.fnmatchcase(n, pat) for n in units):
                raise ValueError(f"NEq: exclude={pat!r} matches no unit layer; layers: {sorted(units)}")
        self.exclude = exclude
        self._random_rate = None
        self.random_rate = random_rate  # checked by the setter
        if any(o.optimizer is optimizer for o in list(_ATTACHED) if o._handles):
            raise ValueError("NEq: this optimizer already has an NEq attached; call .remove() on it first")
        # --- from here on the model and the optimizer are modified
        self.taps = install_taps(self.gm)
        self.optimizer = optimizer
        self.fast = bool(fast)
        self.ddp = isinstance(gm, nn.parallel.DistributedDataParallel)
        self.process_group = process_group if process_group is not None else \
            (getattr(gm, "process_group", None) if self.ddp else None)
        self._layers: dict[str, _Layer] = {}
        for name, tap in self.taps.items():
            unit = tap.unit
            params = [self.gm.get_parameter(info.params[unit.weight].param_path)]
            if unit.bias is not None:
                params.append(self.gm.get_parameter(info.params[unit.bias].param_path))
            if unit.norm is not None:
                norm = self.gm.get_submodule(unit.norm)
                params += [p for p in (norm.weight, norm.bias) if isinstance(p, nn.Parameter)]
            self._layers[name] = _Layer(name, unit.count, params)
        self._requires_grad = {id(p): p.requires_grad for layer in self._layers.values() for p in layer.params}
        if self.fast:
            for name, ctl in install_fast_path(self.gm, set(self._layers)).items():
                self._layers[name].ctl = ctl
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.measurements = 0
        self.phi: dict[str, torch.Tensor] = {}
        self.velocity = {n: torch.zeros(la.count, dtype=torch.float64) for n, la in self._layers.items()}
        self.frozen = {n: torch.zeros(la.count, dtype=torch.bool) for n, la in self._layers.items()}
        self._has_velocity = False
        self._outputs: dict[str, torch.Tensor] | None = None
        self._saved: list | None = None
        pre = optimizer.register_step_pre_hook(self._before_step)
        post = optimizer.register_step_post_hook(self._after_step)
        self._handles = [pre, post]
        self._order_hooks()
        _ATTACHED.add(self)

    # --- checks -------------------------------------------------------------------------------

    @staticmethod
    def _real(v: Any, what: str, lo: float) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"NEq: {what} must be a real number, got {v!r} ({type(v).__name__})")
        if not math.isfinite(v) or v < lo:
            raise ValueError(f"NEq: {what} must be finite and >= {lo}, got {v!r}")
        return float(v)

    def _check_inputs(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"NEq: val_inputs must be a tensor (batch first), got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"NEq: val_inputs is empty (shape {tuple(x.shape)}); give at least one sample")
        mode = self.gm.training
        try:
            self.gm.eval()
            with torch.no_grad():
                self.gm(x[:1])
        except Exception as exc:
            raise ValueError(f"NEq: the model cannot run val_inputs of shape {tuple(x.shape)} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        finally:
            self.gm.train(mode)

    @property
    def random_rate(self) -> float | dict[str, float] | None:
        return self._random_rate

    @random_rate.setter
    def random_rate(self, rate: float | dict[str, float] | None) -> None:
        rates = rate.values() if isinstance(rate, dict) else ([] if rate is None else [rate])
        for r in rates:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
                raise ValueError(f"NEq: random_rate must be in [0, 1] (or a dict of such), got {rate!r}")
        self._random_rate = dict(rate) if isinstance(rate, dict) else rate

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    # --- measurement and decisions ------------------------------------------------------------

    @torch.no_grad()
    def measure(self) -> dict[str, torch.Tensor]:
        """Every unit's outputs on ``val_inputs``: ``{layer: (units, samples * positions)}``,
        in eval mode (the model's mode is restored)."""
        mode = self.gm.training
        tracker = self.taps.track(lambda u: u.clone(), on="output", keep="all")
        try:
            self.gm.eval()
            for i in range(0, self.val_inputs.shape[0], self.batch_size):
                self.gm(self.val_inputs[i:i + self.batch_size])
            values = tracker.values()
        finally:
            tracker.close()
            self.gm.train(mode)
        return {n: torch.cat(v, 1).cpu() for n, v in values.items()}

    def step(self) -> dict[str, float]:
        """Measure (or draw, for the random baseline), decide, apply for the next epoch.
        Returns the frozen fraction per layer."""
        if self._random_rate is not None:
            for name, layer in self._layers.items():
                rate = self._random_rate.get(name, 0.0) if isinstance(self._random_rate, dict) else self._random_rate
                frozen = torch.zeros(layer.count, dtype=torch.bool)
                k = 0 if self._excluded(name) else int(round(rate * layer.count))
                frozen[torch.randperm(layer.count, generator=self.generator)[:k]] = True
                self.frozen[name] = frozen
        else:
            outputs = self.measure()
            if self._outputs is not None:
                phi = {n: cosine_per_unit(outputs[n], self._outputs[n]) for n in self._layers}
                if self.phi:
                    for n in self._layers:
                        self.velocity[n] = (phi[n] - self.phi[n]) - self.mu * self.velocity[n]
                        self.frozen[n] = (self.velocity[n].abs() < self.eps) & (not self._excluded(n))
                    self._has_velocity = True
                self.phi = phi
            self._outputs = outputs
        self.measurements += 1
        self._broadcast()
        self._apply()
        return self.frozen_fraction()

    def frozen_fraction(self) -> dict[str, float]:
        return {n: float(f.float().mean()) for n, f in self.frozen.items()}

    def _broadcast(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) < 2:
            return
        names = list(self._layers)
        phi = [self.phi.get(n, torch.zeros(self._layers[n].count, dtype=torch.float64)) for n in names]
        flat = torch.cat(phi + [self.velocity[n] for n in names] + [self.frozen[n].double() for n in names])
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(self.process_group) == "nccl" else torch.device("cpu")
        flat = flat.to(dev)
        dist.broadcast(flat, src, group=self.process_group)
        parts = flat.cpu().split([self._layers[n].count for n in names] * 3)
        k = len(names)
        for i, n in enumerate(names):
            if self.phi:
                self.phi[n] = parts[i].clone()
            self.velocity[n] = parts[k + i].clone()
            self.frozen[n] = parts[2 * k + i] != 0

    def _apply(self) -> None:
        """The fast path's state for the decisions in ``self.frozen``."""
        everything = all(bool(f.all()) for f in self.frozen.values())
        last = list(self._layers)[-1]
        for name, layer in self._layers.items():
            frozen = self.frozen[name]
            n_frozen = int(frozen.sum())
            # with every unit frozen one layer keeps requires_grad (zero rows): the loss must
            # still have a graph, or the user's loss.backward() would fail
            whole = n_frozen == layer.count and self.fast and not self.ddp and \
                not (everything and name == last and layer.ctl is not None)
            for p in layer.params:
                if self._requires_grad[id(p)]:
                    p.requires_grad_(not whole)
            if layer.ctl is not None:
                partial = n_frozen > 0 and not whole and n_frozen >= self.row_wise_min * layer.count
                layer.ctl.active = (~frozen).nonzero().flatten().to(layer.params[0].device) if partial else None

    # --- the optimizer hooks ------------------------------------------------------------------

    def _order_hooks(self) -> None:
        # the save before any other pre-hook (a rule may shrink in place there), the restore
        # after every other post-hook (a rule applies its term there)
        if self._handles:
            self.optimizer._optimizer_step_pre_hooks.move_to_end(self._handles[0].id, last=False)
            self.optimizer._optimizer_step_post_hooks.move_to_end(self._handles[1].id, last=True)

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # reordering the post-hooks here is safe: the optimizer iterates them after its step
        self.optimizer._optimizer_step_post_hooks.move_to_end(self._handles[1].id, last=True)
        saved = []
        for name, layer in self._layers.items():
            frozen = self.frozen[name]
            if not bool(frozen.any()):
                continue
            for p in layer.params:
                if p.grad is None:
                    continue  # torch.optim skips it: nothing moves
                idx = frozen.nonzero().flatten().to(p.device)
                state = optimizer.state.get(p)
                rows = {k: t.index_select(0, idx) for k, t in (state or {}).items()
                        if isinstance(t, torch.Tensor) and t.shape == p.shape}
                saved.append((p, idx, p.index_select(0, idx), rows, state is not None))
        self._saved = saved

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        saved, self._saved = self._saved, None
        # the pre-hooks dict is no longer iterated: put ours first again for the next step
        self.optimizer._optimizer_step_pre_hooks.move_to_end(self._handles[0].id, last=False)
        for p, idx, values, rows, had_state in saved or ():
            p.index_copy_(0, idx, values)
            state = optimizer.state.get(p, {})
            for k, t in state.items():
                if not (isinstance(t, torch.Tensor) and t.shape == p.shape):
                    continue
                if k in rows:
                    t.index_copy_(0, idx, rows[k])
                elif not had_state:  # created by this step: as if never updated
                    t.index_fill_(0, idx, 0)

    # --- state and lifecycle ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`step` reads: a resumed run decides like an uninterrupted one."""
        return {
            "eps": self.eps, "mu": self.mu, "exclude": list(self.exclude), "random_rate": self._random_rate,
            "measurements": self.measurements, "has_velocity": self._has_velocity,
            "phi": {k: v.clone() for k, v in self.phi.items()},
            "velocity": {k: v.clone() for k, v in self.velocity.items()},
            "frozen": {k: v.clone() for k, v in self.frozen.items()},
            "outputs": None if self._outputs is None else {k: v.clone() for k, v in self._outputs.items()},
            "seed": self.seed, "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = set(self._layers)
        for key in ("velocity", "frozen"):
            if set(state[key]) != names:
                raise ValueError(f"NEq.load_state_dict: {key} is for layers {sorted(state[key])}, "
                                 f"this model has {sorted(names)}")
            for n, t in state[key].items():
                if t.shape != (self._layers[n].count,):
                    raise ValueError(f"NEq.load_state_dict: {key}[{n!r}] has shape {tuple(t.shape)}, "
                                     f"the layer has {self._layers[n].count} units")
        eps = self._real(state["eps"], "eps", 0.0)
        mu = self._real(state["mu"], "mu", 0.0)
        self.eps, self.mu = eps, mu
        self.exclude = list(state["exclude"])
        self.random_rate = state["random_rate"]
        self.measurements = int(state["measurements"])
        self._has_velocity = bool(state["has_velocity"])
        self.phi = {k: v.clone().double() for k, v in state["phi"].items()}
        self.velocity = {k: v.clone().double() for k, v in state["velocity"].items()}
        self.frozen = {k: v.clone().bool() for k, v in state["frozen"].items()}
        outputs = state["outputs"]
        self._outputs = None if outputs is None else {k: v.clone() for k, v in outputs.items()}
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
        self._apply()

    def remove(self) -> None:
        """Detach from the optimizer, thaw every unit, restore the graph (the taps stay, idle)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        _ATTACHED.discard(self)
        for layer in self._layers.values():
            for p in layer.params:
                p.requires_grad_(self._requires_grad[id(p)])
            layer.ctl = None
        if self.fast:
            remove_fast_path(self.gm)

    def __repr__(self) -> str:
        total = sum(la.count for la in self._layers.values())
        frozen = sum(int(f.sum()) for f in self.frozen.values())
        return (f"NEq(eps={self.eps}, mu={self.mu}, measurements={self.measurements}, "
                f"frozen={frozen}/{total}, fast={self.fast})")
