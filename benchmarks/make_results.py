"""Assemble benchmarks/RESULTS.md from the per-benchmark markdown files in results/.

Each benchmark script writes its own ``results/<name>.md`` (and ``.json``); this
script only concatenates them under one heading each, with the command that made them.
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = [
    ("demo", "Main job: `lobster-fx demo`", "lobster-fx demo --out lobster-demo"),
    ("footprint", "Footprint: dense vs sparse file vs slim vs torch CSR (issue 3)", "python benchmarks/footprint.py"),
    ("reproduce", "Paper reproduction (issue 4)", "python benchmarks/reproduce.py run ...; python benchmarks/reproduce.py summarize"),
    ("train_cost", "Training cost: step layouts and the threshold search (issue 4)", "python benchmarks/train_cost.py"),
    ("compute_bound", "LeNet-5 step vs the CPU's arithmetic limit (issue 4)", "python benchmarks/compute_bound.py"),
    ("coverage", "Coverage sweep (issue 5)", "python benchmarks/coverage.py"),
    ("train_parity", "Training parity before pruning (issue 5)", "python benchmarks/train_parity.py"),
    ("overhead", "Training overhead (issue 5)", "python benchmarks/overhead.py"),
    ("native_rule_probe", "A native rule kernel on LeNet-300: probe (issue 5)", "python benchmarks/native_rule_probe.py"),
    ("compile_profile", "Masks under torch.compile: where the time goes (issue 5)", "python benchmarks/compile_profile.py"),
    ("ddp_masks", "DDP step cost with masks honoured on every rank (issue 12)", "python benchmarks/ddp_masks.py"),
    ("half_rule_cost", "Half-precision rule cost (issue 12)", "python benchmarks/half_rule_cost.py"),
    ("taps_overhead", "Idle unit taps (issue 14)", "python benchmarks/taps_overhead.py"),
    ("pass_tuning", "Figures moved from docstrings: slim channel alignment, CSR crossover, prune memory (issue 14)",
     "see the section"),
    ("methods", "SeReNe vs LOBSTER, L2, Torch-Pruning and dense, one budget (issue 15)",
     "python benchmarks/methods.py run ...; python benchmarks/methods.py summarize"),
    ("neq", "NEq: frozen units and real training-time savings (issue 16)", "python benchmarks/neq.py"),
    ("psp", "PSP-entropy: gradual vs one-shot pruning (issue 17)", "python benchmarks/psp.py"),
    ("gpu_check", "CUDA checks: fused rule, half precision, NCCL, CSR, ONNX Runtime CUDA, ResNet-18 step",
     "python benchmarks/gpu_check.py"),
]


def main() -> None:
    parts = ["# Benchmark results", "", "Machine: 2 CPU cores, no GPU (CUDA paths not run). "
             "Each section says how it was produced; timings are ratios taken side by side in one run.", ""]
    for name, title, command in SECTIONS:
        md = RESULTS / f"{name}.md"
        if not md.exists():
            continue
        body = md.read_text().strip()
        # each file may start with its own top heading: keep ours
        lines = [ln for ln in body.splitlines() if not (ln.startswith("# ") or ln.startswith("## ") and ln[3:].strip() == title)]
        # sub-headings of a section sit one level below its title
        lines = ["#" + ln if ln.startswith("## ") else ln for ln in lines]
        parts += [f"## {title}", "", f"Command: `{command}`", "", *lines, ""]
    (RESULTS.parent / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
