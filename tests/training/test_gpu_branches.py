"""What a GPU run does, exercised on the CPU where torch allows it: bf16 autocast through the whole
loop (learning, exact resume), DDP built by the same call the GPU ranks make."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flora.loaders.dali import HAVE_DALI
from flora.training.config import load_experiment
from flora.training.loop import Trainer, autocast, wrap_ddp

from .conftest import experiment


def _fit(cfg: dict, resume: bool = False, stop_after: int | None = None) -> tuple[Trainer, dict]:
    trainer = Trainer(load_experiment(cfg), resume=resume, stop_after=stop_after)
    return trainer, trainer.fit()


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_bf16_autocast_learns_and_resumes_bit_identically(shard_root, tmp_path):
    """``amp: bf16`` as on a GPU (CPU autocast here), channels_last, the full DALI augmentation list."""
    train = {"epochs": 3, "amp": "bf16", "channels_last": True}
    data = {
        "backend": "dali",
        "channels_last": True,
        "augment": {"rotate_degrees": 10.0, "scale": [0.5, 1.0]},
    }
    straight = experiment(shard_root, tmp_path, "straight", train=train)
    straight["data"].update(data)
    a, summary = _fit(straight)
    assert a.amp_dtype == torch.bfloat16
    batch = next(iter(a.train_loader))
    with autocast(a.device, a.amp_dtype):
        assert a.model(batch["image"]).dtype == torch.bfloat16  # autocast is really on
    history = json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05
    assert summary["best"]["value"] > 2.0 / a.info.num_classes

    interrupted = experiment(shard_root, tmp_path, "interrupted", train=train)
    interrupted["data"].update(data)
    _, first = _fit(interrupted, stop_after=a.updates_per_epoch + 2)  # stopped inside epoch 1
    assert first["status"] == "stopped"
    b, second = _fit(interrupted, resume=True)
    assert second["status"] == "finished" and second["steps"] == a.step
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_is_built_by_the_call_the_gpu_ranks_make():
    """``wrap_ddp`` on the CPU (a real gloo group on loopback): the GPU branch's arguments except the
    device ids; gradients are the plain model's."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        wrapped_model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        wrapped_model.load_state_dict(plain.state_dict())
        ddp = wrap_ddp(wrapped_model, torch.device("cpu"))
        assert ddp.device_ids is None and ddp.gradient_as_bucket_view
        x = torch.randn(5, 8)
        plain(x).square().sum().backward()
        ddp(x).square().sum().backward()
        for p, q in zip(plain.parameters(), wrapped_model.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad)
    finally:
        dist.destroy_process_group()


def test_ddp_on_a_gpu_pins_the_rank_to_its_device(monkeypatch):
    """Constructing DDP for a CUDA module needs CUDA: check the arguments the GPU branch passes."""
    seen = {}

    def fake_ddp(module, **kwargs):
        seen.update(kwargs)
        return module

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", fake_ddp)
    wrap_ddp(nn.Linear(2, 2), torch.device("cuda", 3))
    assert seen == {"device_ids": [3], "output_device": 3, "gradient_as_bucket_view": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_DALI, reason="needs a CUDA device and DALI")
def test_bf16_training_on_the_gpu_fed_by_dali_mixed(shard_root, tmp_path):
    """The loop as a GPU user runs it: DALI mixed decoder, amp auto (= bf16), channels_last; it learns
    and a stopped run resumes to the same step with the same loader position."""
    train = {"epochs": 3, "channels_last": True}
    data = {"backend": "dali", "device": "gpu", "channels_last": True}
    cfg = experiment(shard_root, tmp_path, "gpu", train=train)
    cfg["data"].update(data)
    a, summary = _fit(cfg)
    assert a.device.type == "cuda" and a.amp_dtype == torch.bfloat16
    batch = next(iter(a.train_loader))
    assert batch["image"].is_cuda and batch["label"].is_cuda
    history = json.loads((tmp_path / "gpu" / "metrics.json").read_text())["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["best"]["value"] > 2.0 / a.info.num_classes
    stopped = experiment(shard_root, tmp_path, "gpu_stopped", train=train)
    stopped["data"].update(data)
    _, first = _fit(stopped, stop_after=a.updates_per_epoch + 2)
    b, second = _fit(stopped, resume=True)
    assert first["status"] == "stopped" and second["status"] == "finished" and second["steps"] == a.step
    assert b.train_loader.state_dict()["epoch"] == a.train_loader.state_dict()["epoch"]
