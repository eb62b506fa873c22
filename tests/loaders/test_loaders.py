"""Both loaders on the same shards: batch shape, dtype and normalisation, DALI vs reference on
validation, the same sample sets per epoch and rank, remainder policies, mid-epoch resume (through
torch.save), corrupt-sample skipping."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flora.loaders import create_dataloaders
from flora.loaders.dali import HAVE_DALI
from flora.loaders.index import LoaderError

from .conftest import data_cfg
from .test_index import corrupt_member

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")


def epoch(loader, epoch_no: int | None = None) -> list[dict]:
    if epoch_no is not None:
        loader.set_epoch(epoch_no)
    return list(loader)


def ids_of(batches, valid_only: bool = True) -> list[int]:
    out = []
    for b in batches:
        keep = b["valid"] if valid_only else torch.ones_like(b["valid"])
        out += b["index"][keep].tolist()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_shaped_typed_and_normalised(shard_root, backend):
    train, val, info = create_dataloaders(data_cfg(shard_root, backend=backend))
    assert info.backend == backend and info.device == "cpu" and info.num_classes == len(info.class_mapping)
    batches = epoch(train)
    assert len(batches) == len(train) == info.batches_per_epoch["train"]
    for b in batches:
        assert b["image"].shape == (16, 3, 64, 64) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["label"].shape == (16,)
        assert torch.equal(b["label"], torch.from_numpy(train.index.labels[b["index"].numpy()]))
    images = torch.cat([b["image"] for b in batches])
    # normalised with ImageNet statistics: centred near 0, unit-ish spread, far outside [0, 1]
    assert -0.6 < images.mean().item() < 0.6 and 0.5 < images.std().item() < 1.6
    assert images.min().item() < -1.5 and images.max().item() > 1.5
    vb = epoch(val)
    assert sum(len(b["label"]) for b in vb) == info.samples["val"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_half(shard_root, backend):
    train, _, _ = create_dataloaders(
        data_cfg(shard_root, backend=backend, channels_last=True, dtype="float16")
    )
    b = next(iter(train))
    assert b["image"].shape == (16, 3, 64, 64) and b["image"].dtype == torch.float16
    assert b["image"].is_contiguous(memory_format=torch.channels_last)


def reference_val_image(shard_root, index, sid, size, resize) -> np.ndarray:
    """Validation preprocessing by hand: PIL bilinear (antialiased) resize of the shorter side (longer
    side rounded), center crop at round-half-up, normalise - DALI's geometry."""
    with open(index.shards[index.shard_of(sid)].path, "rb") as f:
        f.seek(int(index.jpg_offset[sid]))
        img = Image.open(io.BytesIO(f.read(int(index.jpg_size[sid])))).convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
    left, top = (img.width - size + 1) // 2, (img.height - size + 1) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return ((arr - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)


def test_validation_dali_matches_reference(shard_root):
    out = {}
    for backend in BACKENDS:
        _, val, _ = create_dataloaders(data_cfg(shard_root, backend=backend))
        batches = epoch(val)
        out[backend] = (torch.cat([b["image"] for b in batches]), ids_of(batches))
    (dali_img, dali_ids), (ref_img, ref_ids) = out["dali"], out["torch"]
    assert dali_ids == ref_ids  # same samples in the same order
    diff = (dali_img - ref_img).abs()
    # resize interpolation only (DALI's vs torchvision's antialiased bilinear): ~0.005 here, ~1/255;
    # a one-pixel crop offset measures ~0.07, a wrong mean/std, channel order or flip far more
    assert diff.mean().item() < 0.02, diff.mean().item()
    assert diff.mean(dim=(1, 2, 3)).max().item() < 0.05
    for row in (0, len(ref_ids) // 2):
        by_hand = reference_val_image(shard_root, val.index, ref_ids[row], 64, val.cfg.val_resize)
        assert np.abs(ref_img[row].numpy() - by_hand).mean() < 0.03  # Pillow vs torchvision resize


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_see_every_sample_once_per_epoch(shard_root, backend):
    per_epoch = []
    for e in range(2):
        seen = []
        for rank in range(2):
            train, val, info = create_dataloaders(
                data_cfg(shard_root, backend=backend, train_remainder="pad"), rank=rank, world_size=2
            )
            batches = epoch(train, e)
            assert len(batches) == len(train)  # pad: the same number of batches on both ranks
            assert all(len(b["label"]) == 16 for b in batches)
            seen.append(ids_of(batches))
            vb = epoch(val, e)
            val_ids = ids_of(vb)
            assert len(val_ids) == len(set(val_ids)) == val.rank_size
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(info.samples["train"]))
        per_epoch.append(seen)
    assert per_epoch[0][0] != per_epoch[1][0]  # reshuffled


def test_dali_and_reference_give_the_same_sample_sets(shard_root):
    for rank in range(2):
        got = {}
        for backend in BACKENDS:
            cfg = data_cfg(shard_root, backend=backend, train_remainder="pad")
            train, _, _ = create_dataloaders(cfg, rank=rank, world_size=2)
            got[backend] = [ids_of(epoch(train, e)) for e in range(2)]
        for e in range(2):
            plan = sorted(train.plan(e).tolist())
            assert sorted(got["dali"][e]) == sorted(got["torch"][e]) == plan
            assert got["dali"][e] != plan  # both shuffle within the rank's slice (differently)


def test_drop_gives_equal_full_batches(shard_root):
    lengths = []
    for rank in range(2):
        train, _, info = create_dataloaders(data_cfg(shard_root, batch_size=24), rank=rank, world_size=2)
        batches = epoch(train)
        assert all(len(b["label"]) == 24 and bool(b["valid"].all()) for b in batches)
        lengths.append(len(batches))
        ids = ids_of(batches)
        assert len(set(ids)) == len(ids) and set(ids) <= set(train.plan(0).tolist())
    n = info.samples["train"]
    assert lengths == [(n // 2) // 24] * 2


NO_CUDA = not torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="no CUDA device")]


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("dali-gpu", marks=GPU)])
def test_resume_mid_epoch_sees_exactly_the_unseen_samples(shard_root, backend, tmp_path):
    device = "gpu" if backend == "dali-gpu" else "cpu"
    backend = backend.removesuffix("-gpu")
    cfg = data_cfg(shard_root, backend=backend, train_remainder="pad", device=device)
    full, _, _ = create_dataloaders(cfg)
    whole = epoch(full, 1)
    first, _, _ = create_dataloaders(cfg)
    first.set_epoch(1)
    head = []
    for b in first:
        head.append(b)
        if len(head) == 5:
            torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
            break
    resumed, _, _ = create_dataloaders(cfg)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt")["loader"])
    assert resumed.epoch == 1
    resumed.set_epoch(1)  # the training loop's usual call does not lose the resume point
    tail = list(resumed)
    assert len(head) + len(tail) == len(whole)
    assert ids_of(head) + ids_of(tail) == ids_of(whole)  # same order: the resumed run is the same run
    if backend == "dali":  # DALI's checkpoint restores the augmentation RNG too
        assert torch.equal(tail[0]["image"], whole[5]["image"])
    state = resumed.state_dict()
    assert (state["epoch"], state["batches_done"]) == (2, 0)


def test_resume_refuses_a_different_run(shard_root):
    train, _, _ = create_dataloaders(data_cfg(shard_root))
    batches = iter(train)
    next(batches)
    state = train.state_dict()
    other, _, _ = create_dataloaders(data_cfg(shard_root, seed=3))
    with pytest.raises(LoaderError, match="seed=0"):
        other.load_state_dict(state)
    balanced, _, _ = create_dataloaders(data_cfg(shard_root, sampling={"policy": "class_balanced"}))
    with pytest.raises(LoaderError, match="sampling="):
        balanced.load_state_dict(state)


def test_dali_position_is_taken_while_the_epoch_runs(shard_root):
    """A mid-epoch state of an epoch already abandoned would lose samples: refused, not guessed."""
    if not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    train, _, _ = create_dataloaders(data_cfg(shard_root))
    next(iter(train))  # the iterator is dropped at once: the epoch's pipeline is gone
    with pytest.raises(LoaderError, match="iterator alive"):
        train.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_samples_do_not_stop_an_epoch(shard_copy, backend):
    tars = sorted((shard_copy / "val").glob("*/*.tar"))
    bad = {corrupt_member(tars[0], 0, "garbage"), corrupt_member(tars[-1], 0, "flip")}
    _, val, info = create_dataloaders(data_cfg(shard_copy, backend=backend))
    ids = ids_of(epoch(val))
    assert info.skipped["val"]["sha256_mismatch"] == 2
    assert not bad & {val.index.keys[i] for i in ids}
    with tarfile.open(tars[0]) as t:
        total = sum(1 for m in t.getmembers() if m.name.endswith(".jpg"))
    assert len(ids) == info.samples["val"] and total >= 1


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="no CUDA device")
def test_gpu_mixed_decoder_matches_cpu(shard_root):
    train, val, info = create_dataloaders(data_cfg(shard_root, device="gpu"))
    assert info.device.startswith("cuda")
    b = next(iter(train))
    assert b["image"].is_cuda and b["label"].is_cuda and b["image"].shape == (16, 3, 64, 64)
    gpu = torch.cat([b["image"].cpu() for b in epoch(val)])
    _, cpu_val, _ = create_dataloaders(data_cfg(shard_root, device="cpu"))
    cpu = torch.cat([b["image"] for b in epoch(cpu_val)])
    assert (gpu - cpu).abs().mean().item() < 0.03  # nvJPEG vs libjpeg-turbo IDCT and GPU resize


def test_fused_resize_rotate_is_a_resize_at_angle_zero(shard_root):
    """The train graph's one-warp resize + rotation: at (almost) no rotation it is DALI's resize."""
    from nvidia.dali import fn, pipeline_def, types

    from flora.loaders.dali import _resize_rotate

    tars = sorted(str(p) for p in (shard_root / "val").glob("*/*.tar"))[:2]

    @pipeline_def
    def pipe():
        jpg = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg"], dtypes=[types.UINT8]
        )
        img = fn.decoders.image(jpg, output_type=types.RGB)
        return _resize_rotate(img, 48, 1e-6, "cpu"), fn.resize(img, resize_x=48, resize_y=48, antialias=False)

    p = pipe(batch_size=4, num_threads=1, device_id=None)
    p.build()
    warped, resized = p.run()
    for i in range(4):
        a, b = np.asarray(warped.at(i), dtype=float), np.asarray(resized.at(i), dtype=float)
        assert a.shape == b.shape == (48, 48, 3)
        assert np.abs(a - b).mean() < 0.5  # of 255: the same sampling grid
