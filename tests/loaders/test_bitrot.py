"""Bit rot after the first scan: bytes that flip in a stored image later keep the tar's size and mtime,
so the scan cache still vouches for them. A header-breaking flip must cost neither backend the epoch
(a counted skip with its reason, every other sample once; DALI also across a resume), a flip inside
the entropy-coded data is caught by ``verify_every`` re-checks, and ``info.skipped`` counts it all."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flora.loaders import create_dataloaders
from flora.loaders.dali import HAVE_DALI
from flora.loaders.index import LoaderError
from flora.loaders.recheck import recheck

from .conftest import data_cfg
from .test_index import corrupt_member

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
#: Why each backend finds a header-breaking flip: PIL fails on it; DALI's failure is located by a
#: re-check, which compares the bytes with the sha256 the sample's json records.
DECODE_REASON = {"torch": "decode_error", "dali": "sha256_mismatch"}


def by_size(tars) -> list[Path]:
    """Tars with the most samples first: the sample world's split follows its URLs, which carry a free
    port, so a given shard may hold only a few samples in one run and many in the next."""
    return sorted(sorted(tars), key=lambda t: -len(t.with_suffix(".idx").read_text().splitlines()))


def roomiest(tars) -> Path:
    return by_size(tars)[0]


def rot(tar: Path, nth: int, how: str) -> str:
    """Damages the nth sample's jpg as bit rot would: same size, same mtime (the scan cache is fooled).

    ``frame``: the frame header's sample precision byte zeroed (markers and image size intact, so even
    a fresh header check passes it; no decoder accepts it); ``markers``: the bytes after SOI zeroed;
    ``flip``: one bit deep in the entropy-coded data (still decodes, to slightly wrong pixels).
    """
    st = tar.stat()
    if how == "flip":
        key = corrupt_member(tar, nth, "flip")
    else:
        line = tar.with_suffix(".idx").read_text().splitlines()[1 + nth].split()
        off, size = int(line[line.index("jpg") + 1]), int(line[line.index("jpg") + 2])
        key = line[line.index("jpg") + 3].split(".")[0]
        data = bytearray(tar.read_bytes())
        if how == "markers":
            data[off + 2 : off + 40] = bytes(38)
        else:
            sof = off + _frame_offset(bytes(data[off : off + size]))
            data[sof + 4] = 0  # SOFn: marker (2), length (2), precision (1), height, width, ...
        tar.write_bytes(bytes(data))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tar.stat().st_size == st.st_size and tar.stat().st_mtime_ns == st.st_mtime_ns
    return key


def _frame_offset(jpg: bytes) -> int:
    i = 2
    while jpg[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(jpg[i + 2 : i + 4], "big")
    return i


def cached_cfg(shards: Path, cache: Path, **over) -> dict:
    return data_cfg(shards, index_cache="auto", cache_root=str(cache), **over)


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b["index"][b["valid"]].tolist()]


def rotted_world(shard_copy: Path, tmp_path: Path, how: str, **over) -> tuple[dict, str]:
    """A first scan (cached), then one image of a train shard rots: (config, the rotted key). Train
    with ``pad``: every sample of the rank's plan exactly once, filler rows flagged invalid."""
    cfg = cached_cfg(shard_copy, tmp_path / "cache", train_remainder="pad", **over)
    create_dataloaders(cfg)  # the first scan: every sample verified and cached
    return cfg, rot(roomiest((shard_copy / "train").glob("*/*.tar")), 5, how)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_header_breaking_flip_is_a_counted_skip_and_the_epoch_goes_on(shard_copy, tmp_path, backend):
    cfg, key = rotted_world(shard_copy, tmp_path, "frame", backend=backend)
    train, _, info = create_dataloaders(cfg)
    bad = train.index.keys.index(key)  # the cache was fooled: the rotted sample is in the index
    before = dict(info.skipped["train"])
    train.set_epoch(0)
    seen = ids_of(train)
    expected = sorted(set(train.plan(0).tolist()) - {bad})
    assert sorted(seen) == expected  # every other sample exactly once, nothing lost, nothing repeated
    reason = DECODE_REASON[backend]
    assert info.skipped["train"][reason] == before.get(reason, 0) + 1  # counted in info, live
    assert train.runtime_skips == {bad: (reason, 1)} and train.skipped_at_runtime == 1
    train.set_epoch(1)
    assert sorted(ids_of(train)) == expected  # left out of later epochs, not counted again
    assert info.skipped["train"][reason] == before.get(reason, 0) + 1


def test_dali_recovers_a_training_epoch_with_full_static_batches(shard_copy, tmp_path):
    """Train, shuffled, ``drop``: the rebuilt pipeline reads the rest in a new order; the rank still
    yields ``len(loader)`` batches of full size, the shortfall flagged ``valid == False``."""
    cfg = cached_cfg(shard_copy, tmp_path / "cache", backend="dali")
    train, _, _ = create_dataloaders(cfg)
    key = rot(roomiest((shard_copy / "train").glob("*/*.tar")), 3, "frame")
    train, _, info = create_dataloaders(cfg)
    bad = train.index.keys.index(key)
    batches = list(train)
    assert len(batches) == len(train) and all(len(b["label"]) == 16 for b in batches)
    seen = ids_of(batches)
    assert len(seen) == len(set(seen)) and bad not in seen
    assert set(seen) <= set(train.plan(0).tolist())
    assert len(seen) == min(len(train) * 16, len(train.plan(0)) - 1)  # drop: the rank's tail sits out
    assert info.skipped["train"]["sha256_mismatch"] == 1 and train.runtime_skips[bad][1] == 1


def test_dali_resume_after_a_recovery_sees_exactly_the_unseen_samples(shard_copy, tmp_path):
    cfg, key = rotted_world(shard_copy, tmp_path, "frame", backend="dali")
    train, _, _ = create_dataloaders(cfg)
    bad = train.index.keys.index(key)
    train.set_epoch(0)
    head = []
    for batch in train:
        head.append(batch)
        if train.skipped_at_runtime:  # the first batch of the rebuilt pipeline, after the failure
            state = train.state_dict()
            break
    assert state["dali_recoveries"] == 1 and state["runtime_skips"] == {str(bad): ["sha256_mismatch", 1]}
    torch.save({"loader": state}, tmp_path / "ckpt.pt")
    resumed, _, info = create_dataloaders(cfg)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt")["loader"])
    resumed.set_epoch(0)
    tail = list(resumed)
    assert tail  # the state was taken with samples still to read
    seen = ids_of(head) + ids_of(tail)
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(set(train.plan(0).tolist()) - {bad})
    assert info.skipped["train"]["sha256_mismatch"] == train.skipped["sha256_mismatch"]  # restored count


def test_a_dali_failure_that_no_recheck_explains_stays_an_error(shard_copy, tmp_path, monkeypatch):
    cfg, _key = rotted_world(shard_copy, tmp_path, "frame", backend="dali")
    train, _, _ = create_dataloaders(cfg)
    monkeypatch.setattr("flora.loaders.dali.recheck", lambda *args, **kwargs: {})  # finds nothing to blame
    with pytest.raises(
        LoaderError, match=r"(?s)DALI failed in epoch 0 .*no sample of the epoch still to read"
    ):
        list(train)
    assert train.skipped_at_runtime == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_entropy_flip_is_caught_by_verify_every(shard_copy, tmp_path, backend):
    cfg, key = rotted_world(shard_copy, tmp_path, "flip", backend=backend)
    silent, _, _ = create_dataloaders(cfg)  # verify_every: 0 trusts the cache: decoded and used
    bad = silent.index.keys.index(key)
    assert bad in ids_of(list(silent)) and silent.skipped_at_runtime == 0
    cfg["data"]["verify_every"] = 1
    train, _, info = create_dataloaders(cfg)
    before = info.skipped["train"]["sha256_mismatch"]
    seen = ids_of(list(train))
    assert bad not in seen and sorted(seen) == sorted(set(train.plan(0).tolist()))
    assert info.skipped["train"]["sha256_mismatch"] == before + 1
    assert train.runtime_skips == {bad: ("sha256_mismatch", 0)}  # left out of epoch 0 already
    assert train.rechecks[0]["epoch"] == 0 and train.rechecks[0]["bad"] == 1
    assert train.rechecks[0]["samples"] == len(train.plan(0)) + 1  # the whole plan, the bad one included


def test_verify_every_n_rechecks_on_schedule_and_skips_a_fresh_scan(shard_copy):
    cfg = data_cfg(shard_copy, backend="torch", verify_every=2)  # no scan cache: a fresh scan
    _, val, info = create_dataloaders(cfg)
    list(val)  # epoch 0: the re-check skips the shards the scan has just hashed
    assert val.rechecks == [{"epoch": 0, "samples": 0, "bad": 0, "seconds": val.rechecks[0]["seconds"]}]
    key = rot(max((shard_copy / "val").glob("*/*.tar"), key=lambda t: t.stat().st_size), 1, "flip")
    bad = val.index.keys.index(key)
    val.set_epoch(1)
    assert bad in ids_of(list(val))  # no re-check before epoch 1: the flip goes through
    val.set_epoch(2)
    assert bad not in ids_of(list(val))
    assert [r["epoch"] for r in val.rechecks] == [0, 2] and val.rechecks[1]["bad"] == 1
    assert val.rechecks[1]["samples"] == len(val.plan(2)) + 1
    assert info.skipped["val"]["sha256_mismatch"] == 1


def test_recheck_levels(shard_copy):
    _, val, _ = create_dataloaders(data_cfg(shard_copy, val_split="train"))
    tars = by_size((shard_copy / "train").glob("*/*.tar"))
    index = val.index
    markers, frame, flip = (
        index.keys.index(rot(tar, 1, how))
        for tar, how in zip(tars, ("markers", "frame", "flip"), strict=False)
    )
    everything = np.arange(len(index))
    assert recheck(index, everything, "full", threads=2) == dict.fromkeys(
        (markers, frame, flip), "sha256_mismatch"
    )
    assert recheck(index, everything, "header", threads=2) == {markers: "no_jpeg_frame"}
    assert recheck(index, everything, "decode", threads=2) == dict.fromkeys(
        (markers, frame, flip), "sha256_mismatch"
    )
    index.sha256 = np.zeros_like(index.sha256)  # no sha256 in the jsons: the header check, then PIL
    assert recheck(index, everything, "full", threads=2) == {markers: "no_jpeg_frame"}
    assert recheck(index, everything, "decode", threads=2) == {
        markers: "no_jpeg_frame",
        frame: "decode_error",
    }
    with pytest.raises(ValueError, match="recheck level must be one of"):
        recheck(index, everything, "thorough")
