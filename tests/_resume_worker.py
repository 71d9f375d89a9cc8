"""Training script for tests/test_resume.py, run in fresh processes.

    python _resume_worker.py OUT --epochs E                       # uninterrupted
    python _resume_worker.py OUT --epochs K --save CKPT           # stop after K, checkpoint
    python _resume_worker.py OUT --epochs E --resume CKPT [--control pruner ...]

LeNet300 on seeded synthetic data (512 x 784, 10 classes from a random linear
teacher), SGD(momentum=0.9, lr=0.05), Lobster(lmbda=1e-3), PlateauPruner(pwe=1,
twt=0.05) stepped once per epoch with the validation loss, shuffling with a
seeded torch.Generator. OUT receives the final gm.state_dict() (parameters and
masks), the masks and the epochs at which the pruner pruned. ``--control PART`` then
also resumes (in the same process, after the real resume) without loading PART
of the checkpoint, into ``OUT.no_PART.pt`` (negative controls).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lobster_fx
from lobster_fx.data import TensorData, batches
from lobster_fx.models import LeNet300
from lobster_fx.train import atomic_save

N_TRAIN, N_VAL, FEATURES, CLASSES, BATCH = 512, 256, 784, 10, 64
SEPARATION = 0.08  # learnable within a few epochs, with several plateaus in 12
LR, MOMENTUM, LMBDA, TWT, PWE = 0.05, 0.9, 1e-3, 0.05, 1
SKIPPABLE = ("model", "optimizer", "rule", "pruner", "generator")


def make_data() -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(1234)
    means = torch.randn(CLASSES, FEATURES, generator=g) * SEPARATION
    y = torch.randint(0, CLASSES, (N_TRAIN + N_VAL,), generator=g)
    x = means[y] + torch.randn(N_TRAIN + N_VAL, FEATURES, generator=g)  # Gaussian class clusters
    return TensorData(x[:N_TRAIN], y[:N_TRAIN]), TensorData(x[N_TRAIN:], y[N_TRAIN:])


def build(init_seed: int):
    torch.manual_seed(init_seed)
    train, val = make_data()
    gm = lobster_fx.instrument(LeNet300())
    opt = torch.optim.SGD(gm.parameters(), lr=LR, momentum=MOMENTUM)
    rule = lobster_fx.Lobster(gm, opt, lmbda=LMBDA)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        loss = float(nn.functional.cross_entropy(model(val.x), val.y))
        model.train(was_training)
        return loss

    pruner = lobster_fx.PlateauPruner(gm, evaluate, twt=TWT, pwe=PWE, rollback=True)
    gen = torch.Generator().manual_seed(99)
    return train, gm, opt, rule, pruner, gen, evaluate


def run(out: str, epochs: int, save: str | None, resume: str | None, skip: set[str]) -> None:
    """One training run from scratch (rebuilds data, model, optimizer, rule, pruner, generator)."""
    assert skip <= set(SKIPPABLE), skip
    # a resumed run starts from a different init: everything must come from the checkpoint
    train, gm, opt, rule, pruner, gen, evaluate = build(init_seed=0 if resume is None else 777)
    start = 0
    if resume:
        ckpt = torch.load(resume, weights_only=True)  # tensors and plain data: no code runs
        if "model" not in skip:
            gm.load_state_dict(ckpt["model"])
        if "optimizer" not in skip:
            opt.load_state_dict(ckpt["optimizer"])
        if "rule" not in skip:
            rule.load_state_dict(ckpt["rule"])
        if "pruner" not in skip:
            pruner.load_state_dict(ckpt["pruner"])
        if "generator" not in skip:
            gen.set_state(ckpt["generator"])
        start = ckpt["epoch"]

    prune_epochs = []
    for epoch in range(start, epochs):
        gm.train()
        for x, y in batches(train, BATCH, shuffle=True, generator=gen):
            opt.zero_grad()
            nn.functional.cross_entropy(gm(x), y).backward()
            opt.step()
        if pruner.step(evaluate(gm)) is not None:
            prune_epochs.append(epoch)

    if save:  # written as lobster-fx train writes its checkpoints: atomically, through a temporary file
        atomic_save(
            {
                "model": gm.state_dict(),
                "optimizer": opt.state_dict(),
                "rule": rule.state_dict(),
                "pruner": pruner.state_dict(),
                "generator": gen.get_state(),
                "epoch": epochs,
            },
            save,
        )
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
            "masks": {k: v.clone() for k, v in lobster_fx.masks(gm).items()},
            "prune_epochs": prune_epochs,
            "pruner_history": pruner.history,
            "rule_steps": rule.steps,
        },
        out,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--save", help="checkpoint file written after the last epoch")
    ap.add_argument("--resume", help="checkpoint file to continue from")
    ap.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="PART",
        help=f"after the real resume, also resume without PART (one of {SKIPPABLE}) into OUT.no_PART.pt",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # same reduction order in every process
    run(args.out, args.epochs, args.save, args.resume, set())
    for part in args.control:  # negative controls, after the real resume so they cannot affect it
        assert args.resume, "--control needs --resume"
        run(f"{args.out}.no_{part}.pt", args.epochs, None, args.resume, {part})


if __name__ == "__main__":
    main()
