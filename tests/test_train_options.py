"""TrainConfig's newer options: optimizer, device, model_kwargs and the data options; resuming with
them; checkpoints written before them still load and export."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lobster_fx.cli import EXIT_ERROR, main
from lobster_fx.data import batches, load_digits
from lobster_fx.models import LeNet300
from lobster_fx.train import RESUMABLE_CHANGES, TrainConfig, config_from_dict, train
from lobster_fx.train_config import _check_resume

BASE = {"model": "lenet300", "dataset": "digits", "epochs": 1, "batch_size": 64, "pwe": 5, "threads": 1,
        "progress": False}


def _adamw_reference(lr: float, weight_decay: float) -> torch.nn.Module:
    """One epoch of LeNet-300 on digits with torch.optim.AdamW, written out without lobster_fx.train."""
    torch.manual_seed(0)
    splits = load_digits(seed=0)
    model = LeNet300(in_features=64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    for x, y in batches(splits.train, 64, shuffle=True, generator=gen):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_adamw_is_the_optimizer_with_decoupled_weight_decay():
    result = train(TrainConfig(**BASE, optimizer="adamw", lr=1e-3, weight_decay=0.05, lmbda=0.0))
    trained = dict(result.gm.named_parameters())
    reference = dict(_adamw_reference(1e-3, 0.05).named_parameters())
    assert set(reference) <= set(trained)
    for name, p in reference.items():
        torch.testing.assert_close(trained[name].detach(), p.detach(), atol=1e-6, rtol=1e-5, msg=name)
    without_decay = dict(_adamw_reference(1e-3, 0.0).named_parameters())
    assert not torch.allclose(trained["fc1.weight"], without_decay["fc1.weight"], atol=1e-6)  # the decay counts


def test_adamw_refuses_momentum():
    with pytest.raises(ValueError, match="TrainConfig.momentum applies to optimizer 'sgd'"):
        TrainConfig(optimizer="adamw", momentum=0.9)
    with pytest.raises(ValueError, match="TrainConfig.optimizer: unknown optimizer 'adam'; valid: sgd, adamw"):
        TrainConfig(optimizer="adam")


@pytest.mark.parametrize(("device", "error"), [("gpu", "must be cpu, cuda or cuda:N"), ("cpu:0", "cpu, cuda"),
                                               (0, "must be a str")])
def test_device_syntax(device, error):
    with pytest.raises((ValueError, TypeError), match=error):
        TrainConfig(device=device)
    assert TrainConfig(device="CUDA:1").device == "cuda:1"  # checked for presence only when training


def test_options_that_need_their_kind_of_data():
    with pytest.raises(ValueError, match="image_size applies to imagefolder:DIR data only"):
        TrainConfig(dataset="digits", image_size=32)
    with pytest.raises(ValueError, match="data_kwargs applies to package.module:function data only"):
        TrainConfig(dataset="digits", data_kwargs={"n": 3})
    with pytest.raises(TypeError, match="TrainConfig.model_kwargs must be a dict"):
        TrainConfig(model_kwargs="num_classes=3")
    with pytest.raises(TypeError, match="JSON data only"):
        TrainConfig(model_kwargs={"f": object()})


def test_which_new_options_a_resume_may_change():
    assert "device" in RESUMABLE_CHANGES
    assert not {"optimizer", "model_kwargs", "data_kwargs", "image_size", "val_fraction",
                "test_fraction"} & RESUMABLE_CHANGES
    saved = TrainConfig(**BASE).to_dict()
    _check_resume({**saved, "device": "cuda"}, TrainConfig(**BASE), "ckpt")  # allowed
    for name, value in [("optimizer", "adamw"), ("model_kwargs", {"num_classes": 10})]:
        with pytest.raises(ValueError, match=f"{name} "):
            _check_resume(saved, TrainConfig(**{**BASE, name: value}), "ckpt")
    folder = TrainConfig(dataset="imagefolder:photos").to_dict()
    here = TrainConfig(dataset="imagefolder:./photos/")
    _check_resume(folder, here, "ckpt")  # the same folder, written another way


def test_older_checkpoints_count_as_sgd_and_image_options_only_matter_for_image_folders():
    old = {k: v for k, v in TrainConfig(**BASE).to_dict().items() if k not in ("optimizer", "model_kwargs")}
    with pytest.raises(ValueError, match="optimizer 'sgd' -> 'adamw'"):
        _check_resume(old, TrainConfig(**BASE, optimizer="adamw"), "ckpt")
    _check_resume(old, TrainConfig(**BASE, val_fraction=0.3), "ckpt")  # digits: val_fraction is not used
    _check_resume(old, TrainConfig(**BASE), "ckpt")  # LOBSTER prunes weights: the unit score is not used
    old_serene = {k: v for k, v in TrainConfig(**BASE, method="serene").to_dict().items() if k != "unit_score"}
    with pytest.raises(ValueError, match="unit_score 'norm' -> 'relative-norm'"):  # older runs used raw norms
        _check_resume(old_serene, TrainConfig(**BASE, method="serene"), "ckpt")
    _check_resume(old_serene, TrainConfig(**BASE, method="serene", unit_score="norm"), "ckpt")
    with pytest.raises(ValueError, match="TrainConfig.unit_score: unknown unit_score .l1.; valid: relative-norm, norm"):
        TrainConfig(**BASE, unit_score="l1")
    folder = TrainConfig(dataset="imagefolder:photos").to_dict()
    with pytest.raises(ValueError, match="val_fraction 0.1 -> 0.3"):
        _check_resume(folder, TrainConfig(dataset="imagefolder:photos", val_fraction=0.3), "ckpt")


def test_a_unit_score_registered_after_import_is_a_valid_choice(monkeypatch):
    from lobster_fx.pruning.neuron import UNIT_SCORES
    from lobster_fx.train_config import CHOICES

    with pytest.raises(ValueError, match="unknown unit_score 'l1'"):
        TrainConfig(**BASE, method="serene", unit_score="l1")
    monkeypatch.setitem(UNIT_SCORES, "l1", lambda unit, w: w.abs().flatten(1).sum(1))
    assert TrainConfig(**BASE, method="serene", unit_score="l1").unit_score == "l1"
    assert "l1" in CHOICES["unit_score"] and "l1" in dict(CHOICES)["unit_score"]


def test_resume_with_another_optimizer_is_refused(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**BASE, out_dir=str(out)))
    with pytest.raises(ValueError, match="optimizer 'sgd' -> 'adamw'"):
        train(TrainConfig(**{**BASE, "epochs": 2}, optimizer="adamw", out_dir=str(out)))


def test_a_config_written_before_the_new_fields_loads_with_their_defaults():
    old = {k: v for k, v in TrainConfig(**BASE).to_dict().items()
           if k not in ("model_kwargs", "data_kwargs", "image_size", "val_fraction", "test_fraction", "device",
                        "optimizer")}
    config = config_from_dict(old)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in ("model_kwargs", "image_size", "device", "optimizer", "val_fraction"):
        assert getattr(config, name) == defaults[name]


def test_checkpoint_without_data_info_still_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**BASE, out_dir=str(out)))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["data_info"]["input_shape"] == [1, 8, 8] and state["data_info"]["num_classes"] == 10
    for key in ("data_info", "cuda_rng_states"):
        state.pop(key)
    state["config"] = {k: state["config"][k] for k in ("model", "dataset", "data_root", "epochs", "batch_size", "lr",
                                                       "lmbda", "twt", "pwe", "seed", "progress", "threads")}
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert main(["export", str(old), str(tmp_path / "old.onnx")]) == 0  # reads the digits to learn the shape
    assert main(["report", str(old), "--out", str(tmp_path / "rep")]) == 0
    assert main(["export", str(old), str(tmp_path / "x.onnx"), "--model", "lenet5"]) == EXIT_ERROR
    assert "--model and --model-kwargs go with --state-dict" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_lives_on_the_gpu_matches_the_cpu_and_resumes_there(tmp_path):
    devices = []
    config = {**BASE, "lr": 0.05, "momentum": 0.9}
    gpu = train(TrainConfig(**config, device="cuda", out_dir=str(tmp_path / "gpu")),
                on_epoch=lambda entry, gm: devices.append({t.device.type for t in gm.state_dict().values()}))
    assert devices == [{"cuda"}]  # weights and masks
    assert gpu.splits.train.x.device.type == "cuda"
    cpu = train(TrainConfig(**config))
    for (name, p), q in zip(gpu.gm.named_parameters(), cpu.gm.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), atol=1e-4, rtol=1e-3, msg=name)
    resumed = train(TrainConfig(**{**config, "epochs": 2}, device="cpu", out_dir=str(tmp_path / "gpu")))
    assert [e["epoch"] for e in resumed.log] == [1, 2]
    assert all(p.device.type == "cpu" for p in resumed.gm.parameters())
