"""CUDA checks of lobster_fx, in one short run (under 8 minutes on one GPU).

Checks, each in a fresh child process with its own time limit (a failure, a hang or a
CUDA error in one is recorded with its error and the others still run):

(a) ``fused_rule``: ``Lobster(..., fused=True)`` on CUDA equals the eager path
    (``fused=False``) and eq. (6) by hand, ``w_t = w - lr*g - lmbda*w*relu(1-|g|)``,
    with plain SGD (the in-place shrink kernel) and with SGD + weight decay (the
    term-after-the-update kernels, ``+ lr*wd*w`` in the hand-written update); the
    compiled path must not fall back to eager.
(b) ``half_precision``: bf16 and fp16 parameters, lr = 0, N steps: the LOBSTER term
    alone must shrink mean |w| as much as in float32 (within 10% of the float32
    shrink), eager and fused. A measurement of the rule as it is.
(c) ``nccl_prune``: a world_size=1 NCCL process group (``init_process_group("nccl")``,
    MASTER_ADDR/PORT set, rank 0): ``lobster_fx.prune`` and ``PlateauPruner`` on a CUDA
    model, with the loss all-reduce they do under ``torch.distributed``.
(d) ``csr``: ``to_sparse_csr`` of a folded, pruned model on CUDA (CSR tensors on the GPU)
    against the dense model: outputs, and median latency of both.
(e) ``ort_cuda``: a small pruned model through ``export_onnx``, an ONNX Runtime session
    with CUDAExecutionProvider first; ``get_providers()[0]`` must be CUDA, profiling must
    show the MatMul/Gemm nodes on CUDA; timed with input and output bound on the GPU
    (``io_binding`` with torch tensors' ``data_ptr``: no host copies in the timing),
    median ms against the CPU provider.
(f) ``resnet18_overhead``: ResNet-18 (torchvision, ``weights=None``) training step on
    CUDA, plain vs instrumented (masks only) vs instrumented + Lobster (default path: fused
    at this size) vs + Lobster(fused=False); interleaved rounds, medians,
    ``torch.cuda.synchronize()`` around every timing.

Usage::

    python benchmarks/gpu_check.py                          # all checks, writes results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --checks csr,ort_cuda    # a subset, merged into the results
    python benchmarks/gpu_check.py --device cpu --out-dir /tmp/x   # the checks' logic on CPU (a dry run)

Without CUDA it says so and exits 0, writing nothing. The exit code is 1 if any check
failed. The check functions take a ``device`` argument, so the logic runs on CPU in
tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's lobster_fx, not an installed copy
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402 (after the sys.path line above)
import torch  # noqa: E402 (after the sys.path line above)
import torch.nn.functional as F  # noqa: E402 (after the sys.path line above)
from torch import nn  # noqa: E402 (after the sys.path line above)

RESULTS = ROOT / "benchmarks" / "results"
#: the whole run stays under 8 minutes: checks are cut at this many seconds from the start
TOTAL_BUDGET_S = 450.0


class CheckFailed(AssertionError):
    """A check ran and its condition does not hold (``details`` says what was measured)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


# --------------------------------------------------------------------------- helpers


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], *, repeats: int, warmup: int = 3, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in ms, each call timed alone between two ``synchronize()``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter_ns()
        fn()
        _sync(device)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e6


def _mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def random_masks_(gm: nn.Module, zero_fraction: float, seed: int, *, matrices_only: bool = False) -> int:
    """Zero ``zero_fraction`` of each mask of the instrumented ``gm`` at random (and its
    weights); ``matrices_only`` leaves 1-D parameters (biases) whole. Returns the zeros set."""
    from lobster_fx.graph.instrument import masked_parameters

    g = torch.Generator().manual_seed(seed)
    zeros = 0
    for _, p, mask in masked_parameters(gm):
        if matrices_only and p.dim() < 2:
            continue
        keep = (torch.rand(p.shape, generator=g) >= zero_fraction).to(device=mask.device, dtype=mask.dtype)
        mask.copy_(keep)
        p.mul_(mask)
        zeros += int((keep == 0).sum())
    return zeros


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _warning_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    return sorted({str(w.message).splitlines()[0][:300] for w in caught})


# --------------------------------------------------------------------------- (a) fused rule == eq. (6)


def eq6_reference(w: torch.Tensor, g: torch.Tensor, lr: float, lmbda: float, weight_decay: float = 0.0) -> torch.Tensor:
    """Eq. (6) with plain SGD, written out: ``w - lr*(g + wd*w) - lmbda*w*relu(1 - |g|)``.

    ``weight_decay=0`` is the paper's rule; with weight decay the SGD update reads ``w``, and
    the rule adds its term to whatever the optimizer did (decoupled)."""
    return w - lr * (g + weight_decay * w) - lmbda * w * torch.relu(1 - g.abs())


def eq6_trajectory(gm: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, lmbda: float,
                   weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """``steps`` steps of eq. (6) by hand on the instrumented ``gm`` (pruned entries pinned to 0
    by the masks, non-prunable parameters plain SGD). Returns the final parameters."""
    from lobster_fx.graph.instrument import masked_parameters

    prunable = {id(p): mask for _, p, mask in masked_parameters(gm)}
    params = list(gm.parameters())
    for _ in range(steps):
        for p in params:
            p.grad = None
        F.cross_entropy(gm(x), y).backward()
        with torch.no_grad():
            for p in params:
                if id(p) in prunable:
                    p.copy_(eq6_reference(p, p.grad, lr, lmbda, weight_decay) * prunable[id(p)])
                else:
                    p.sub_(lr * (p.grad + weight_decay * p))
    return _params(gm)


def rule_trajectory(gm: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, lmbda: float,
                    weight_decay: float = 0.0, fused: bool | None = False) -> tuple[dict[str, torch.Tensor], Any]:
    """The same steps with ``torch.optim.SGD`` + ``lobster_fx.Lobster``; returns (parameters, rule)."""
    import lobster_fx

    opt = torch.optim.SGD(gm.parameters(), lr=lr, weight_decay=weight_decay)
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    return _params(gm), rule


def check_fused_rule(device: str = "cuda", *, fused_paths: tuple[bool, ...] | None = None, steps: int = 5,
                     lr: float = 0.1, lmbda: float = 0.05, atol: float = 1e-5) -> dict[str, Any]:
    """(a) the rule (fused and eager) against eq. (6) by hand, with plain SGD and SGD + weight decay."""
    import lobster_fx

    if fused_paths is None:
        fused_paths = (True, False) if torch.device(device).type == "cuda" else (False,)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g).to(device)
    y = torch.randint(0, 10, (32,), generator=g).to(device)

    def fresh() -> nn.Module:
        gm = lobster_fx.instrument(_mlp((64, 128, 10), seed=0).to(device))
        random_masks_(gm, 0.3, seed=2)  # pruned entries: the pin is part of the rule
        return gm

    details: dict[str, Any] = {"device": str(device), "steps": steps, "lr": lr, "lmbda": lmbda, "atol": atol,
                               "cases": {}}
    problems = []
    for case, wd in (("sgd", 0.0), ("sgd_weight_decay", 1e-2)):
        ref = eq6_trajectory(fresh(), x, y, steps=steps, lr=lr, lmbda=lmbda, weight_decay=wd)
        start = _params(fresh())
        row: dict[str, Any] = {"weight_decay": wd, "moved_max_abs": _max_abs_diff(ref, start)}
        finals = {}
        for fused in fused_paths:
            name = "fused" if fused else "eager"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                finals[name], rule = rule_trajectory(fresh(), x, y, steps=steps, lr=lr, lmbda=lmbda,
                                                     weight_decay=wd, fused=fused)
            row[f"{name}_vs_eq6_max_abs"] = _max_abs_diff(finals[name], ref)
            row[f"{name}_path_ran"] = bool(rule.fused) == bool(fused) and rule.steps == steps
            if warns := _warning_lines(caught):
                row[f"{name}_warnings"] = warns
            if not row[f"{name}_path_ran"]:
                problems.append(f"{case}: the {name} path did not run (rule.fused={rule.fused}, steps={rule.steps}): "
                                f"{'; '.join(warns) or 'no warning'}")
            elif row[f"{name}_vs_eq6_max_abs"] > atol:
                problems.append(f"{case}: {name} differs from eq. (6) by {row[f'{name}_vs_eq6_max_abs']:.3g} > {atol}")
        if "fused" in finals and "eager" in finals:
            row["fused_vs_eager_max_abs"] = _max_abs_diff(finals["fused"], finals["eager"])
        if row["moved_max_abs"] <= 100 * atol:
            problems.append(f"{case}: the weights hardly moved ({row['moved_max_abs']:.3g}): the comparison says nothing")
        details["cases"][case] = row
    worst = max(v for row in details["cases"].values() for k, v in row.items() if k.endswith("_vs_eq6_max_abs"))
    details["summary"] = f"max |rule - eq. (6)| {worst:.2e} over {', '.join('fused' if f else 'eager' for f in fused_paths)}"
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


# --------------------------------------------------------------------------- (b) half precision


def lobster_shrink_ratio(device: str, dtype: torch.dtype, *, fused: bool, steps: int, lmbda: float,
                         seed: int = 0) -> float:
    """mean |w| after ``steps`` SGD(lr=0) + Lobster steps over mean |w| before: the LOBSTER term alone."""
    import lobster_fx
    from lobster_fx.graph.instrument import masked_parameters

    model = _mlp((256, 256, 10), seed=seed).to(device=device, dtype=dtype)
    gm = lobster_fx.instrument(model)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 256, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (64,), generator=g).to(device)

    def mean_abs() -> float:
        with torch.no_grad():
            ps = [p for _, p, _ in masked_parameters(gm)]
            return float(sum(p.float().abs().sum() for p in ps) / sum(p.numel() for p in ps))

    before = mean_abs()
    opt = torch.optim.SGD(gm.parameters(), lr=0.0)
    rule = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x).float(), y).backward()
        opt.step()
    if bool(rule.fused) != bool(fused):
        raise CheckFailed(f"{dtype}: the {'fused' if fused else 'eager'} path did not run (rule.fused={rule.fused})")
    return mean_abs() / before


def half_verdict(ratio: float, ratio_fp32: float, tol: float) -> tuple[float, bool]:
    """(shrink relative to float32's, ok): ``(1 - ratio) / (1 - ratio_fp32)`` within ``1 +- tol``."""
    shrink32 = 1.0 - ratio_fp32
    rel = (1.0 - ratio) / shrink32 if shrink32 > 0 else float("nan")
    return rel, abs(rel - 1.0) <= tol


def check_half_precision(device: str = "cuda", *, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16),
                         fused_paths: tuple[bool, ...] | None = None, steps: int = 500, lmbda: float = 1e-4,
                         tol: float = 0.1) -> dict[str, Any]:
    """(b) bf16 / fp16 parameters: the LOBSTER term must take effect as in float32 (lr = 0)."""
    if fused_paths is None:
        fused_paths = (False, True) if torch.device(device).type == "cuda" else (False,)
    r32 = lobster_shrink_ratio(device, torch.float32, fused=False, steps=steps, lmbda=lmbda)
    details: dict[str, Any] = {"device": str(device), "steps": steps, "lmbda": lmbda, "tol": tol,
                               "float32_ratio": r32, "no_gradient_ratio": (1 - lmbda) ** steps, "runs": {}}
    problems = []
    for dtype in dtypes:
        for fused in fused_paths:
            key = f"{str(dtype).removeprefix('torch.')}_{'fused' if fused else 'eager'}"
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ratio = lobster_shrink_ratio(device, dtype, fused=fused, steps=steps, lmbda=lmbda)
            except Exception as e:  # noqa: BLE001 - one dtype's failure is reported with the others
                details["runs"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                problems.append(f"{key}: {details['runs'][key]['error']}")
                continue
            rel, ok = half_verdict(ratio, r32, tol)
            details["runs"][key] = {"ratio": ratio, "shrink_vs_float32": rel, "ok": ok}
            if warns := _warning_lines(caught):
                details["runs"][key]["warnings"] = warns
            if not ok:
                problems.append(f"{key}: mean|w| x{ratio:.5f} after {steps} steps, float32 x{r32:.5f} "
                                f"(shrink {rel:.2f} of float32's)")
    details["summary"] = "shrink vs float32: " + ", ".join(
        f"{k} {v['shrink_vs_float32']:.2f}" if "shrink_vs_float32" in v else f"{k} error" for k, v in details["runs"].items())
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


# --------------------------------------------------------------------------- (c) NCCL process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(backend: str, device: str):
    """A world_size=1 process group, rank 0, through the env:// rendezvous (MASTER_ADDR/PORT)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield dist
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_distributed(device: str = "cuda", *, backend: str = "nccl") -> dict[str, Any]:
    """(c) prune and PlateauPruner on a ``device`` model inside a world_size=1 ``backend`` group."""
    import lobster_fx
    from lobster_fx.graph.instrument import masked_parameters

    details: dict[str, Any] = {"device": str(device), "backend": backend}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 32, generator=g).to(device)
    y = x[:, :4].argmax(1)  # learnable: pruning then keeps what the loss needs and drops the rest
    gm = lobster_fx.instrument(_mlp((32, 64, 4), seed=0).to(device))
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), y).backward()
        opt.step()

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    details["trained_loss"] = evaluate(gm)

    with single_process_group(backend, device) as dist:
        details["backend_in_use"] = str(dist.get_backend())
        seen: list[str] = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            seen.append(f"{tensor.device.type}:{str(tensor.dtype).removeprefix('torch.')}")
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce  # prune looks it up at call time
        try:
            result = lobster_fx.prune(gm, evaluate, twt=0.05)
            details["prune"] = result.to_dict()
            pruner = lobster_fx.PlateauPruner(gm, evaluate, twt=0.05, pwe=2)
            steps = [pruner.step(v) for v in (1.0, 1.1, 1.2)]
        finally:
            dist.all_reduce = real_all_reduce
    details["all_reduce_calls"] = len(seen)
    details["all_reduce_tensors"] = sorted(collections.Counter(seen).items())
    details["plateau_pruned_at_step"] = [i + 1 for i, r in enumerate(steps) if r is not None]
    details["plateau_history"] = len(pruner.history)
    zeros = sum(int((mask == 0).sum()) for _, _, mask in masked_parameters(gm))
    pinned = all(bool((p[mask == 0] == 0).all()) for _, p, mask in masked_parameters(gm))
    details["masked_zeros"] = zeros
    details["summary"] = (f"{backend}: prune {result.pruned}/{result.total} in {result.evaluations} evaluations, "
                          f"{len(seen)} all_reduce calls, PlateauPruner pruned at step {details['plateau_pruned_at_step']}")
    problems = []
    if not 0 < result.pruned < result.total or result.evaluations < 2 or not result.loss_after <= result.bound:
        problems.append(f"prune: {result}")
    if backend == "nccl" and any(not t.startswith("cuda") for t in seen):
        problems.append(f"all_reduce got tensors {details['all_reduce_tensors']}: NCCL takes CUDA tensors only")
    if len(seen) < result.evaluations:
        problems.append(f"only {len(seen)} all_reduce calls for {result.evaluations} evaluations")
    if details["plateau_pruned_at_step"] != [3]:
        problems.append(f"PlateauPruner(pwe=2) pruned at steps {details['plateau_pruned_at_step']}, expected [3]")
    if not pinned:
        problems.append("pruned weights are not zero")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


# --------------------------------------------------------------------------- (d) CSR on the device


def check_csr(device: str = "cuda", *, sparsity: float = 0.98, repeats: int = 50) -> dict[str, Any]:
    """(d) ``to_sparse_csr`` of a folded pruned model on ``device`` against the dense folded model."""
    import lobster_fx
    from lobster_fx.passes.csr import CsrTensor

    gm = lobster_fx.instrument(_mlp((512, 1024, 1024, 10), seed=0).to(device))
    random_masks_(gm, sparsity, seed=4, matrices_only=True)
    dense = lobster_fx.fold(gm).eval()
    csr = lobster_fx.to_sparse_csr(dense, min_sparsity=0.9).eval()
    report = csr.meta["lobster_sparse"]
    holders = [m.csr for m in csr.modules() if isinstance(m, CsrTensor)]
    details: dict[str, Any] = {"device": str(device), "sparsity": sparsity, "converted": sorted(report.converted),
                               "csr_devices": sorted({str(t.device) for t in holders}),
                               "dense_params_left": sorted(n for n, p in csr.named_parameters() if p.dim() == 2)}
    g = torch.Generator().manual_seed(5)
    problems = []
    with torch.no_grad():
        for name, shape in (("batch64", (64, 512)), ("batch1", (1, 512)), ("3d", (4, 8, 512))):
            x = torch.randn(shape, generator=g).to(device)
            ref, out = dense(x), csr(x)
            diff = float((out - ref).abs().max())
            scale = float(ref.abs().max())
            details[f"max_abs_diff_{name}"] = diff
            if out.shape != ref.shape or not diff <= 1e-5 + 1e-4 * scale:
                problems.append(f"{name}: max |csr - dense| {diff:.3g} (output scale {scale:.3g}), shapes "
                                f"{tuple(out.shape)} vs {tuple(ref.shape)}")
        for b in (1, 64):
            x = torch.randn(b, 512, generator=g).to(device)
            details[f"dense_ms_b{b}"] = median_ms(lambda x=x: dense(x), repeats=repeats, device=device)
            details[f"csr_ms_b{b}"] = median_ms(lambda x=x: csr(x), repeats=repeats, device=device)
    if len(report.converted) != 3:
        problems.append(f"converted {sorted(report.converted)}, expected the 3 Linear weights ({report.reasons})")
    if details["csr_devices"] != [str(torch.empty(0, device=device).device)]:
        problems.append(f"CSR tensors on {details['csr_devices']}, not {device}")
    if details["dense_params_left"]:
        problems.append(f"dense weights still held: {details['dense_params_left']}")
    details["summary"] = (f"{len(report.converted)} layers CSR on {details['csr_devices']}, max |diff| "
                          f"{details['max_abs_diff_batch64']:.2e}; b64 csr {details['csr_ms_b64']:.3f} ms vs dense "
                          f"{details['dense_ms_b64']:.3f} ms")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


# --------------------------------------------------------------------------- (e) ONNX Runtime CUDA provider

_ORT_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def bind_torch_io(sess: Any, x: torch.Tensor, out: torch.Tensor | None) -> Any:
    """An ``io_binding`` of ``sess``'s first input to ``x`` and first output to ``out`` (both torch
    tensors, on the device they live on; ``out=None``: ONNX Runtime allocates it on ``x``'s device)."""
    device_type = x.device.type
    device_id = x.device.index or 0
    binding = sess.io_binding()
    binding.bind_input(name=sess.get_inputs()[0].name, device_type=device_type, device_id=device_id,
                       element_type=_ORT_DTYPES[x.dtype], shape=tuple(x.shape), buffer_ptr=x.data_ptr())
    name = sess.get_outputs()[0].name
    if out is None:
        binding.bind_output(name, device_type, device_id)
    else:
        binding.bind_output(name=name, device_type=device_type, device_id=device_id,
                            element_type=_ORT_DTYPES[out.dtype], shape=tuple(out.shape), buffer_ptr=out.data_ptr())
    return binding


def node_providers(profile_path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """From an ONNX Runtime profile (``enable_profiling``): op type -> provider -> node runs."""
    events = json.loads(Path(profile_path).read_text())
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and str(e.get("name", "")).endswith("_kernel_time"):
            out[args.get("op_name", "?")][args["provider"]] += 1
    return {op: dict(c) for op, c in sorted(out.items())}


def _ort_session(path: str, providers: list[str], profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=providers)


def export_pruned_mlp(path: str, *, sizes: tuple[int, ...] = (1024, 2048, 2048, 1000), sparsity: float = 0.9) -> nn.Module:
    """A pruned MLP, exported with ``export_onnx`` to ``path``; returns the folded CPU reference."""
    import lobster_fx

    gm = lobster_fx.instrument(_mlp(sizes, seed=0))
    random_masks_(gm, sparsity, seed=6, matrices_only=True)
    lobster_fx.export_onnx(gm, torch.randn(2, sizes[0]), path)
    return lobster_fx.fold(gm).eval()


def check_ort_cuda(device: str = "cuda", *, batch: int = 64, repeats: int = 200, cpu_repeats: int = 50,
                   sizes: tuple[int, ...] = (1024, 2048, 2048, 1000)) -> dict[str, Any]:
    """(e) ONNX Runtime's CUDA provider in use on an exported pruned model, timed with I/O on the GPU."""
    import onnxruntime as ort

    details: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
                               "batch": batch, "sizes": list(sizes)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp.onnx")
        reference = export_pruned_mlp(path, sizes=sizes)
        details["file_bytes"] = os.path.getsize(path)
        sess = _ort_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        details["session_providers"] = sess.get_providers()
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            raise CheckFailed(f"ONNX Runtime did not take the CUDA provider: session providers {sess.get_providers()}, "
                              f"available {ort.get_available_providers()} (onnxruntime-gpu installed? its CUDA "
                              "libraries found?)", details)
        dev = torch.device(device)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(batch, sizes[0], generator=g).to(dev).contiguous()
        expected = reference(x.cpu()).detach()
        # ONNX Runtime allocates the output on the device (bind_output(name, "cuda"))
        torch.cuda.synchronize()
        b0 = bind_torch_io(sess, x, None)
        sess.run_with_iobinding(b0)
        ort_out = b0.get_outputs()[0]
        details["ort_allocated_output_device"] = ort_out.device_name().lower()
        got = torch.from_numpy(b0.copy_outputs_to_cpu()[0])
        # timing: input and output both torch CUDA tensors bound by pointer, no host copies
        y = torch.empty(batch, sizes[-1], device=dev)
        binding = bind_torch_io(sess, x, y)
        details["cuda_ms"] = median_ms(lambda: sess.run_with_iobinding(binding), repeats=repeats, warmup=20,
                                       device=device)
        scale = float(expected.abs().max())
        details["max_abs_diff_allocated"] = float((got - expected).abs().max())
        details["max_abs_diff_bound"] = float((y.cpu() - expected).abs().max())
        # where the nodes ran: a profiled session, a few runs
        prof = _ort_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], os.path.join(d, "prof"))
        pb = bind_torch_io(prof, x, y)
        for _ in range(3):
            prof.run_with_iobinding(pb)
        details["node_providers"] = node_providers(prof.end_profiling())
        cpu = _ort_session(path, ["CPUExecutionProvider"])
        feed = {cpu.get_inputs()[0].name: x.cpu().numpy()}
        details["cpu_ms"] = median_ms(lambda: cpu.run(None, feed), repeats=cpu_repeats, warmup=3)
    details["cpu_over_cuda"] = details["cpu_ms"] / details["cuda_ms"]
    problems = []
    compute = {op: p for op, p in details["node_providers"].items() if op in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")}
    off_gpu = {op: p for op, p in details["node_providers"].items()
               if set(p) - {"CUDAExecutionProvider"} and not op.startswith("Memcpy")}
    details["nodes_not_on_cuda"] = off_gpu
    details["memcpy_nodes"] = {op: p for op, p in details["node_providers"].items() if op.startswith("Memcpy")}
    if not compute or any(set(p) != {"CUDAExecutionProvider"} for p in compute.values()):
        problems.append(f"MatMul/Gemm nodes not (all) on CUDA: {compute or details['node_providers']}")
    if details["ort_allocated_output_device"] != "cuda":
        problems.append(f"ONNX Runtime's output lives on {details['ort_allocated_output_device']}, not cuda")
    # loose: the CUDA provider computes float32 MatMul/Gemm in TF32 by default (use_tf32); export_onnx
    # already checked parity with the CPU provider
    for k in ("max_abs_diff_allocated", "max_abs_diff_bound"):
        if not details[k] <= 1e-4 + 1e-2 * scale:
            problems.append(f"{k} {details[k]:.3g} (output scale {scale:.3g})")
    details["summary"] = (f"providers {details['session_providers'][0]}, b{batch}: CUDA {details['cuda_ms']:.3f} ms "
                          f"(io_binding) vs CPU {details['cpu_ms']:.3f} ms = {details['cpu_over_cuda']:.1f}x, "
                          f"nodes off CUDA: {off_gpu or 'none'}")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


# --------------------------------------------------------------------------- (f) ResNet-18 step overhead


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def time_sides_interleaved(sides: dict[str, tuple[nn.Module, torch.optim.Optimizer]], x: torch.Tensor,
                           y: torch.Tensor, *, rounds: int, steps: int, device: str) -> dict[str, list[float]]:
    """Per side, one ms-per-step sample per round; sides in order A B C .. then reversed, alternately."""
    names = list(sides)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            model, opt = sides[n]
            _sync(device)
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                _train_step(model, opt, x, y)
            _sync(device)
            samples[n].append((time.perf_counter_ns() - t0) / steps / 1e6)
    return samples


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


def check_step_overhead(device: str = "cuda", *, builder: Callable[[], nn.Module] = _resnet18,
                        input_shape: tuple[int, ...] = (3, 224, 224), classes: int = 1000, batch: int = 32,
                        rounds: int = 10, steps: int = 10, warmup: int = 3, lmbda: float = 1e-4) -> dict[str, Any]:
    """(f) training step: plain vs instrumented (masks only) vs + Lobster (default path, and eager)."""
    import lobster_fx
    from lobster_fx.graph.instrument import masked_parameters
    from lobster_fx.methods.base import FUSE_MIN_NUMEL

    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    plain = builder().to(device).train()
    sides: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    rules = {}

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    sides["plain"] = (plain, sgd(plain))
    masked = lobster_fx.instrument(copy.deepcopy(plain))
    sides["masks only"] = (masked, sgd(masked))
    for name, fused in (("lobster", None), ("lobster eager", False)):
        gm = lobster_fx.instrument(copy.deepcopy(plain))
        opt = sgd(gm)
        rules[name] = lobster_fx.Lobster(gm, opt, lmbda=lmbda, fused=fused)
        sides[name] = (gm, opt)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(batch, *input_shape, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    details: dict[str, Any] = {"device": str(device), "batch": batch, "input": list(input_shape), "rounds": rounds,
                               "steps_per_round": steps, "warmup": warmup,
                               "prunable_params": sum(p.numel() for _, p, _ in masked_parameters(sides["lobster"][0]))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        for model, opt in sides.values():
            for _ in range(warmup):
                _train_step(model, opt, x, y)
        _sync(device)
        details["warmup_s"] = time.perf_counter() - t0
        samples = time_sides_interleaved(sides, x, y, rounds=rounds, steps=steps, device=device)
    details["default_rule_fused"] = bool(rules["lobster"].fused)
    if warns := _warning_lines(caught):
        details["warnings"] = warns
    med = {n: statistics.median(s) for n, s in samples.items()}
    details["median_ms"] = med
    details["ratio_vs_plain"] = {n: med[n] / med["plain"] for n in med}
    details["samples_ms"] = samples
    details["summary"] = ", ".join(f"{n} {med[n]:.2f} ms ({details['ratio_vs_plain'][n]:.3f}x)" for n in med) + \
        f"; default rule fused={details['default_rule_fused']}"
    expect_fused = details["prunable_params"] >= FUSE_MIN_NUMEL
    if expect_fused and not details["default_rule_fused"]:
        raise CheckFailed("the default (fused) rule fell back to eager: " + "; ".join(details.get("warnings", [])),
                          details)
    return details


# --------------------------------------------------------------------------- runner

#: name -> (title, function, time limit of its child process in seconds)
CHECKS: dict[str, tuple[str, Callable[..., dict[str, Any]], float]] = {
    "fused_rule": ("(a) fused rule on CUDA == eager == eq. (6)", check_fused_rule, 120),
    "half_precision": ("(b) bf16 / fp16: the LOBSTER term takes effect", check_half_precision, 120),
    "nccl_prune": ("(c) prune + PlateauPruner in a world_size=1 NCCL group", check_distributed, 60),
    "csr": ("(d) torch CSR on CUDA vs dense", check_csr, 60),
    "ort_cuda": ("(e) ONNX Runtime CUDAExecutionProvider, io_binding timing", check_ort_cuda, 120),
    "resnet18_overhead": ("(f) ResNet-18 training step overhead on CUDA", check_step_overhead, 180),
}


def _kwargs_for(name: str, device: str) -> dict[str, Any]:
    if torch.device(device).type == "cuda":
        return {}
    # --device cpu: the checks' logic, small and quick (no NCCL, no CUDA provider on a CPU machine)
    return {
        "half_precision": {"dtypes": (torch.bfloat16,), "steps": 50, "lmbda": 1e-3},
        "nccl_prune": {"backend": "gloo"},
        "csr": {"repeats": 3},
        "ort_cuda": {"repeats": 3, "cpu_repeats": 3, "sizes": (64, 32, 10)},
        "resnet18_overhead": {"builder": lambda: _mlp((64, 32, 10), seed=0), "input_shape": (64,), "classes": 10,
                              "batch": 8, "rounds": 2, "steps": 1, "warmup": 1},
    }.get(name, {})


def run_check(name: str, fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """Run one check in this process: a record with ok, seconds, details, error."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"name": name, "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        rec["details"] = fn(**kwargs)
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - recorded, the other checks still run
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec["traceback"] = traceback.format_exc()[-4000:]
        rec["details"] = getattr(e, "details", {}) or {}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def run_check_in_child(name: str, device: str, timeout: float) -> dict[str, Any]:
    """Run check ``name`` in a fresh process (a CUDA error or a hang cannot reach the others)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device,
               "--child-out", str(out)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            tail = (proc.stdout + proc.stderr)[-3000:]
            if out.exists():
                rec = json.loads(out.read_text())
            else:
                rec = {"name": name, "ok": False, "details": {},
                       "error": f"the check's process exited with {proc.returncode} and no record"}
        except subprocess.TimeoutExpired as e:
            tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
            tail += ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
            tail = tail[-3000:]
            rec = {"name": name, "ok": False, "details": {}, "error": f"timed out after {timeout:.0f} s"}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if not rec["ok"]:
        rec["output_tail"] = tail
    return rec


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "platform": platform.platform(), "device": device, "cuda": torch.version.cuda}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cudnn"] = torch.backends.cudnn.version()
    for mod in ("onnxruntime", "triton", "torchvision"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"not importable ({type(e).__name__})"
    return env


def format_markdown(data: dict[str, Any]) -> str:
    """The readable table of a results dict (``checks``: name -> record)."""
    env = data.get("environment", {})
    lines = ["# GPU checks (`benchmarks/gpu_check.py`)", "",
             f"Machine: {env.get('gpu', env.get('device', '?'))}; torch {env.get('torch', '?')} (CUDA "
             f"{env.get('cuda', '?')}), onnxruntime {env.get('onnxruntime', '?')}, triton {env.get('triton', '?')}. "
             f"Run {data.get('when', '?')}, {data.get('seconds', 0):.0f} s."
             + ("" if str(env.get("device", "cuda")).startswith("cuda") else
                " **A dry run on CPU** (`--device cpu`): the checks' logic, not the CUDA paths."), "",
             "| check | result | seconds | what was measured |", "|---|---|---:|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for name, rec in data.get("checks", {}).items():
        title = CHECKS[name][0] if name in CHECKS else name
        what = cell(str(rec.get("details", {}).get("summary", "")))
        if not rec.get("ok"):
            error = (str(rec.get("error", "")).splitlines() or [""])[0][:400]
            what = (what + "; " if what else "") + "**" + cell(error) + "**"
        lines.append(f"| {title} | {'ok' if rec.get('ok') else 'FAILED'} | {rec.get('seconds', 0):.1f} | {what} |")
    lines.append("")
    for name, rec in data.get("checks", {}).items():
        lines += [f"## {name}", "", "```json", json.dumps(rec.get("details", {}), indent=1, default=str)[:6000], "```", ""]
        if not rec.get("ok") and rec.get("traceback"):
            lines += ["```", rec["traceback"].strip()[-2000:], "```", ""]
    return "\n".join(lines)


def write_results(data: dict[str, Any], out_dir: Path, *, merge: bool = False) -> dict[str, Any]:
    """Write ``gpu_check.json`` and ``gpu_check.md`` in ``out_dir``; with ``merge`` the checks of an
    earlier run in the same files that this run did not repeat are kept. Returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    if merge and path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        checks = {**old.get("checks", {}), **data["checks"]}
        data = {**data, "checks": {n: checks[n] for n in [*CHECKS, *checks] if n in checks}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    (out_dir / "gpu_check.md").write_text(format_markdown(data))
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu: a dry run of the logic (needs --out-dir)")
    ap.add_argument("--out-dir", type=Path, default=None, help=f"default {RESULTS} (cuda only)")
    ap.add_argument("--no-isolate", action="store_true", help="run the checks in this process (no per-check time limit)")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="stop starting checks after this many seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        rec = run_check(args.child, CHECKS[args.child][1], device=args.device, **_kwargs_for(args.child, args.device))
        args.child_out.write_text(json.dumps(rec, default=str))
        return 0

    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA here (torch.cuda.is_available() is False): these checks cannot run "
                  "on this machine; nothing written")
            return 0
        out_dir = args.out_dir or RESULTS
    else:
        if args.out_dir is None:
            ap.error("--device cpu is a dry run of the checks' logic: give --out-dir (results/ keeps real GPU runs)")
        out_dir = args.out_dir

    start = time.perf_counter()
    data: dict[str, Any] = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "environment": environment(args.device), "checks": {}}
    print(f"gpu_check on {data['environment'].get('gpu', args.device)}: {', '.join(names)}", flush=True)
    for name in names:
        title, fn, limit = CHECKS[name]
        left = args.budget_s - (time.perf_counter() - start)
        if left < 15:
            rec = {"name": name, "ok": False, "details": {}, "seconds": 0.0,
                   "error": f"not run: the time budget ({args.budget_s:.0f} s) is spent"}
        elif args.no_isolate:
            rec = run_check(name, fn, device=args.device, **_kwargs_for(name, args.device))
        else:
            rec = run_check_in_child(name, args.device, min(limit, left))
        data["checks"][name] = rec
        status = "ok    " if rec["ok"] else "FAILED"
        print(f"[{status}] {title} ({rec['seconds']:.1f} s): {rec.get('details', {}).get('summary', '')}", flush=True)
        if not rec["ok"]:
            print(f"         {str(rec.get('error', '')).splitlines()[0][:500] if rec.get('error') else ''}", flush=True)
        data["seconds"] = round(time.perf_counter() - start, 1)
        write_results(data, out_dir, merge=len(names) < len(CHECKS))  # after each check: a cut run keeps what ran
    failed = [n for n, r in data["checks"].items() if not r["ok"]]
    print(f"gpu_check: {len(names) - len(failed)}/{len(names)} ok in {data['seconds']:.0f} s"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}; wrote {out_dir / 'gpu_check.json'} and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
