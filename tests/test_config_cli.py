"""Every TrainConfig field is a `lobster-fx train` option, generated from the dataclass."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lobster_fx.cli import build_parser
from lobster_fx.config_cli import dataclass_kwargs, field_help
from lobster_fx.train import TrainConfig

#: a value other than the default for every field, as typed on the command line -> as TrainConfig holds it
NON_DEFAULT = {
    "model": (["--model", "torchvision:resnet18"], "torchvision:resnet18"),
    "dataset": (["--data", "imagefolder:photos"], "imagefolder:photos"),
    "data_root": (["--data-root", "/data"], "/data"),
    "model_kwargs": (["--model-kwargs", '{"num_classes": 3, "widths": [8, 16]}'], {"num_classes": 3, "widths": [8, 16]}),
    "data_kwargs": None,  # only with a package.module:function dataset: its own case below
    "image_size": (["--image-size", "24"], 24),
    "val_fraction": (["--val-fraction", "0.2"], 0.2),
    "test_fraction": (["--test-fraction", "0.3"], 0.3),
    "device": (["--device", "cuda:1"], "cuda:1"),
    "optimizer": (["--optimizer", "adamw"], "adamw"),
    "epochs": (["--epochs", "7"], 7),
    "batch_size": (["--batch-size", "32"], 32),
    "lr": (["--lr", "0.01"], 0.01),
    "momentum": ([], 0.0),  # adamw refuses momentum: its own case below
    "weight_decay": (["--weight-decay", "1e-4"], 1e-4),
    "lmbda": (["--lmbda", "5e-4"], 5e-4),
    "twt": (["--twt", "0.1"], 0.1),
    "pwe": (["--pwe", "3"], 3),
    "rollback": (["--no-rollback"], False),
    "plateau_threshold": (["--plateau-threshold", "0.01"], 0.01),
    "search_precision": (["--search-precision", "0.001"], 0.001),
    "lr_min_factor": (["--lr-min-factor", "0.5"], 0.5),
    "val_size": (["--val-size", "1000"], 1000),
    "seed": (["--seed", "4"], 4),
    "max_minutes": (["--max-minutes", "2.5"], 2.5),
    "out_dir": (["--out", "runs/a"], "runs/a"),
    "progress": (["--no-progress"], False),
    "checkpoint_every": (["--checkpoint-every", "5"], 5),
    "threads": (["--threads", "2"], 2),
    "eval_batch_size": (["--eval-batch-size", "100"], 100),
    "channels_last": (["--channels-last"], True),
    "fused_rule": (["--fused-rule", "on"], True),
    "method": (["--method", "serene"], "serene"),
    "sensitivity": (["--sensitivity", "loss"], "loss"),
    "unit_score": (["--unit-score", "norm"], "norm"),
}


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_every_field_has_an_option():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names == set(NON_DEFAULT), "a new TrainConfig field: add it here (its option exists already)"
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    assert names <= {action.dest for action in train_parser._actions}


def test_every_option_reaches_its_field():
    argv = [token for tokens, _ in filter(None, NON_DEFAULT.values()) for token in tokens]
    config = TrainConfig(**dataclass_kwargs(_parse(argv), TrainConfig))
    for name, case in NON_DEFAULT.items():
        if case is not None:
            assert getattr(config, name) == case[1], name
    defaults = TrainConfig(out_dir="x")
    assert all(getattr(config, n) != getattr(defaults, n) for n, c in NON_DEFAULT.items() if c and c[0]), \
        "each value above must differ from the default, or the test proves nothing"


def test_the_remaining_cases_and_the_old_spellings():
    args = _parse(["--dataset", "pkg.data:load", "--data-kwargs", '{"n": 5}', "--momentum", "0.9", "--out-dir", "o",
                   "--threads", "none", "--fused-rule", "OFF"])
    config = TrainConfig(**dataclass_kwargs(args, TrainConfig))
    assert (config.dataset, config.data_kwargs, config.momentum, config.out_dir) == ("pkg.data:load", {"n": 5}, 0.9, "o")
    assert config.threads is None and config.fused_rule is False
    assert TrainConfig(**dataclass_kwargs(_parse(["--out", "o"]), TrainConfig)) == TrainConfig(out_dir="o")


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
    (["--model-kwargs", "{1: 2}"], "argument --model-kwargs: not valid JSON"),
    (["--threads", "many"], "argument --threads: invalid int value: 'many'"),
])
def test_malformed_values_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        _parse(["--out", "o", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help_comes_from_the_field_comments():
    helps = field_help(TrainConfig)
    assert "LOBSTER strength" in helps["lmbda"] and "package.module:factory" in helps["model"]
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--model-kwargs JSON" in text and "--data DATASET, --dataset DATASET" in text
