"""Cached soft labels: the teachers' top-k mixture per training sample, computed once, kept in the cache root.

Owns the cache (``<cache root>/soft_labels/<store>/<key>/`` with ``meta.json`` and one
``shards/<shard id>.npz`` per shard, or under ``distill.cache.dir``; cache/derived.py), its key (a hash
of everything the values depend on: each teacher checkpoint's path, size and mtime, weights,
temperature, mixing rule, top-k, the student's class mapping, the data selection and the view's
size/normalisation: change any and a new cache is built), the **per-shard** files (named by the
shard's manifest sha256, its content: a shard an incremental build kept keeps its rows, so soft
labels for a grown store are computed for the new shards only; a shard without a recorded sha256 is
named by its path, size and mtime), building the missing ones (every rank predicts its share of
those shards' samples on the *fixed validation view*, the shares are merged and checked, rank 0
writes each shard's file atomically), and ``SoftLabels.lookup`` (sample ids -> dense mixture rows for
a batch). A shard's file holds its samples' rows; tombstoned samples are not in the index, so
their rows are simply not looked up.

Top-k: the mixture's ``top_k`` largest probabilities per sample, renormalised to sum 1 over the kept
classes; with ``top_k`` >= the class count the cache equals the online mixture of that view.

Stored views (``distill.cache.views: N``, N >= 1; Fast Knowledge Distillation's idea): instead of the
validation view, N augmented views per sample, their parameters drawn per sample key from
``data.augment``'s ranges (loaders/views.py's ``draw``: crop box, flip, rotation, colour). Building
runs the teachers N times over the shards to compute, each pass a validation loader that *replays*
view ``v`` of every sample; a shard's file then holds ``classes``/``probs`` of shape [samples, N, k] and
``views`` [samples, N, fields], the parameters themselves. Training from the cache sets the training
loader to replay the stored views (``SoftLabels.replay``): each read uses view ``(h(key) + epoch) mod
N`` and its batch says which (``batch["view"]``), so ``lookup`` returns the teachers' opinion of the
very pixels the student sees. The key adds N, the augmentation's ranges and the data seed; a cache of
N = 0 keeps its key of before.

``flora soft-labels --config config/student.yaml`` precomputes it (also under torchrun);
training with ``distill.soft_labels: cached`` builds it when missing.

Leaves out: the teachers and the mixing (distill.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from flora.errors import ArgumentParser, fail
from flora.io import OverlapError, refuse_overlap
from flora.loaders.backends import loader_class
from flora.loaders.index import SampleIndex
from flora.loaders.views import FIELDS, Replay, draw
from flora.sharding.cache.derived import derived_dir
from flora.sharding.format.reader import tar_stamp
from flora.training.distributed import Dist

log = logging.getLogger(__name__)

FORMAT = 2  # 2: one file per shard
SHARDS_DIR = "shards"


class SoftLabels:
    """Top-k mixtures of one split's samples, addressable by the loader's sample ids (and, with stored
    views, by the view: ``classes``/``probs`` hold ``views`` consecutive rows per sample)."""

    def __init__(
        self,
        classes: torch.Tensor,
        probs: torch.Tensor,
        rows: torch.Tensor,
        path: Path,
        computed: int = 0,
        params: np.ndarray | None = None,
    ):
        self.classes, self.probs, self.rows, self.path = classes, probs, rows, path
        self.computed = computed  # rows the teachers computed in this call (0: every shard was cached)
        #: Stored views' parameters [cached samples, views, fields] (None: the validation view).
        self.params = params
        self.views = 0 if params is None else params.shape[1]

    def to(self, device) -> SoftLabels:
        moved = (self.classes.to(device), self.probs.to(device), self.rows.to(device))
        return SoftLabels(*moved, self.path, self.computed, self.params)

    def replay(self, keys: list[str], seed: int) -> Replay:
        """What the training loader replays: the stored views of its samples (``keys``: its index's keys,
        in sample-id order), each sample starting at a view of its own (views.py)."""
        if self.params is None:
            raise RuntimeError(f"soft-label cache {self.path} has no stored views (distill.cache.views: 0)")
        return Replay.for_keys(self.params[self.rows.cpu().numpy()], keys, seed)

    def lookup(self, index: torch.Tensor, num_classes: int, view: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.rows[index.to(self.rows.device)]
        if bool((rows < 0).any()):
            raise RuntimeError(
                f"soft-label cache {self.path} has no entry for some samples; delete it to rebuild"
            )
        if self.views:
            if view is None:
                raise RuntimeError(
                    f"soft-label cache {self.path} holds {self.views} stored views per sample, and the batch "
                    "does not say which it is: the training loader must replay them (SoftLabels.replay)"
                )
            rows = rows * self.views + view.to(rows.device)
        out = torch.zeros(len(rows), num_classes, device=self.probs.device)
        return out.scatter_(1, self.classes[rows], self.probs[rows]).to(index.device)


def cache_key(cfg, index: SampleIndex) -> str:
    """The settings the values depend on (not the samples: those are per shard file)."""
    distill, data = cfg.distill, cfg.data
    teachers = []
    for t in distill.teachers:
        path = Path(t.checkpoint).resolve()
        stat = path.stat()
        teachers.append([str(path), stat.st_size, stat.st_mtime_ns, t.weight])
    material = {
        "format": FORMAT,
        "teachers": teachers,
        "temperature": distill.temperature,
        "mixing": distill.mixing,
        "top_k": distill.cache.top_k,
        "class_mapping": sorted(index.class_mapping.items()),
        "selection": [data.region_filter, data.label_space, data.production_only],
        "view": [data.image_size, data.augment.crop_pct, data.augment.mean, data.augment.std],
    }
    views = distill.cache.views
    if views:  # the stored views: their count, the ranges they are drawn from, the seed of the draw
        a = data.augment
        ranges = [a.scale, a.ratio, a.hflip, a.rotate_degrees, a.brightness, a.contrast, a.saturation, a.hue]
        material["views"] = [views, ranges, data.seed, list(FIELDS)]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def shard_id(shard) -> str:
    """A shard's file name in the cache: its manifest sha256 (content), else its path, size and mtime
    (a tar in an object store: its URL, size and ETag)."""
    if shard.sha256:
        return shard.sha256[:32]
    size, version = tar_stamp(shard.path)
    return hashlib.sha256(f"{shard.path}|{size}|{version}".encode()).hexdigest()[:32]


def cache_dir(cfg) -> Path:
    """``distill.cache.dir``, else ``soft_labels/`` under the cache root (never inside the shards)."""
    if cfg.distill.cache.dir:
        return Path(cfg.distill.cache.dir)
    return derived_dir("soft_labels", cfg.data.shards, cfg.data.cache_root)


@torch.no_grad()
def compute_rank_share(
    cfg, mixer, index: SampleIndex, rank: int, world_size: int, device, replay: Replay | None = None
) -> dict:
    """This rank's top-k mixtures over its share of ``index``'s samples, on the fixed validation view
    (or, with ``replay``, on the stored view it fixes)."""
    loader = loader_class(cfg.data.backend)(index, cfg.data, False, rank, world_size, device)
    loader.set_replay(replay)
    k = min(cfg.distill.cache.top_k, mixer.num_classes)
    keys, classes, probs = [], [], []
    mixer.eval()
    for batch in loader:
        keep = batch["valid"]
        m = mixer(batch["image"], batch["label"])[keep]
        top = m.topk(k, dim=1)
        p = top.values / top.values.sum(dim=1, keepdim=True).clamp_min(1e-12)
        ids = batch["index"][keep].cpu().numpy()
        keys += [loader.index.keys[i] for i in ids]
        classes.append(top.indices.to(torch.int32).cpu())
        probs.append(p.float().cpu())
    loader.close()
    empty_c, empty_p = torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return {
        "keys": keys,
        "classes": torch.cat(classes) if classes else empty_c,
        "probs": torch.cat(probs) if probs else empty_p,
    }


def ensure_cache(cfg, mixer, index: SampleIndex, device, ddp=None) -> SoftLabels:
    """The cache for ``cfg`` and ``index``, its missing shards built now, loaded on ``device``."""

    ddp = ddp or Dist()
    refuse_overlap("soft-labels", cache_dir(cfg), {"data.shards": cfg.data.shards})
    folder = cache_dir(cfg) / cache_key(cfg, index)
    files = [folder / SHARDS_DIR / f"{shard_id(s)}.npz" for s in index.shards]
    missing = [i for i, path in enumerate(files) if not path.is_file()]
    computed = int(sum(index.bounds[i + 1] - index.bounds[i] for i in missing))
    views = cfg.distill.cache.views
    if missing:
        if ddp.main:
            log.info("soft-label cache %s: %d of %d shards to compute (%d samples%s)",
                     folder, len(missing), len(files), computed,
                     f", {views} stored views each" if views else "")  # fmt: skip
        sub = index.subset(missing)
        params = draw(sub.keys, views, cfg.data.augment, cfg.data.seed) if views else None
        passes = []  # per view (one pass on the validation view): [len(sub), k] in sub's order
        for v in range(max(views, 1)):
            replay = Replay.for_keys(params, sub.keys, cfg.data.seed, fixed=v) if views else None
            share = compute_rank_share(cfg, mixer, sub, ddp.rank, ddp.world_size, device, replay)
            shares = ddp.gather(share)
            if ddp.main:
                passes.append(_in_order(shares, sub))
        if ddp.main:
            classes = torch.stack([c for c, _ in passes], 1) if views else passes[0][0]
            probs = torch.stack([p for _, p in passes], 1) if views else passes[0][1]
            _write(folder, [files[i] for i in missing], sub, classes, probs, params, cfg)
        ddp.barrier()
    return load_cache(folder, files, index, computed).to(device)


def _in_order(shares: list[dict], sub: SampleIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's share of one pass, merged and checked, in ``sub``'s sample order."""
    keys = [k for s in shares for k in s["keys"]]
    if sorted(keys) != sorted(sub.keys) or len(set(keys)) != len(keys):
        raise RuntimeError(f"soft-label cache: the ranks produced {len(keys)} entries for {len(sub)} samples")
    row_of = {k: i for i, k in enumerate(keys)}
    order = torch.tensor([row_of[k] for k in sub.keys], dtype=torch.long)
    classes = torch.cat([s["classes"] for s in shares])[order]
    return classes, torch.cat([s["probs"] for s in shares])[order]


def _write(
    folder: Path, files: list[Path], sub: SampleIndex, classes: torch.Tensor, probs: torch.Tensor,
    params: np.ndarray | None, cfg,
) -> None:  # fmt: skip
    """One file per shard of ``sub`` (``files[i]`` for ``sub.shards[i]``), each written atomically;
    ``classes``/``probs`` (and the stored views' ``params``) in ``sub``'s sample order."""
    try:
        (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"soft-label cache: cannot create {folder} ({exc}); set distill.cache.dir"
        ) from exc
    meta = {
        "format": FORMAT,
        "top_k": int(classes.shape[1]),
        "temperature": cfg.distill.temperature,
        "mixing": cfg.distill.mixing,
        "teachers": [{"checkpoint": t.checkpoint, "weight": t.weight} for t in cfg.distill.teachers],
        "view": "validation transform (resize shorter side, center crop) at the student's image size",
    }
    if params is not None:
        meta["view"] = (
            f"{params.shape[1]} stored augmented views per sample (loaders/views.py), parameters in each "
            "file's 'views' array: " + ", ".join(FIELDS)
        )
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    for n, path in enumerate(files):
        lo, hi = int(sub.bounds[n]), int(sub.bounds[n + 1])
        arrays = {
            "keys": np.array(sub.keys[lo:hi]),
            "classes": classes[lo:hi].numpy(),
            "probs": probs[lo:hi].numpy(),
        }
        if params is not None:
            arrays["views"] = params[lo:hi]
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def load_cache(folder: Path, files: list[Path], index: SampleIndex, computed: int = 0) -> SoftLabels:
    """The per-shard files of ``index``'s shards, concatenated, with each sample's row: looked up in
    its own shard's file (a key tombstoned in an older shard, whose file keeps its old row, may be
    live in a newer one)."""
    classes, probs, params, found, start = [], [], [], [], 0
    for n, path in enumerate(files):
        with np.load(path, allow_pickle=False) as f:
            position = {str(k): start + i for i, k in enumerate(f["keys"])}
            c, p = f["classes"], f["probs"]
            if c.ndim == 3:  # stored views: [samples, views, k] -> views consecutive rows per sample
                params.append(f["views"])
                c, p = c.reshape(-1, c.shape[-1]), p.reshape(-1, p.shape[-1])
            classes.append(torch.from_numpy(c).long())
            probs.append(torch.from_numpy(p))
        start += len(position)
        found += [position.get(k, -1) for k in index.keys[index.bounds[n] : index.bounds[n + 1]]]
    rows = torch.tensor(found, dtype=torch.long)
    missing = int((rows < 0).sum())
    if missing:
        raise RuntimeError(
            f"soft-label cache {folder} lacks {missing} of the split's samples; delete it to rebuild"
        )
    views = np.concatenate(params) if params else None
    if views is not None and len(views) != start:
        raise RuntimeError(f"soft-label cache {folder} mixes files with and without stored views; delete it")
    return SoftLabels(torch.cat(classes), torch.cat(probs), rows, folder, computed, views)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from flora.config import ConfigError
    from flora.loaders import create_dataloaders
    from flora.loaders.index import LoaderError
    from flora.training.config import load_experiment
    from flora.training.distributed import destroy_distributed, init_distributed
    from flora.training.models import ModelError
    from flora.training.teachers import build_mixer

    parser = ArgumentParser(prog=prog or "flora soft-labels", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a student config (objective.kind: distill)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        cfg = load_experiment(args.config, args.overrides)
        if cfg.distill is None:
            raise ConfigError("the config has no distill section")
        ddp = init_distributed(cfg.data.device)
        train, _, info = create_dataloaders(cfg.data, rank=ddp.rank, world_size=ddp.world_size)
        mixer = build_mixer(cfg.distill, info).to(info.device)
        cache = ensure_cache(cfg, mixer, train.index, torch.device(info.device), ddp)
    except (ConfigError, LoaderError, ModelError, RuntimeError, FileNotFoundError, OverlapError) as exc:
        return fail("soft-labels", exc)
    finally:
        destroy_distributed()
    if ddp.main:
        print(
            f"soft labels: {cache.path} ({len(cache.rows)} samples, {cache.computed} computed now,"
            f" top-{cache.classes.shape[1]}{f', {cache.views} stored views each' if cache.views else ''})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
