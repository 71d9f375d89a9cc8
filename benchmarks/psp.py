"""PSP-entropy of gradual vs one-shot pruning at the same sparsity (issue 17; the paper's claim).

Tartaglione et al. claim that gradually pruned networks reach minima whose features are less
class-specific (higher PSP-entropy) than one-shot pruned ones at the same sparsity. Here, per
model (LeNet-5 and LeNet-300 on MNIST, seed 0, SGD lr 0.1, batch 100, no momentum):

  dense      trained ``--dense-epochs`` epochs (10, as the authors)
  iterative  gradual: from the dense model, ``--steps`` global magnitude pruning steps (the kept
             share shrinks geometrically to the target), each followed by ``--ft-epochs / --steps``
             epochs of fine-tuning
  oneshot    from the same dense model, one global magnitude pruning step to the same number of
             nonzero weights, then ``--ft-epochs`` epochs of fine-tuning (the same epoch count)
  lobster    gradual, ours (LeNet-5: one setting; LeNet-300: two): ``lobster_fx.train`` (LOBSTER rule + plateau
             pruning) from scratch with a stronger lmbda and a shorter PWE than the paper, so that it
             prunes within minutes
  oneshot-lobster...  one-shot magnitude pruning of the dense model to that LOBSTER run's nonzero
             count, then fine-tuning for as many epochs as the LOBSTER run took

Pruning acts on weights (biases are kept); the nonzero count is matched exactly. Entropy is
measured with :func:`lobster_fx.analysis.psp_entropy` on the 10k MNIST test set (the authors' setting).

Usage (each run is saved when it finishes and skipped afterwards; one CPU thread):
  nice -n 10 python benchmarks/psp.py run [--only lenet5]
  python benchmarks/psp.py summarize      # psp.json, psp.md, psp-*.png under benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "ckpt" / "psp"  # git-ignored: weights and per-run records
DATA_ROOT = ROOT.parent / "shared" / "datasets"

MODELS = {  # name: model, target sparsity (share of weights pruned), LOBSTER runs {run: (lmbda, pwe, epochs)}
    "lenet5": ("lenet5", 0.95, {"lobster": (5e-4, 2, 16)}),
    "lenet300": ("lenet300", 0.95, {"lobster": (1e-3, 2, 16), "lobster-30ep": (5e-4, 2, 30)}),
}
SEED = 0
LR = 0.1
BATCH = 100


def _splits():
    from lobster_fx.data import load_dataset

    return load_dataset("mnist", DATA_ROOT, val_size=5000, seed=SEED)


def _weights(gm) -> dict[str, torch.Tensor]:
    """The masks of the prunable weights (dim > 1; biases are not pruned), by name."""
    import lobster_fx

    return {k: m for k, m in lobster_fx.masks(gm).items() if m.dim() > 1}


def _params(gm) -> dict[str, torch.Tensor]:
    return dict(gm.named_parameters())


def nonzero(gm) -> int:
    """Weights that are unmasked and nonzero."""
    p = _params(gm)
    return int(sum(int(((p[k] * m) != 0).sum()) for k, m in _weights(gm).items()))


def total_weights(gm) -> int:
    return int(sum(m.numel() for m in _weights(gm).values()))


@torch.no_grad()
def magnitude_prune(gm, keep: int) -> None:
    """Global magnitude pruning: keep exactly the ``keep`` largest ``|w * mask|`` weights."""
    masks = _weights(gm)
    p = _params(gm)
    scores = torch.cat([(p[k] * m).abs().flatten() for k, m in masks.items()])
    order = torch.argsort(scores, descending=True, stable=True)  # ties broken by position: exact count
    new = torch.zeros_like(scores)
    new[order[:keep]] = 1.0
    start = 0
    for m in masks.values():
        m.copy_(new[start:start + m.numel()].view_as(m))
        start += m.numel()


def train_epochs(gm, splits, epochs: int, gen: torch.Generator) -> None:
    from lobster_fx.data import batches

    opt = torch.optim.SGD(gm.parameters(), lr=LR)
    gm.train()
    for _ in range(epochs):
        for x, y in batches(splits.train, BATCH, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(gm(x), y).backward()
            opt.step()
    gm.eval()


def _new_model(name: str, splits):
    import lobster_fx
    from lobster_fx.models import get_model

    torch.manual_seed(SEED)
    return lobster_fx.instrument(get_model(MODELS[name][0]))


def _record(path: Path, obj: dict) -> None:
    from lobster_fx.checkpoint import atomic_write_text

    atomic_write_text(json.dumps(obj, indent=1), path)


def _done(model: str, run: str) -> bool:
    return (WORK / f"{model}-{run}.json").exists() and (WORK / f"{model}-{run}.pt").exists()


@torch.no_grad()
def test_error(gm, splits) -> float:
    """Top-1 test error (%), eval mode."""
    gm.eval()
    wrong = sum(int((gm(x).argmax(1) != y).sum()) for x, y in zip(splits.test.x.split(2000), splits.test.y.split(2000)))
    return 100.0 * wrong / len(splits.test.y)


def _finish(model: str, run: str, gm, splits, t0: float, extra: dict) -> None:
    from lobster_fx.checkpoint import atomic_save

    atomic_save(gm.state_dict(), WORK / f"{model}-{run}.pt")
    err = test_error(gm, splits)
    rec = {"model": model, "run": run, "test_error": err, "nonzero_weights": nonzero(gm),
           "weights": total_weights(gm), "seconds": time.time() - t0, **extra}
    _record(WORK / f"{model}-{run}.json", rec)
    print(f"{model}-{run}: test error {err:.2f}%, {rec['nonzero_weights']}/{rec['weights']} weights, "
          f"{rec['seconds']:.0f} s", flush=True)


def _load(model: str, run: str, splits):
    gm = _new_model(model, splits)
    gm.load_state_dict(torch.load(WORK / f"{model}-{run}.pt", weights_only=True))
    return gm.eval()


def run_model(model: str, args) -> None:
    _, sparsity, lobster_runs = MODELS[model]
    splits = _splits()
    if not _done(model, "dense"):
        t0 = time.time()
        gm = _new_model(model, splits)
        train_epochs(gm, splits, args.dense_epochs, torch.Generator().manual_seed(SEED))
        _finish(model, "dense", gm, splits, t0, {"epochs": args.dense_epochs})
    total = total_weights(_load(model, "dense", splits))
    keep = round((1 - sparsity) * total)
    if not _done(model, "iterative"):
        t0 = time.time()
        gm = _load(model, "dense", splits)
        gen = torch.Generator().manual_seed(SEED + 1)
        per = args.ft_epochs // args.steps
        for i in range(1, args.steps + 1):
            k = keep if i == args.steps else round(total * (keep / total) ** (i / args.steps))
            magnitude_prune(gm, k)
            train_epochs(gm, splits, per, gen)
        _finish(model, "iterative", gm, splits, t0, {"steps": args.steps, "epochs": per * args.steps})
    if not _done(model, "oneshot"):
        t0 = time.time()
        gm = _load(model, "dense", splits)
        magnitude_prune(gm, keep)
        train_epochs(gm, splits, args.steps * (args.ft_epochs // args.steps), torch.Generator().manual_seed(SEED + 1))
        _finish(model, "oneshot", gm, splits, t0, {"epochs": args.steps * (args.ft_epochs // args.steps)})
    if args.no_lobster:
        return
    for run, (lmbda, pwe, lob_epochs) in lobster_runs.items():
        if not _done(model, run):
            from lobster_fx.train import TrainConfig, train

            t0 = time.time()
            cfg = TrainConfig(model=MODELS[model][0], dataset="mnist", data_root=str(DATA_ROOT), epochs=lob_epochs,
                              lmbda=lmbda, pwe=pwe, seed=SEED, threads=1, progress=False, val_size=5000)
            gm = train(cfg).gm.eval()
            _finish(model, run, gm, splits, t0, {"epochs": lob_epochs, "lmbda": lmbda, "pwe": pwe,
                                                 "twt": cfg.twt, "from": "scratch (lobster_fx.train)"})
        if not _done(model, f"oneshot-{run}"):
            t0 = time.time()
            lob = json.loads((WORK / f"{model}-{run}.json").read_text())
            gm = _load(model, "dense", splits)
            magnitude_prune(gm, lob["nonzero_weights"])
            train_epochs(gm, splits, lob["epochs"], torch.Generator().manual_seed(SEED + 1))
            _finish(model, f"oneshot-{run}", gm, splits, t0, {"epochs": lob["epochs"]})

def _runs(model: str) -> list[str]:
    return ["dense", "iterative", "oneshot"] + [r for lob in MODELS[model][2] for r in (lob, f"oneshot-{lob}")]


def _pairs(model: str) -> list[tuple[str, str]]:
    """(gradual, one-shot) runs at the same nonzero count."""
    return [("iterative", "oneshot")] + [(lob, f"oneshot-{lob}") for lob in MODELS[model][2]]


SAME = 0.01  #: bits: mean differences below this are reported as "about equal"


def _stats(h: torch.Tensor, dead: torch.Tensor) -> dict:
    h, dead = h.flatten().double(), dead.flatten()
    q = torch.quantile(h, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    live = h[~dead]
    return {"mean": float(h.mean()), "q1": float(q[0]), "median": float(q[1]), "q3": float(q[2]),
            "units": int(h.numel()), "mean_live": float(live.mean()) if live.numel() else float("nan")}


def summarize(args) -> None:
    from lobster_fx.analysis import psp_entropy
    from lobster_fx.analysis.plots import plot_histograms_side_by_side

    splits = _splits()
    out: dict = {"settings": {"seed": SEED, "lr": LR, "batch": BATCH, "dense_epochs": args.dense_epochs,
                              "steps": args.steps, "ft_epochs": args.ft_epochs,
                              "entropy_data": "MNIST test set (10,000 images)",
                              "models": {k: {"target_sparsity": v[1], "lobster_runs": {
                                  r: {"lmbda": a, "pwe": b, "epochs": c} for r, (a, b, c) in v[2].items()}}
                                  for k, v in MODELS.items()}},
           "runs": {}, "comparisons": []}
    for model in MODELS:
        for run in _runs(model):
            if not _done(model, run):
                continue
            rec = json.loads((WORK / f"{model}-{run}.json").read_text())
            gm = _load(model, run, splits)
            rep = psp_entropy(gm, splits.test.x, splits.test.y)
            p = _params(gm)
            rec["layer_nonzero"] = {k.rsplit(".", 1)[0]: [int(((p[k] * m) != 0).sum()), m.numel()]
                                    for k, m in _weights(gm).items()}
            rec["entropy"] = {k: _stats(v, rep.dead_on_data[k]) for k, v in rep.entropy.items()}
            rec["dead_on_data"] = {k: int(v.sum()) for k, v in rep.dead_on_data.items()}
            rec["_report"] = rep
            out["runs"][f"{model}-{run}"] = rec
        for grad, one in _pairs(model):
            a, b = out["runs"].get(f"{model}-{grad}"), out["runs"].get(f"{model}-{one}")
            if a is None or b is None:
                continue
            layers = {}
            for layer in a["entropy"]:
                ea, eb = a["entropy"][layer], b["entropy"][layer]
                diff = ea["mean"] - eb["mean"]
                layers[layer] = {"gradual_mean": ea["mean"], "oneshot_mean": eb["mean"], "diff_mean": diff,
                                 "gradual_median": ea["median"], "oneshot_median": eb["median"],
                                 "gradual_mean_live": ea["mean_live"], "oneshot_mean_live": eb["mean_live"],
                                 "verdict": "higher" if diff >= SAME else "lower" if diff <= -SAME else "about equal"}
            out["comparisons"].append({"model": model, "gradual": grad, "oneshot": one,
                                       "nonzero_weights": [a["nonzero_weights"], b["nonzero_weights"]],
                                       "test_error": [a["test_error"], b["test_error"]], "layers": layers})
            png = RESULTS / f"psp-{model}-{grad}-vs-{one}.png"
            shown = {grad: a["_report"], one: b["_report"]}
            if f"{model}-dense" in out["runs"]:
                shown["dense"] = out["runs"][f"{model}-dense"]["_report"]
            plot_histograms_side_by_side(shown, str(png),
                                         title=f"PSP-entropy, {model}/MNIST test, {a['nonzero_weights']} weights")
    for rec in out["runs"].values():
        del rec["_report"]
    from lobster_fx.checkpoint import atomic_write_text

    atomic_write_text(json.dumps(out, indent=1), RESULTS / "psp.json")
    atomic_write_text(_markdown(out), RESULTS / "psp.md")
    print((RESULTS / "psp.md").read_text())


def _markdown(out: dict) -> str:
    s = out["settings"]
    lines = ["## PSP-entropy: gradual vs one-shot pruning (issue 17)", "",
             f"`benchmarks/psp.py`. MNIST, seed {s['seed']}, SGD lr {s['lr']}, batch {s['batch']}, no momentum, "
             f"55k training images (5k held out as in the other benchmarks). Dense: {s['dense_epochs']} epochs. "
             f"*iterative*: {s['steps']} global magnitude pruning steps from the dense model (kept share shrinking "
             f"geometrically), {s['ft_epochs'] // s['steps']} epochs of fine-tuning after each. *oneshot*: the dense "
             f"model pruned once to the same nonzero weight count, then {s['ft_epochs']} epochs of fine-tuning. "
             "*lobster*: "
             "`lobster_fx.train` from scratch with lmbda and PWE far from the paper's (1e-4, 20) so "
             "that it prunes within minutes (values below), TWT 0.05, plateau pruning on the 5k validation split; "
             "*oneshot-lobster...*: the dense model pruned once to that LOBSTER run's nonzero count, fine-tuned as "
             "many epochs as the LOBSTER run took (so it has seen 10 more epochs in all: the dense training). Weights only are pruned "
             f"(biases kept). Entropy: `lobster_fx.psp_entropy` on the {s['entropy_data']}; H_j in bits, "
             "0 to 10 (10 classes).", "",
             "### Runs", "", "Wall seconds are on a shared, loaded 2-core machine at nice 10 (one thread): not speed figures.",
             "", "| run | epochs | nonzero weights | per layer | test error % | wall s |", "|---|---|---|---|---|---|"]
    for name, r in out["runs"].items():
        per_layer = ", ".join(f"{k} {100 * a / b:.1f}%" for k, (a, b) in r["layer_nonzero"].items())
        extra = f" (lmbda {r['lmbda']}, PWE {r['pwe']}, TWT {r['twt']})" if "lmbda" in r else ""
        lines.append(f"| {name}{extra} | {r.get('epochs', '-')} | {r['nonzero_weights']:,} / {r['weights']:,} "
                     f"({100 * r['nonzero_weights'] / r['weights']:.2f}%) | {per_layer} | {r['test_error']:.2f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "### Per-layer PSP-entropy (bits): mean, quartiles; units dead on the data, mean over the others",
              "", "| run | layer | units | mean | q1 | median | q3 | dead on data | mean of live units |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in out["runs"].items():
        for layer, e in r["entropy"].items():
            lines.append(f"| {name} | {layer} | {e['units']} | {e['mean']:.4f} | {e['q1']:.3f} | {e['median']:.3f} "
                         f"| {e['q3']:.3f} | {r['dead_on_data'][layer]} | {e['mean_live']:.4f} |")
    lines += ["", "### Does gradual pruning give higher entropy?", "",
              f"Per layer, the mean H_j of the gradual run minus the one-shot run's; within {SAME} bit is called "
              "about equal. One seed per run: run-to-run spread was not measured, so small differences may be noise.",
              ""]
    verdicts = [v["verdict"] for c in out["comparisons"] for v in c["layers"].values()]
    if verdicts:
        up, down = verdicts.count("higher"), verdicts.count("lower")
        answer = ("the paper's claim is reproduced here" if up == len(verdicts) else
                  "the paper's claim is partly reproduced here (more layers higher than lower)" if up > down else
                  "the paper's claim is not reproduced here")
        lines += [f"**In short: {answer}.** Over {len(out['comparisons'])} "
                  f"gradual / one-shot pairs and {len(verdicts)} layer comparisons, gradual pruning gave a higher "
                  f"mean PSP-entropy in {up}, a lower one in {down} and "
                  f"about the same in {verdicts.count('about equal')}. Caveats: one seed; short schedules "
                  f"({s['dense_epochs']} + {s['ft_epochs']} epochs, and LOBSTER runs from scratch, epochs and "
                  "sparsity in the runs table above, which may end less accurate than their one-shot counterparts, "
                  f"which also had the {s['dense_epochs']} dense epochs); 95% of the weights pruned in the magnitude "
                  "pairs (20x; the paper's LeNet-5 is at 230x); entropy measured at different test errors within a "
                  "pair.", ""]
    for c in out["comparisons"]:
        g, o = c["gradual"], c["oneshot"]
        by = {v: [k for k, x in c["layers"].items() if x["verdict"] == v] for v in ("higher", "lower", "about equal")}
        per = "; ".join(f"{k}: {v['gradual_mean']:.4f} vs {v['oneshot_mean']:.4f} ({v['diff_mean']:+.4f}; live units "
                        f"{v['gradual_mean_live']:.4f} vs {v['oneshot_mean_live']:.4f})" for k, v in c["layers"].items())
        n = len(c["layers"])
        verdict = ("yes, in every layer" if len(by["higher"]) == n else
                   "no: in no layer" if not by["higher"] else f"only in {len(by['higher'])} of {n} layers")
        detail = ", ".join(f"{v} in {', '.join(ks)}" for v, ks in by.items() if ks)
        lines.append(f"- **{c['model']}, {g} vs {o}** ({c['nonzero_weights'][0]:,} vs {c['nonzero_weights'][1]:,} "
                     f"nonzero weights; test error {c['test_error'][0]:.2f}% vs {c['test_error'][1]:.2f}%): "
                     f"higher entropy with gradual pruning? {verdict} ({detail}). Mean H_j per layer, {g} vs {o}: "
                     f"{per}. Histograms (with the dense model): `psp-{c['model']}-{g}-vs-{o}.png`.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "summarize"])
    parser.add_argument("--only", choices=list(MODELS), default=None)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--no-lobster", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        # everything imported now: a module edited mid-run (a shared checkout) cannot break a finished run
        import lobster_fx.checkpoint  # noqa: F401
        import lobster_fx.data  # noqa: F401
        import lobster_fx.train  # noqa: F401

        for model in [args.only] if args.only else list(MODELS):
            run_model(model, args)
    else:
        summarize(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
