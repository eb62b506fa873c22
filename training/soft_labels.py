"""Cached soft labels: the teachers' top-k mixture per training sample, computed once, kept in the cache root.

Owns the cache (``<cache root>/soft_labels/<store>/<key>/soft_labels.npz`` + ``meta.json``, or
under ``distill.cache.dir``; flora/cache.py), its key (a hash of everything the values depend on:
each teacher checkpoint's path, size and mtime, weights, temperature, mixing rule, top-k, the
student's class mapping, the data selection and the view's size/normalisation, and the split's
sample keys: change any and a new cache is built), building it (every rank predicts its share of
the split on the *fixed validation view*, the shares are merged and checked, rank 0 writes
atomically), and ``SoftLabels.lookup`` (sample ids -> dense mixture rows for a batch).

Top-k: the mixture's ``top_k`` largest probabilities per sample, renormalised to sum 1 over the kept
classes; with ``top_k`` >= the class count the cache equals the online mixture of that view.

``python -m training.soft_labels --config config/student.yaml`` precomputes it (also under torchrun);
training with ``distill.soft_labels: cached`` builds it when missing.

Leaves out: the teachers and the mixing (distill.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from flora.cache import derived_dir
from flora.errors import fail
from loaders.factory import make_loader
from loaders.index import SampleIndex

from .distributed import Dist

log = logging.getLogger(__name__)

FORMAT = 1


class SoftLabels:
    """Top-k mixtures of one split's samples, addressable by the loader's sample ids."""

    def __init__(self, classes: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, path: Path):
        self.classes, self.probs, self.rows, self.path = classes, probs, rows, path

    def to(self, device) -> SoftLabels:
        return SoftLabels(self.classes.to(device), self.probs.to(device), self.rows.to(device), self.path)

    def lookup(self, index: torch.Tensor, num_classes: int) -> torch.Tensor:
        rows = self.rows[index.to(self.rows.device)]
        if bool((rows < 0).any()):
            raise RuntimeError(
                f"soft-label cache {self.path} has no entry for some samples; delete it to rebuild"
            )
        out = torch.zeros(len(rows), num_classes, device=self.probs.device)
        return out.scatter_(1, self.classes[rows], self.probs[rows]).to(index.device)


def cache_key(cfg, index: SampleIndex) -> str:
    distill, data = cfg.distill, cfg.data
    teachers = []
    for t in distill.teachers:
        path = Path(t.checkpoint).resolve()
        stat = path.stat()
        teachers.append([str(path), stat.st_size, stat.st_mtime_ns, t.weight])
    keys = hashlib.sha256("\n".join(index.keys).encode()).hexdigest()
    material = {
        "format": FORMAT,
        "teachers": teachers,
        "temperature": distill.temperature,
        "mixing": distill.mixing,
        "top_k": distill.cache.top_k,
        "class_mapping": sorted(index.class_mapping.items()),
        "shards": str(Path(data.shards).resolve()),
        "split": index.split,
        "selection": [data.region_filter, data.label_space, data.production_only],
        "view": [data.image_size, data.augment.crop_pct, data.augment.mean, data.augment.std],
        "samples": keys,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(cfg) -> Path:
    """``distill.cache.dir``, else ``soft_labels/`` under the cache root (never inside the shards)."""
    if cfg.distill.cache.dir:
        return Path(cfg.distill.cache.dir)
    return derived_dir("soft_labels", cfg.data.shards, cfg.data.cache_root)


@torch.no_grad()
def compute_rank_share(cfg, mixer, index_split: str, rank: int, world_size: int, device) -> dict:
    """This rank's top-k mixtures over its share of the split, on the fixed validation view."""
    loader = make_loader(cfg.data, index_split, False, rank, world_size, device)
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
    """The cache for ``cfg`` and ``index`` (built now if missing), loaded on ``device``."""

    ddp = ddp or Dist()
    key = cache_key(cfg, index)
    folder = cache_dir(cfg) / key
    data_file = folder / "soft_labels.npz"
    if not data_file.is_file():
        if ddp.main:
            log.info("building the soft-label cache %s (%d samples)", folder, len(index))
        share = compute_rank_share(cfg, mixer, index.split, ddp.rank, ddp.world_size, device)
        shares = ddp.gather(share)
        if ddp.main:
            keys = [k for s in shares for k in s["keys"]]
            if sorted(keys) != sorted(index.keys) or len(set(keys)) != len(keys):
                raise RuntimeError(
                    f"soft-label cache: the ranks produced {len(keys)} entries for {len(index)} samples"
                )
            _write(
                folder,
                keys,
                torch.cat([s["classes"] for s in shares]),
                torch.cat([s["probs"] for s in shares]),
                cfg,
            )
        ddp.barrier()
    return load_cache(data_file, index).to(device)


def _write(folder: Path, keys: list[str], classes: torch.Tensor, probs: torch.Tensor, cfg) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"soft-label cache: cannot create {folder} ({exc}); set distill.cache.dir"
        ) from exc
    tmp = folder / "soft_labels.tmp.npz"
    np.savez(tmp, keys=np.array(keys), classes=classes.numpy(), probs=probs.numpy())
    meta = {
        "format": FORMAT,
        "samples": len(keys),
        "top_k": int(classes.shape[1]),
        "temperature": cfg.distill.temperature,
        "mixing": cfg.distill.mixing,
        "teachers": [{"checkpoint": t.checkpoint, "weight": t.weight} for t in cfg.distill.teachers],
        "view": "validation transform (resize shorter side, center crop) at the student's image size",
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / "soft_labels.npz")


def load_cache(path: Path, index: SampleIndex) -> SoftLabels:
    with np.load(path, allow_pickle=False) as f:
        keys, classes, probs = f["keys"], torch.from_numpy(f["classes"]).long(), torch.from_numpy(f["probs"])
    position = {str(k): i for i, k in enumerate(keys)}
    rows = torch.tensor([position.get(k, -1) for k in index.keys], dtype=torch.long)
    missing = int((rows < 0).sum())
    if missing:
        raise RuntimeError(
            f"soft-label cache {path} lacks {missing} of the split's samples; delete it to rebuild"
        )
    return SoftLabels(classes, probs, rows, path)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from flora.config import ConfigError
    from loaders import create_dataloaders
    from loaders.index import LoaderError

    from .config import load_experiment
    from .distributed import destroy_distributed, init_distributed
    from .models import ModelError
    from .teachers import build_mixer

    parser = argparse.ArgumentParser(
        prog=prog or "python -m training.soft_labels", description=__doc__.splitlines()[0]
    )
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
    except (ConfigError, LoaderError, ModelError, RuntimeError, FileNotFoundError) as exc:
        return fail("soft-labels", exc)
    finally:
        destroy_distributed()
    if ddp.main:
        print(f"soft labels: {cache.path} ({len(cache.rows)} samples, top-{cache.classes.shape[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
