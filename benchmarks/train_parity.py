"""Before any pruning the instrumented model must train exactly like the original.

For every model of the coverage sweep (``benchmarks/coverage.py``'s specs) up to
``--max-params``: one train-mode forward + backward of the original model and of
``lobster_fx.instrument(model)`` (all-ones masks) from the same seed, then the loss and
every prunable parameter's gradient are compared bit for bit. Where they differ, the
original is run twice more to tell a difference of ours from the original's own
nondeterminism (e.g. scatter-add accumulation order across threads).

    python benchmarks/train_parity.py          # writes results/train_parity.json and .md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import coverage as cov  # noqa: E402  (benchmarks/coverage.py)

import lobster_fx  # noqa: E402
from lobster_fx.graph.instrument import masked_parameters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _loss_and_grads(model, spec, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    loss_fn = spec.train_loss or cov._square_loss
    torch.manual_seed(1)
    loss = loss_fn(model, inputs)
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check(spec) -> dict:
    torch.manual_seed(0)
    model = spec.build()
    inputs = spec.inputs()
    plain = copy.deepcopy(model).train()
    gm = lobster_fx.instrument(copy.deepcopy(model)).train()
    loss_p, grads_p = _loss_and_grads(plain, spec, inputs)
    loss_g, _ = _loss_and_grads(gm, spec, inputs)
    # compare by the original parameter name (the parametrization route renames them in gm)
    grads_g = {info.name: p.grad for info, p, _ in masked_parameters(gm) if p.grad is not None}
    differ = [n for n, g in grads_g.items() if n in grads_p and not torch.equal(g, grads_p[n])]
    missing = [n for n in grads_p if n in dict(model.named_parameters()) and n not in grads_g
               and n in {info.name for info in gm.meta["lobster"].params.values()}]
    # everything else by the original's key names (gm.state_dict speaks them): the gradient of
    # every other parameter, and every buffer after the train-mode step (running statistics,
    # num_batches_tracked: norm layers traced into once lost their updates)
    sd_p, sd_g = plain.state_dict(keep_vars=True), gm.state_dict(keep_vars=True)
    state_differ = []
    for k, v in sd_p.items():
        w = sd_g.get(k)
        if w is None:
            state_differ.append(f"{k} (missing)")
        elif isinstance(v, torch.nn.Parameter):
            if (v.grad is None) != (w.grad is None) or (v.grad is not None and not torch.equal(v.grad, w.grad)):
                state_differ.append(f"{k}.grad")
        elif isinstance(v, torch.Tensor) and not torch.equal(v, w):
            state_differ.append(k)
    same_loss = loss_p == loss_g or (math.isnan(loss_p) and math.isnan(loss_g))
    rec = {"identical": same_loss and not differ and not missing and not state_differ, "loss": [loss_p, loss_g],
           "grads_compared": len(grads_g), "grads_differ": differ[:5], "grads_missing": missing[:5],
           "state_compared": len(sd_p), "state_differ": state_differ[:5]}
    if not rec["identical"]:
        again = copy.deepcopy(model).train()
        loss_a, grads_a = _loss_and_grads(again, spec, inputs)
        sd_a = again.state_dict(keep_vars=True)
        rec["original_vs_itself_identical"] = loss_a == loss_p and all(
            torch.equal(grads_a[n], grads_p[n]) for n in grads_p) and all(
            torch.equal(sd_a[k], v) for k, v in sd_p.items() if not isinstance(v, torch.nn.Parameter)
            and isinstance(v, torch.Tensor))
        rec["max_grad_diff"] = max((float((grads_g[n] - grads_p[n]).abs().max()) for n in differ), default=0.0)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-params", type=float, default=1e8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="", help="comma-separated names (a check run: results are not written)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [s for s in cov.all_specs() if not s.skip and (s.approx_params or 0) < args.max_params]
    if args.models:
        specs = [s for s in specs if s.name in args.models.split(",")]
    results: dict[str, dict] = {}
    for spec in specs:
        t0 = time.perf_counter()
        try:
            rec = check(spec)
        except Exception as e:  # noqa: BLE001 - recorded per model
            rec = {"identical": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        rec["family"], rec["seconds"] = spec.family, round(time.perf_counter() - t0, 1)
        results[spec.name] = rec
        print(spec.name, json.dumps(rec)[:300], flush=True)
    if args.models:
        return 0 if all(r["identical"] for r in results.values()) else 1
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "max_params": args.max_params,
            "measured": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "train_parity.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1))
    same = [n for n, r in results.items() if r["identical"]]
    theirs = [n for n, r in results.items() if not r["identical"] and r.get("original_vs_itself_identical") is False]
    ours = [n for n in results if n not in same and n not in theirs]
    lines = [
        "# Training parity before pruning", "",
        f"Every coverage-sweep model under {args.max_params:.0e} parameters ({len(results)} models; torch "
        f"{meta['torch']}, {args.threads} threads, {meta['measured']}): one train-mode forward + backward of "
        "the original and of `instrument(model)` from the same seed; loss, every parameter's gradient and "
        "every buffer after the step (by the original's key names) compared bit for bit.", "",
        f"- identical: **{len(same)}/{len(results)}**",
        f"- differ, but the original differs from itself run again (its own nondeterminism): {len(theirs)}"
        + (f" ({', '.join(theirs)})" if theirs else ""),
        f"- differ or fail because of us: **{len(ours)}**" + (f" ({', '.join(ours)})" if ours else ""),
    ]
    for n in theirs + ours:
        r = results[n]
        lines.append(f"  - {n}: " + (r.get("error") or f"gradients differ on {r['grads_differ']} "
                                      f"(max {r.get('max_grad_diff', 0):.1e}), missing {r['grads_missing']}, "
                                      f"state differs on {r.get('state_differ', [])}"))
    (RESULTS / "train_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not ours else 1


if __name__ == "__main__":
    sys.exit(main())
