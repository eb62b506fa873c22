"""NVIDIA DALI: the pipelines (train, validation; GPU and CPU) and the loader that runs them per epoch.

Owns the DALI graph and its wiring:

* ``fn.readers.webdataset`` over *filtered* index files written per epoch (index.py's
  ``write_dali_files``; local files also for tars in an object store: DALI reads ``s3://`` tars
  with local index files, one ranged GET per sample's jpg, nothing else of the tar) that list
  exactly this rank's plan (base.py: the epoch's shard order, the rank's cut, less the samples
  that failed the scan's filters or a check since), so DALI and the reference loader read the same
  samples and a sample dropped on one rank moves no other rank's cut; a shuffle buffer of
  ``shuffle_buffer`` (``initial_fill``) for training, ``pad_last_batch`` so an epoch never bleeds
  into the next, and ``name`` = the ``reader_name`` the iterator uses.
* Train: ``decoders.image_random_crop`` (decoding fused with RandomResizedCrop: libjpeg-turbo
  decodes only the crop window on the CPU; nvJPEG / the hardware decoder on ``mixed``), resize,
  rotation, ``color_twist`` (brightness, contrast, saturation, hue), and ``crop_mirror_normalize``
  (flip + mean/std + layout + dtype in one pass). Validation: decode, resize shorter side, center crop.
* Stored views (views.py, ``set_replay``): a ``python_function`` gives each sample's view (box in
  pixels, flip, angle, colour) by ``source_info``; ``decoders.image_slice`` decodes the box.
* ``device: gpu`` puts the decoder on ``mixed`` and every later operator on the GPU;
  ``device: cpu`` runs the same graph on DALI's CPU operators (``device_id=None``).
* Mid-epoch resume with DALI's own checkpointing (``enable_checkpointing``): the iterator's
  ``checkpoints()`` (which accounts for prefetched batches) goes into the loader state; a resumed
  epoch rebuilds its pipeline from that checkpoint and reads exactly the samples not yet returned.
* A sample that does not decode (bytes changed after the scan: DALI stops the pipeline, it has no
  per-sample error policy) does not cost the epoch: the samples of the epoch not yet returned are
  re-checked (recheck.py, ``decode`` level), the bad ones counted as skipped (base.py), and a new
  pipeline reads the rest: every good sample of the plan exactly once, in a new shuffled order. The
  samples returned so far (a bitmap over the plan) travel in the state, so a resumed epoch rebuilds
  the same pipeline. A failure that no re-check explains stays an error.

Each epoch gets a fresh pipeline (the shard order is part of the graph); building one costs well
under a second. Labels and sample ids come from the index, looked up by each sample's
``source_info`` (tar path and byte offset), so no label parsing happens in the graph.

Leaves out: epochs/remainder/state bookkeeping (base.py) and shard selection (index.py).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from flora import store
from flora.errors import one_line
from flora.loaders import views
from flora.loaders.base import EpochLoader
from flora.loaders.config import DataConfig
from flora.loaders.index import LoaderError
from flora.loaders.plan import RankPlan, epoch_seed, pack, unpack
from flora.loaders.recheck import recheck
from flora.loaders.remote import StoreError, dali_s3_check, is_remote
from flora.loaders.views import crop_box

try:  # DALI is a hard dependency in setup.cfg, but the reference loader must work without it
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised only where DALI is not installed
    HAVE_DALI = False

log = logging.getLogger(__name__)
#: Hue in DALI's color_twist is in degrees; torchvision's ColorJitter hue is a fraction of a turn.
DEGREES_PER_TURN = 360.0
#: RandomResizedCrop's attempts before falling back to a center crop (torchvision uses 10 too).
CROP_ATTEMPTS = 10
#: Seed salt of the pipelines that read the rest of an epoch after a decode failure (+1 per failure);
#: clear of the reference loader's salts 1-3.
RECOVERY_SALT = 16
#: Words of DALI's errors that come from its S3 client (the AWS SDK over curl), not from a sample.
STORE_FAILURES = ("curlCode", "S3 Object", "S3 object", "response stream", "AWS")
#: Backoff before a new pipeline reads the rest of an epoch after a failed read from the store (as
#: botocore's standard mode: doubling, capped).
STORE_BACKOFF_S = 0.1
STORE_BACKOFF_MAX_S = 5.0


def _uniform(low: float, high: float):
    """A per-sample draw in [low, high); a constant when the range is empty (DALI rejects [a, a))."""
    return fn.random.uniform(range=[low, high]) if high > low else float(low)


def _resize_rotate(images, size: int, degrees: float, device: str, angle=None):
    """The crop scaled to ``size`` x ``size`` and rotated by U(-degrees, degrees) (or by ``angle``
    degrees, a per-sample CPU value: a stored view) about its centre, as
    one ``warp_affine`` (output -> input map: ``in = c_in + R(a) diag(w/size, h/size) (out - c_out)``).

    Measured on 500x375 photos, 2 CPU threads: resize then rotate 446 img/s, this warp 599 img/s.
    Bilinear without an antialias prefilter: the crop is at most ~2x the output on typical photos.
    """
    shape = images.shape(dtype=types.FLOAT)  # (h, w, c) of each decoded crop
    h, w = shape[0], shape[1]
    if angle is None:
        angle = fn.random.uniform(range=[-degrees, degrees])
    angle = angle * (math.pi / 180.0)
    cos, sin = dmath.cos(angle), dmath.sin(angle)
    sx, sy = w / size, h / size
    m00, m01, m10, m11 = cos * sx, -sin * sy, sin * sx, cos * sy
    centre = size / 2.0
    t0 = w / 2.0 - (m00 * centre + m01 * centre)
    t1 = h / 2.0 - (m10 * centre + m11 * centre)
    # A named argument, so it stays on the CPU whatever the images' device (DALI's rule; the shape of a
    # GPU tensor is itself a CPU value, so nothing here touches the GPU).
    matrix = fn.reshape(fn.cast(fn.stack(m00, m01, t0, m10, m11, t1), dtype=types.FLOAT), shape=[2, 3])
    return fn.warp_affine(
        images, device=device, matrix=matrix, size=[size, size], fill_value=0,
        interp_type=types.INTERP_LINEAR, inverse_map=True,
    )  # fmt: skip


def _resize_and_colour(images, aug, size: int, device: str, view=None):
    """A training crop resized to ``size`` x ``size``, rotated and colour-twisted: by random draws, or
    by a stored view's values (``view``: the replay row, angle at 5, colour factors at 6-9)."""
    if aug.rotate_degrees > 0:  # resize + rotation in one warp: DALI's CPU rotate is its slowest op
        angle = None if view is None else view[5]
        images = _resize_rotate(images, size, aug.rotate_degrees, device, angle=angle)
    else:
        images = fn.resize(
            images, device=device, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR
        )
    if max(aug.brightness, aug.contrast, aug.saturation, aug.hue) > 0:
        if view is None:
            colour = {
                "brightness": _uniform(1.0 - aug.brightness, 1.0 + aug.brightness),
                "contrast": _uniform(1.0 - aug.contrast, 1.0 + aug.contrast),
                "saturation": _uniform(1.0 - aug.saturation, 1.0 + aug.saturation),
                "hue": _uniform(-aug.hue * DEGREES_PER_TURN, aug.hue * DEGREES_PER_TURN),
            }
        else:
            colour = {"brightness": view[6], "contrast": view[7], "saturation": view[8], "hue": view[9]}
        images = fn.color_twist(images, device=device, **colour)
    return images


def define_pipeline(
    cfg: DataConfig,
    train: bool,
    paths: list[str],
    index_paths: list[str],
    shard_id: int,
    num_shards: int,
    gpu: bool,
    device_id: int | None,
    seed: int,
    checkpoint: bytes | None = None,
    replay=None,
):
    """The DALI pipeline of one epoch, defined but not built.

    One definition for both devices: ``gpu`` changes only the operators' ``device`` (``mixed`` for
    the decoder, ``gpu`` after it); every argument, layout and dtype is the same. Named arguments
    (random draws, the warp matrix) are CPU values on both, as DALI requires.

    ``replay`` (stored views, views.py): a CPU batch function, (source_info rows, image shapes) -> a row
    per sample ``[x0, y0, w, h, flip, angle, brightness, contrast, saturation, hue in degrees]``, that
    replaces the random draws: the box is decoded by ``decoders.image_slice`` (train and validation).
    """
    aug = cfg.augment
    decoder_args = cfg.decoder.dali_args()  # DALI's CPU decoder ignores these (mixed-only settings)
    size = cfg.image_size
    out_dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT
    layout = "HWC" if cfg.channels_last else "CHW"
    op_device = "gpu" if gpu else "cpu"
    decoder_device = "mixed" if gpu else "cpu"

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpg = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["jpg"],
            dtypes=[types.UINT8],
            name="reader",
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=train,
            initial_fill=cfg.shuffle_buffer,
            pad_last_batch=True,
            stick_to_shard=True,
            seed=seed,
        )
        source = fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0)
        if replay is not None:
            view = fn.python_function(
                source, fn.peek_image_shape(jpg), function=replay, batch_processing=True
            )
            box = fn.cast(view[0:4], dtype=types.INT32)  # absolute pixels: x0, y0, w, h
            images = fn.decoders.image_slice(
                jpg,
                device=decoder_device,
                output_type=types.RGB,
                start=box[0:2],
                shape=box[2:4],
                **decoder_args,
            )
            images = _resize_and_colour(images, aug, size, op_device, view)
            mirror = fn.cast(view[4], dtype=types.INT32)
            crop = None
        elif train:
            images = fn.decoders.image_random_crop(
                jpg,
                device=decoder_device,
                output_type=types.RGB,
                random_area=list(aug.scale),
                random_aspect_ratio=list(aug.ratio),
                num_attempts=CROP_ATTEMPTS,
                **decoder_args,
            )
            images = _resize_and_colour(images, aug, size, op_device)
            mirror = fn.random.coin_flip(probability=aug.hflip)
            crop = None
        else:
            images = fn.decoders.image(jpg, device=decoder_device, output_type=types.RGB, **decoder_args)
            images = fn.resize(
                images, device=op_device, resize_shorter=cfg.val_resize, interp_type=types.INTERP_LINEAR
            )
            mirror, crop = 0, (size, size)
        images = fn.crop_mirror_normalize(
            images,
            device=op_device,
            dtype=out_dtype,
            output_layout=layout,
            crop=crop,
            crop_pos_x=0.5,
            crop_pos_y=0.5,
            mean=[255.0 * m for m in aug.mean],
            std=[255.0 * s for s in aug.std],
            mirror=mirror,
        )
        return images, source

    pipe = pipeline(
        batch_size=cfg.batch_for(train),
        num_threads=cfg.threads,
        device_id=device_id if gpu else None,
        seed=seed,
        prefetch_queue_depth=cfg.prefetch,
        checkpoint=checkpoint,
    )
    return pipe


def build_pipeline(*args, **kwargs):
    """The DALI pipeline of one epoch, built and ready to run (``define_pipeline``'s arguments)."""
    pipe = define_pipeline(*args, **kwargs)
    pipe.build()
    return pipe


class DaliLoader(EpochLoader):
    """The DALI loader of one split on one rank (see base.py for epochs, remainder and state)."""

    backend = "dali"

    def __init__(self, *args, **kwargs):  # EpochLoader's arguments
        if not HAVE_DALI:
            raise LoaderError(
                "backend 'dali' needs nvidia-dali: pip install 'flora[dali]' (CUDA 12; nvidia-dali-cuda130 "
                "for CUDA 13); or use backend: torch"
            )
        super().__init__(*args, **kwargs)
        if is_remote(self.index.root):
            try:
                dali_s3_check(str(self.index.root))
            except StoreError as exc:
                raise LoaderError(str(exc)) from None
        self.gpu = self.device.type == "cuda"
        self._tmp = Path(tempfile.mkdtemp(prefix="flora-dali-idx-"))
        self._lookup = self.index.lookup()
        self._iterator = None
        self._reader_done = False
        self._progress: dict | None = None  # the running epoch: seen, base, recoveries
        self._passes = 0  # pipelines built so far: each gets its own folder of index files

    def close(self) -> None:
        self._iterator = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self):  # the filtered index files are small, but leave nothing behind
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down shutil
            self.close()

    def _raw_batches(self, epoch: int, resume: dict | None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        if resume and resume.get("exhausted"):
            return  # saved after this rank's last real batch (pad policy): only filler is left
        checkpoint = (
            base64.b64decode(resume["dali_checkpoint"]) if resume and resume.get("dali_checkpoint") else None
        )
        if resume and checkpoint is None:
            raise LoaderError("cannot resume a DALI loader mid-epoch without its 'dali_checkpoint'")
        plan = self.plan(epoch)
        if not len(plan):
            return
        state = resume or {}
        # seen: the plan's samples returned so far this epoch; base: those returned before the running
        # pipeline started (it reads the rest of the plan, less the samples found bad this epoch).
        mark = _Marker(plan)
        progress = {
            "seen": unpack(state.get("dali_seen"), len(plan)),
            "base": unpack(state.get("dali_base"), len(plan)),
            "recoveries": int(state.get("dali_recoveries", 0)),
        }
        self._progress = progress
        store_failures, progress_at = 0, -1  # failed reads from the store since samples last came out
        while True:
            ids = plan
            if progress["recoveries"]:
                ids = plan[~progress["base"] & ~np.isin(plan, self._found_during(epoch))]
            try:
                for images, batch_ids in self._run(epoch, ids, progress["recoveries"], checkpoint):
                    mark(progress["seen"], batch_ids)
                    yield images, batch_ids
                return
            except _DecodeFailure as failure:
                if is_remote(self.index.root) and any(m in str(failure) for m in STORE_FAILURES):
                    # Not a damaged sample (no re-check): DALI's S3 reader gives up on a throttled or
                    # dropped read (its SDK cannot retry a GET whose body it streams into DALI's buffer),
                    # so the rest of the epoch is read by a new pipeline, after a backoff.
                    returned = int(progress["seen"].sum())
                    store_failures = store_failures + 1 if returned == progress_at else 1
                    progress_at = returned
                    if store_failures >= store.MAX_ATTEMPTS:
                        raise LoaderError(
                            f"DALI could not read the object store in epoch {epoch} of split "
                            f"{self.index.split!r} (rank {self.rank}; {store_failures} pipelines in a row "
                            f"got no sample out): {failure}"
                        ) from None
                    log.warning("DALI: a read from the object store failed (%s); the epoch goes on",
                                one_line(failure)[-200:])  # fmt: skip
                    time.sleep(min(STORE_BACKOFF_S * 2**store_failures, STORE_BACKOFF_MAX_S))
                    progress["base"] = progress["seen"].copy()
                    progress["recoveries"] += 1
                    checkpoint = None
                    continue
                rest = plan[~progress["seen"] & ~np.isin(plan, self._found_during(epoch))]
                bad = recheck(self.index, rest, "decode", self.cfg.threads)
                if not bad:
                    raise LoaderError(
                        f"DALI failed in epoch {epoch} of split {self.index.split!r} (rank {self.rank}): "
                        f"{failure.error}\nno sample of the epoch still to read fails a re-check (sha256 "
                        "where the shards record one, else a PIL decode), so it is not a damaged sample"
                    ) from failure.error
                self.skip(bad, from_epoch=epoch + 1)
                progress["base"] = progress["seen"].copy()
                progress["recoveries"] += 1
                checkpoint = None

    def _found_during(self, epoch: int) -> list[int]:
        """Samples found bad while ``epoch`` ran (left out of the plans from the next one on)."""
        return [sid for sid, (_reason, first) in self.runtime_skips.items() if first == epoch + 1]

    def _run(self, epoch: int, ids: np.ndarray, recoveries: int, checkpoint: bytes | None):
        """One pipeline over ``ids`` (in this order, before its shuffle buffer): (images, sample ids)
        batches; a failure inside DALI is a ``_DecodeFailure``."""
        self._passes += 1
        folder = self._tmp / f"pass{self._passes:06d}"
        paths, idx = self.index.write_dali_files(ids, folder)
        pipe = iterator = None
        try:
            try:  # building reads the tars' sizes, the iterator runs the first batch: either may fail
                pipe = build_pipeline(
                    self.cfg,
                    self.train,
                    paths,
                    idx,
                    shard_id=0,  # the files hold this rank's plan only
                    num_shards=1,
                    gpu=self.gpu,
                    device_id=self.device.index if self.gpu else None,
                    seed=epoch_seed(
                        self.cfg.seed, epoch, self.rank, RECOVERY_SALT + recoveries if recoveries else 0
                    ),
                    checkpoint=checkpoint,
                    replay=self._replay_function(epoch) if self.replay is not None else None,
                )
                iterator = DALIGenericIterator(
                    [pipe],
                    ["image", "source"],
                    reader_name="reader",
                    last_batch_policy=LastBatchPolicy.PARTIAL,
                    auto_reset=False,
                )
            except RuntimeError as exc:
                raise _DecodeFailure(exc) from exc
            self._iterator = iterator
            self._reader_done = False
            while True:
                try:
                    out = next(iterator)[0]
                except StopIteration:
                    self._reader_done = True
                    return
                except RuntimeError as exc:
                    raise _DecodeFailure(exc) from exc
                ids_out = self._ids(out["source"])
                images = out["image"]
                if self.cfg.channels_last:
                    images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels_last
                yield images, ids_out
        finally:
            self._iterator = None
            del iterator, pipe
            shutil.rmtree(folder, ignore_errors=True)

    def _replay_function(self, epoch: int):
        """The pipeline's ``replay`` function for ``epoch`` (see ``define_pipeline``): each sample's stored
        view, by its ``source_info``, with the crop box for its image's shape (views.py's ``crop_box``)."""
        replay = self.replay

        def view_rows(sources: list[np.ndarray], shapes: list[np.ndarray]) -> list[np.ndarray]:
            out = []
            for p, shape in zip(replay.params_of(epoch, self._ids(sources)), shapes, strict=True):
                box = crop_box(p, int(shape[0]), int(shape[1]))
                colour = p[[views.BRIGHTNESS, views.CONTRAST, views.SATURATION]]
                out.append(np.array([*box, p[views.FLIP], p[views.ANGLE], *colour,
                                     p[views.HUE] * DEGREES_PER_TURN], dtype=np.float32))  # fmt: skip
            return out

        return view_rows

    def _ids(self, source) -> np.ndarray:
        """Sample ids of a batch's padded ``source_info`` rows (a tensor, or a list of byte arrays)."""
        rows = source.cpu().numpy() if isinstance(source, torch.Tensor) else source
        ids = np.empty(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            path, offset, _name = row.tobytes().rstrip(b"\0").rsplit(b":", 2)
            ids[i] = self._lookup[(path, int(offset))]
        return ids

    def _consumed(self, state: dict, length: int) -> np.ndarray:
        """Positions an old rank's state had consumed: the reads its iterator returned (``dali_seen``),
        all of its plan once it was exhausted, and its segment's base."""
        plan: RankPlan = self._old_plan(state, length)
        if state.get("exhausted"):
            mine = plan.positions
        elif not int(state["batches_done"]):
            mine = plan.positions[:0]
        elif state.get("dali_seen"):
            mine = plan.positions[unpack(state["dali_seen"], len(plan.ids))]
        else:
            raise LoaderError(f"cannot take over rank {state['rank']}'s DALI state: it has no 'dali_seen'")
        return np.concatenate([self._old_base(state, length), mine])

    def _subclass_state(self) -> dict:
        if self._iterator is None:
            if not self._reader_done:
                raise LoaderError(
                    "DALI loader: state_dict() mid-epoch needs the epoch's iterator alive; take the state "
                    "inside the loop over the batches, before leaving it"
                )
            return {"exhausted": True}
        (checkpoint,) = self._iterator.checkpoints()
        if isinstance(checkpoint, str):
            checkpoint = checkpoint.encode()
        state = {"dali_checkpoint": base64.b64encode(checkpoint).decode("ascii")}
        progress = self._progress
        if progress is not None:
            state["dali_seen"] = pack(progress["seen"])
            if progress["recoveries"]:
                state.update(dali_base=pack(progress["base"]), dali_recoveries=progress["recoveries"])
        return state


class _DecodeFailure(Exception):
    """DALI stopped inside a pipeline (typically a sample that does not decode)."""

    def __init__(self, error: RuntimeError):
        super().__init__(str(error))
        self.error = error


class _Marker:
    """Marks returned samples in a plan's bitmap: a sample the plan holds k times (drawn with
    replacement) has k positions, and each return marks its first unmarked one, so the marked
    positions of a sample are always its first ones (a state's bitmap says which reads are left)."""

    def __init__(self, plan: np.ndarray):
        self.plan, self.sorter = plan, np.argsort(plan, kind="stable")
        self.repeats = len(np.unique(plan)) < len(plan)

    def __call__(self, seen: np.ndarray, ids: np.ndarray) -> None:
        first = np.searchsorted(self.plan, ids, sorter=self.sorter)
        if not self.repeats:
            seen[self.sorter[first]] = True
            return
        for j in first.tolist():
            while seen[self.sorter[j]]:
                j += 1
            seen[self.sorter[j]] = True
