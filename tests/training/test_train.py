"""The training loop end to end on the test shards (test_vit, CPU): learning, files, exact resume."""

import json
import logging
import subprocess
import sys

import pytest
import torch
import yaml

from flora.loaders.dali import HAVE_DALI
from flora.training.checkpoint import load_checkpoint
from flora.training.config import load_experiment
from flora.training.loop import Trainer, TrainingError
from flora.training.train import main as train_main

from .conftest import experiment, killed_save


def _fit(cfg: dict, resume: bool = False, stop_after: int | None = None) -> tuple[Trainer, dict]:
    trainer = Trainer(load_experiment(cfg), resume=resume, stop_after=stop_after)
    return trainer, trainer.fit()


def test_smoke_training_learns_and_writes_its_run(shard_root, tmp_path):
    cfg = experiment(shard_root, tmp_path, train={"epochs": 4})
    trainer, summary = _fit(cfg)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
    assert summary["best"]["value"] > 2.5 / trainer.info.num_classes  # well above chance
    assert summary["steps"] == 4 * len(trainer.train_loader) and summary["status"] == "finished"
    run = tmp_path / "run"
    for name in ("last_checkpoint.pt", "best_model.pt", "metrics.json", "config.json", "curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    best = load_checkpoint(run / "best_model.pt")
    assert best.kind == "best" and best.training is None and best.model_name == "test_vit"
    assert best.class_mapping == trainer.info.class_mapping
    assert best.preprocessing.image_size == 48 and best.preprocessing.mean == list(trainer.info.mean)
    assert best.metrics["top1"] == summary["best"]["value"]
    assert len(best.class_counts) == trainer.info.num_classes  # the training split's samples per class
    assert (
        sum(best.class_counts) == trainer.info.samples["train"]
        and best.class_counts == trainer.info.class_counts
    )
    last = load_checkpoint(run / "last_checkpoint.pt")
    assert last.kind == "last" and last.step == summary["steps"] and last.training.loader[0]["epoch"] == 4
    assert last.world_size == 1 and last.training.best == summary["best"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_reaches_the_same_weights(shard_root, tmp_path, backend):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    over = {"backend": backend}
    if backend == "dali":  # the full augmentation list: random crop, flip, rotation, colour, on both runs
        over["augment"] = {"rotate_degrees": 10.0, "scale": [0.5, 1.0]}
    straight = experiment(shard_root, tmp_path, "straight", train={"epochs": 2, "grad_accum": 2})
    straight["data"].update(over)
    a, _ = _fit(straight)
    interrupted = experiment(shard_root, tmp_path, "interrupted", train={"epochs": 2, "grad_accum": 2})
    interrupted["data"].update(over)
    steps_per_epoch = a.updates_per_epoch
    _, first = _fit(interrupted, stop_after=steps_per_epoch + 3)  # stopped in the middle of epoch 1
    assert first["status"] == "stopped" and first["steps"] == steps_per_epoch + 3
    b, second = _fit(interrupted, resume=True)
    assert second["status"] == "finished" and second["steps"] == a.step
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    history = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())["epochs"]
    reference = json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["train_loss"] == pytest.approx(reference[1]["train_loss"])
    assert history[1]["val_top1"] == reference[1]["val_top1"]


def test_a_run_starts_by_removing_a_killed_runs_checkpoint_temporaries(shard_root, tmp_path, caplog):
    run = tmp_path / "run"
    leftover = killed_save(run / "last_checkpoint.pt")  # no last_checkpoint.pt: a fresh run may start
    other = run / ".notes.tmp"
    other.write_text("not a checkpoint temporary")
    caplog.set_level(logging.INFO, logger="flora.training.loop")
    _, summary = _fit(experiment(shard_root, tmp_path, train={"epochs": 1, "max_steps": 2}))
    assert not leftover.exists() and other.exists()
    assert not list(run.glob(".*.pt.*.tmp"))  # nor any of this run's own
    assert f"removed 1 stale checkpoint temporaries from {run}" in caplog.text
    assert load_checkpoint(run / "last_checkpoint.pt").step == summary["steps"] == 2


def test_a_run_folder_is_not_overwritten_and_resume_needs_the_same_config(shard_root, tmp_path):
    cfg = experiment(shard_root, tmp_path, train={"epochs": 1, "max_steps": 3})
    _fit(cfg)
    with pytest.raises(TrainingError, match="--resume"):
        _fit(cfg)
    changed = experiment(shard_root, tmp_path, train={"epochs": 1, "max_steps": 3}, optim={"lr": 1e-2})
    with pytest.raises(TrainingError, match="optim"):
        _fit(changed, resume=True)
    with pytest.raises(TrainingError, match="no last_checkpoint"):
        _fit(experiment(shard_root, tmp_path, "fresh"), resume=True)


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_max_steps_ends_the_schedule(shard_root, tmp_path, warmup_epochs):
    schedule = {"warmup_epochs": warmup_epochs, "min_lr": 0.0, "warmup_lr": 0.0}
    trainer, summary = _fit(
        experiment(shard_root, tmp_path, train={"epochs": 5, "max_steps": 6}, schedule=schedule)
    )
    assert summary["steps"] == 6 and trainer.total_steps == 6
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ran to its end
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][0]["val_samples"] > 0


def test_ema_and_channels_last(shard_root, tmp_path):
    cfg = experiment(
        shard_root,
        tmp_path,
        train={"epochs": 1, "channels_last": True, "ema": {"enabled": True, "decay": 0.5}},
    )
    cfg["data"]["channels_last"] = True
    trainer, summary = _fit(cfg)
    best = load_checkpoint(tmp_path / "run" / "best_model.pt")
    assert best.ema_weights is True
    for key, value in trainer.ema.module.state_dict().items():  # best = the validated (EMA) weights
        assert torch.equal(best.model[key], value.cpu()), key
    assert not torch.equal(
        trainer.ema.module.state_dict()["head.weight"], trainer.model.state_dict()["head.weight"]
    )
    assert load_checkpoint(tmp_path / "run" / "last_checkpoint.pt").training.ema is not None


@pytest.mark.slow
def test_torch_compile(shard_root, tmp_path):
    _, summary = _fit(experiment(shard_root, tmp_path, train={"epochs": 1, "max_steps": 4, "compile": True}))
    assert summary["status"] == "finished" and summary["steps"] == 4


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": str(tmp_path)}, "optim": {"lrate": 1}}))
    assert train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora train: error: ") and "optim.lrate" in err and "\n" not in err


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_evaluate_exactly(shard_root, tmp_path):
    cfg = experiment(shard_root, tmp_path, "ddp", train={"epochs": 3})
    cfg["data"]["train_remainder"] = "pad"
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "flora.training.train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    history = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    last = load_checkpoint(tmp_path / "ddp" / "last_checkpoint.pt")
    assert [s["rank"] for s in last.training.loader] == [0, 1] and len(last.training.rng) == 2
    best = tmp_path / "ddp" / "best_model.pt"
    out2, out1 = tmp_path / "eval2", tmp_path / "eval1"
    evaluate = ["-m", "flora.training.evaluate", "--checkpoint", str(best), "--no-calibration", "--out"]
    for launcher, out in ((torchrun, out2), ([sys.executable], out1)):
        proc = subprocess.run([*launcher, *evaluate, str(out)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = (json.loads((o / "results.json").read_text()) for o in (out2, out1))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["samples"] == one["samples"] == sum(r["samples"] for r in one["per_region"].values())
    for key in ("top1", "top5", "macro_top1"):
        assert two["metrics"][key] == one["metrics"][key]
    assert two["metrics"]["nll"] == pytest.approx(one["metrics"]["nll"], rel=1e-4)


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_rank(shard_root, tmp_path, caplog):
    """Preempted on two ranks mid-epoch (class_balanced sampling), resumed on one with grad_accum 2 (the
    same global batch): the loader takes the epoch over and the run finishes its schedule."""
    cfg = experiment(shard_root, tmp_path, "moved", train={"epochs": 2})
    cfg["data"].update(train_remainder="pad", sampling={"policy": "class_balanced"})
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "flora.training.train", "--config", str(path), "--stop-after", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_checkpoint(tmp_path / "moved" / "last_checkpoint.pt")
    assert saved.world_size == 2 and saved.step == 2 and saved.epoch == 0
    assert [s["batches_done"] for s in saved.training.loader] == [2, 2]
    cfg["train"]["grad_accum"] = 2
    caplog.set_level(logging.INFO)
    trainer, summary = _fit(cfg, resume=True)
    assert summary["status"] == "finished" and summary["world_size"] == 1
    assert "resumed on 1 rank(s) a run of 2" in caplog.text and "took over epoch 0" in caplog.text
    assert "global batch is now 32 images" in caplog.text and "it was 32" in caplog.text
    last = load_checkpoint(tmp_path / "moved" / "last_checkpoint.pt")
    assert last.world_size == 1 and [s["epoch"] for s in last.training.loader] == [2]
    history = json.loads((tmp_path / "moved" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [0, 1]
