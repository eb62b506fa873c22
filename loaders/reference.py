"""The reference loader: a torch ``DataLoader`` over the same shards, PIL decoding, torchvision v2.

Owns the fallback when DALI is not installed and the baseline the benchmarks compare DALI with.
Same config, same semantics as dali.py: the same selected samples (index.py), the same per-epoch
shard order and rank cut, a shuffle buffer of the same size (a seeded one, so the order is known in
advance), RandomResizedCrop / flip / rotation / ColorJitter / normalise with the same parameters
for training, resize-shorter-side + center crop for validation; a stored view's crop, rotation,
colour and flip when the loader replays stored views (views.py; ``ReplayView``).

How it runs: the epoch's batches are planned in the main process (sample ids, in order); worker
``w`` of the ``DataLoader`` reads batches ``w, w + workers, ...`` straight from the tars by byte
offset, so the ``DataLoader``'s round-robin hands them back in plan order. A resumed epoch starts
at batch ``k`` of the same plan. Each worker is a small pipeline of generator stages over dict
samples (webdataset's ``DataPipeline``): read bytes -> decode (errors go to a ``handler``) ->
transform -> batch. A sample that fails to decode is skipped, not fatal: its id comes back on its
batch and the loader counts it (``skipped['decode_error']``) and leaves it out of later epochs.

Worker processes start from a fork server (``data.worker_start``), not by forking the training
process: by then that process has threads (gloo's, torch's pools, an earlier loader's queue
feeders), and a fork copies whatever locks they hold at that instant, so now and then a new
epoch's worker hung for good (seen under torchrun in CI). The server is a clean process that has
imported this module once (its start costs ~3-10 s once per process); each worker receives only the
samples still to read (``WorkerPlan``), not the whole index, and, for shards in an object store,
this process's AWS settings (remote.py; a batch's consecutive jpgs of a shard are one ranged GET).
A script that builds loaders at its top level needs the usual ``if __name__ == "__main__":`` guard then, or
``worker_start: fork``.

Leaves out: epochs/remainder/state bookkeeping (base.py) and shard selection (index.py).
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode, v2

from flora.loaders import views
from flora.loaders.base import EpochLoader
from flora.loaders.config import DataConfig
from flora.loaders.index import SampleIndex
from flora.loaders.plan import epoch_seed
from flora.loaders.recheck import DECODE_ERROR
from flora.loaders.remote import aws_env, is_remote
from flora.loaders.views import crop_box
from flora.store import S3Url, read_range

log = logging.getLogger(__name__)
#: Ranged GETs in flight per worker when the tars are in an object store (a batch's runs at once).
REMOTE_READ_THREADS = 8
#: Largest gap between two planned jpgs of a shard that one GET reads through (a sample's other members
#: and tar headers are ~2-3 KiB; a left-out sample's jpg, tens of KiB, starts a new GET).
RUN_GAP = 8 << 10
#: A run's GET stops growing at this size.
RUN_BYTES = 8 << 20


def build_transform(cfg: DataConfig, train: bool) -> Callable:
    """torchvision v2 transforms with the DALI pipeline's semantics (PIL image in, CHW float out)."""
    aug = cfg.augment
    size = cfg.image_size
    out_dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    if train:
        steps = [
            v2.PILToTensor(),
            v2.RandomResizedCrop(size, scale=tuple(aug.scale), ratio=tuple(aug.ratio), antialias=True),
            v2.RandomHorizontalFlip(aug.hflip),
        ]
        if aug.rotate_degrees > 0:
            steps.append(
                v2.RandomRotation(aug.rotate_degrees, interpolation=InterpolationMode.BILINEAR, fill=0)
            )
        if max(aug.brightness, aug.contrast, aug.saturation, aug.hue) > 0:
            steps.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]
    else:
        steps = [eval_transform(size, cfg.val_resize, aug.mean, aug.std)]
    if out_dtype != torch.float32:
        steps.append(v2.ToDtype(out_dtype))
    return v2.Compose(steps)


class ReplayView:
    """A stored view (views.py), replayed: crop at the stored box, resize to ``image_size`` (bilinear,
    antialiased as RandomResizedCrop is), rotate, colour (brightness, contrast, saturation, hue),
    flip, normalise: PIL image and the view's parameters in, CHW float out."""

    def __init__(self, cfg: DataConfig):
        self.size, self.mean, self.std = cfg.image_size, cfg.augment.mean, cfg.augment.std
        self.dtype = torch.float16 if cfg.dtype == "float16" else torch.float32

    def __call__(self, img: Image.Image, p: np.ndarray) -> torch.Tensor:
        f = v2.functional
        t = f.pil_to_tensor(img)
        x0, y0, w, h = crop_box(p, t.shape[-2], t.shape[-1])
        t = f.resized_crop(
            t, y0, x0, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )
        if p[views.ANGLE] != 0:
            t = f.rotate(t, float(p[views.ANGLE]), InterpolationMode.BILINEAR, fill=0)
        for field, adjust in (
            (views.BRIGHTNESS, f.adjust_brightness),
            (views.CONTRAST, f.adjust_contrast),
            (views.SATURATION, f.adjust_saturation),
        ):
            if p[field] != 1:
                t = adjust(t, float(p[field]))
        if p[views.HUE] != 0:
            t = f.adjust_hue(t, float(p[views.HUE]))
        if p[views.FLIP] >= 0.5:
            t = f.horizontal_flip(t)
        t = f.normalize(f.to_dtype(t, torch.float32, scale=True), self.mean, self.std)
        return t.to(self.dtype)


def eval_transform(size: int, shorter: int, mean, std) -> v2.Compose:
    """Validation / evaluation / export parity: PIL image in, resize shorter side + center crop (DALI's
    geometry), scaled to [0, 1] and normalised, CHW float32 out."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            ResizeShorterCenterCrop(shorter, size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class ResizeShorterCenterCrop(torch.nn.Module):
    """Validation geometry exactly as DALI computes it (``resize_shorter`` + ``crop_pos`` 0.5).

    torchvision's ``Resize(int)`` truncates the longer side and ``CenterCrop`` rounds half to even;
    DALI rounds the longer side and puts the crop at ``round((in - out) / 2)``, half up. Off by one
    pixel either way, the two loaders would disagree far more than interpolation does.
    """

    def __init__(self, shorter: int, crop: int):
        super().__init__()
        self.shorter, self.crop = shorter, crop

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        scale = self.shorter / min(h, w)
        # half up, as DALI rounds (Python's round() would take a tie such as 182.5 to the even 182)
        nh, nw = (self.shorter, max(self.shorter, math.floor(w * scale + 0.5))) if h <= w else (
            max(self.shorter, math.floor(h * scale + 0.5)), self.shorter)  # fmt: skip
        img = v2.functional.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        top, left = math.floor((nh - self.crop) / 2 + 0.5), math.floor((nw - self.crop) / 2 + 0.5)
        return img[..., top : top + self.crop, left : left + self.crop]


# ------------------------------------------------------------------------------------- stages
def warn_and_count(exc: Exception, sample: dict) -> bool:
    """The handler: log, count (the sample's id travels on its batch as ``skipped``), continue."""
    log.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__shard__"), exc)
    return True


def read_samples(batches, index: SampleIndex | WorkerPlan):
    """Stage: planned batches of sample ids -> dict samples with the raw jpg bytes."""
    if index.shards and is_remote(index.shards[0].path):
        yield from _read_remote(batches, index)
        return
    handles: dict[int, object] = {}
    try:
        for batch_no, ids in batches:
            for sid in ids.tolist():
                shard = index.shard_of(sid)
                f = handles.get(shard)
                if f is None:
                    f = handles[shard] = open(index.shards[shard].path, "rb")  # noqa: SIM115 - closed below
                f.seek(int(index.jpg_offset[sid]))
                yield _sample(index, sid, shard, batch_no, f.read(int(index.jpg_size[sid])))
    finally:
        for f in handles.values():
            f.close()


def _sample(index, sid: int, shard: int, batch_no: int, data: bytes) -> dict:
    rel = index.shards[shard].rel
    return {"__key__": index.keys[sid], "__shard__": rel, "id": sid, "batch": batch_no, "jpg": data}


def _read_remote(batches, index: SampleIndex | WorkerPlan):
    """``read_samples`` from an object store: a batch's ids are read in *runs* (consecutive ids of one
    shard whose jpgs lie at most ``RUN_GAP`` bytes apart in the tar: the planned order is tar order
    within a shard), each run one ranged GET from its first jpg to its last, the jpgs cut out of it;
    a batch's runs in parallel threads, the next batch's issued while this one is decoded."""
    urls = [S3Url.parse(str(s.path)) for s in index.shards]

    def fetch(run: list[int]) -> list[bytes]:
        start = int(index.jpg_offset[run[0]])
        end = int(index.jpg_offset[run[-1]] + index.jpg_size[run[-1]])
        span = read_range(urls[index.shard_of(run[0])], start, end - start)
        cut = [(int(index.jpg_offset[sid]) - start, int(index.jpg_size[sid])) for sid in run]
        return [span[o : o + n] for o, n in cut]

    with ThreadPoolExecutor(max_workers=REMOTE_READ_THREADS) as pool:
        pending = None
        for item in [*batches, None]:  # one batch of look-ahead
            ahead = None
            if item is not None:
                runs = read_runs(index, item[1].tolist())
                ahead = (item[0], runs, [pool.submit(fetch, run) for run in runs])
            if pending is not None:
                got_no, runs, futures = pending
                for run, future in zip(runs, futures, strict=True):
                    for sid, data in zip(run, future.result(), strict=True):
                        yield _sample(index, sid, index.shard_of(sid), got_no, data)
            pending = ahead


def read_runs(index: SampleIndex | WorkerPlan, ids: list[int]) -> list[list[int]]:
    """``ids`` (in order) cut into runs that one ranged GET each reads (see ``_read_remote``)."""
    runs: list[list[int]] = []
    for sid in ids:
        if runs:
            last = runs[-1][-1]
            end = int(index.jpg_offset[last] + index.jpg_size[last])
            gap = int(index.jpg_offset[sid]) - end
            same = index.shard_of(sid) == index.shard_of(last)
            if same and 0 <= gap <= RUN_GAP and end - int(index.jpg_offset[runs[-1][0]]) < RUN_BYTES:
                runs[-1].append(sid)
                continue
        runs.append([sid])
    return runs


def attach_params(samples, params: tuple[np.ndarray, np.ndarray] | None):
    """Stage: each sample's stored view's parameters, when replaying (``params``: sorted sample ids and
    their parameters' rows; two arrays cross to a worker far faster than a dict of small ones)."""
    for sample in samples:
        if params is not None:
            ids, table = params
            sample["params"] = table[int(np.searchsorted(ids, sample["id"]))]
        yield sample


def decode_and_transform(samples, transform: Callable, handler: Callable, seed: int | None = None):
    """Stage: bytes -> PIL RGB -> transformed tensor; a failing sample goes to ``handler``. A sample
    with ``params`` (a stored view) is transformed with them (``transform(img, params)``).

    With ``seed``, torch's RNG is re-seeded at each new batch (``seed + batch number``): a batch's random
    augmentations depend on the batch alone, not on which worker ran it or what it ran before, so a
    mid-epoch resume (and any worker count) reproduces them exactly.
    """
    current = None
    for sample in samples:
        if seed is not None and sample["batch"] != current:
            current = sample["batch"]
            torch.manual_seed(seed + current)
        try:
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                rgb = img.convert("RGB")
                params = sample.get("params")
                sample["image"] = transform(rgb) if params is None else transform(rgb, params)
        except Exception as exc:  # noqa: BLE001 - the handler decides
            if handler(exc, sample):
                sample["image"] = None
            else:
                raise
        yield sample


def collate_planned(samples):
    """Stage: samples -> one batch per planned batch number (skipped samples leave a smaller batch and
    their ids in its ``skipped`` list)."""
    current, rows, skipped = None, [], []
    for sample in samples:
        if current is not None and sample["batch"] != current:
            yield _batch(current, rows, skipped)
            rows, skipped = [], []
        current = sample["batch"]
        if sample["image"] is None:
            skipped.append(sample["id"])
        else:
            rows.append(sample)
    if current is not None:
        yield _batch(current, rows, skipped)


def _batch(batch_no: int, rows: list[dict], skipped: list[int]) -> dict:
    images = torch.stack([r["image"] for r in rows]) if rows else torch.zeros(0)
    return {
        "batch": batch_no,
        "image": images,
        "id": torch.tensor([r["id"] for r in rows], dtype=torch.int64),
        "skipped": skipped,
    }


class WorkerPlan:
    """What a worker needs of the index to read some samples (shard, offset, size, key by sample id),
    for those samples only: what crosses to a worker process, instead of the whole split's index."""

    def __init__(self, index: SampleIndex, ids: np.ndarray):
        ids = [int(i) for i in ids]
        self.shards = index.shards
        self._shard = {i: index.shard_of(i) for i in ids}
        self.jpg_offset = {i: int(index.jpg_offset[i]) for i in ids}
        self.jpg_size = {i: int(index.jpg_size[i]) for i in ids}
        self.keys = {i: index.keys[i] for i in ids}

    def shard_of(self, sample: int) -> int:
        return self._shard[sample]


def worker_context(method: str = "forkserver") -> multiprocessing.context.BaseContext:
    """The context workers start from (``data.worker_start``); the fork server preloads this module."""
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context


class PlannedBatches(IterableDataset):
    """Worker ``w`` of ``n`` reads planned batches ``w, w + n, ...`` (so round-robin keeps order)."""

    def __getstate__(self) -> dict:
        """Pickled for a worker process: the index cut down to the samples still to read (built once
        per epoch, however many workers it is pickled for)."""
        if self._plan is None:
            ids = self.batches[self.first :]
            self._plan = WorkerPlan(self.index, np.concatenate(ids) if ids else np.zeros(0, np.int64))
        return {**self.__dict__, "index": self._plan, "_plan": None}

    def __init__(
        self,
        index: SampleIndex,
        batches: list[np.ndarray],
        first: int,
        transform: Callable,
        seed: int | None,
        params: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.index, self.batches, self.first, self.transform = index, batches, first, transform
        self.seed, self.params = seed, params  # params: the stored views' (ids, rows)
        self._plan: WorkerPlan | None = None  # what __getstate__ sends, built on first use
        #: A fork server's environment is that of its start: a worker applies this process's AWS settings.
        self.env = aws_env() if is_remote(index.root) else {}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            os.environ.update(self.env)
        mine = [(b, self.batches[b]) for b in range(self.first + worker, len(self.batches), workers)]
        pipeline = wds.DataPipeline(
            lambda: iter(mine),
            wds.pipelinefilter(read_samples)(self.index),
            wds.pipelinefilter(attach_params)(self.params),
            wds.pipelinefilter(decode_and_transform)(self.transform, warn_and_count, self.seed),
            collate_planned,
        )
        return iter(pipeline)


class ReferenceLoader(EpochLoader):
    """The torch loader of one split on one rank (see base.py for epochs, remainder and state)."""

    backend = "torch"

    def __init__(self, *args, **kwargs):  # EpochLoader's arguments
        super().__init__(*args, **kwargs)
        self.transform = build_transform(self.cfg, self.train)

    def order(self, epoch: int) -> np.ndarray:
        """The plan after a seeded shuffle buffer (train): the order this loader reads, known upfront."""
        plan = self.rank_plan(epoch)
        return plan.ids[self.planner.reference_order(plan, self.rank)]

    def _raw_batches(self, epoch: int, resume: dict | None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        order = self.order(epoch)
        b = self.batch_size
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        first = resume["batches_done"] if resume else 0
        if first >= len(batches):
            return
        workers = min(self.cfg.threads, len(batches) - first)
        transform, params = self.transform, None
        if self.replay is not None:  # stored views: each read's parameters, by sample id (a pure function)
            transform = ReplayView(self.cfg)
            todo = np.unique(np.concatenate(batches[first:]))
            params = (todo, self.replay.params_of(epoch, todo))
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, self.rank, 2))
        loader = DataLoader(
            PlannedBatches(
                self.index,
                batches,
                first,
                transform,
                epoch_seed(self.cfg.seed, epoch, self.rank, 3) if self.train else None,
                params,
            ),  # fmt: skip
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch,
            pin_memory=self.device.type == "cuda",
            generator=generator,
            multiprocessing_context=worker_context(self.cfg.worker_start) if workers > 0 else None,
        )
        expected = first
        for item in loader:
            if item["batch"] != expected:  # cannot happen with in-order workers; guard the invariant
                raise RuntimeError(f"reference loader: batch {item['batch']} arrived, expected {expected}")
            expected += 1
            if item["skipped"]:  # decode failures: counted now, left out of the plans from the next epoch
                self.skip(dict.fromkeys(item["skipped"], DECODE_ERROR), from_epoch=epoch + 1)
            if item["id"].numel() == 0:
                continue
            # pinned memory on a GPU run, so an asynchronous copy; a no-op on the CPU
            yield item["image"].to(self.device, non_blocking=True), item["id"].numpy()
