"""``flora loaders``: iterate a config's loaders for some epochs and report images/s.

Works alone or under ``torchrun`` (one process per rank; ``gloo`` on CPU, ``nccl`` on GPU), where
the ranks' counts are summed with ``all_reduce`` and, with ``--audit FILE``, every rank's sample ids
of every epoch are gathered to rank 0 and written as JSON (how the two-rank test checks that each
sample is seen exactly once per epoch). The demo runs it on the sample shards.

Leaves out: training (training/), and timing comparisons (benchmarks/loader.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flora.config import ConfigError
from flora.distributed import torchrun_env
from flora.errors import ArgumentParser, fail
from flora.loaders import create_dataloaders
from flora.loaders.index import LoaderError


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora loaders", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML with a data: section")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--audit", type=Path, help="write every epoch's sample ids per rank (JSON)")
    parser.add_argument("overrides", nargs="*", help="data.key=value")
    args = parser.parse_args(argv)
    distributed = torchrun_env().distributed
    try:
        train, val, info = create_dataloaders(args.config, overrides=args.overrides)
    except (ConfigError, LoaderError) as exc:
        return fail("loaders", exc)
    if distributed:
        dist.init_process_group("nccl" if info.device.startswith("cuda") else "gloo")
    lead = info.rank == 0
    if lead:
        print(
            f"loaders: backend={info.backend} device={info.device} world_size={info.world_size} "
            f"classes={info.num_classes} samples={info.samples} "
            f"batches/epoch(rank 0)={info.batches_per_epoch}"
        )
        skipped = {k: v for k, v in info.skipped.items() if v}
        if skipped:
            print(f"loaders: skipped samples (by reason): {skipped}")
    audit: dict = {"world_size": info.world_size, "samples": info.samples, "epochs": []}
    for epoch in range(args.epochs):
        record = {}
        for name, loader in ((val.index.split, val), (train.index.split, train)):
            loader.set_epoch(epoch)
            ids: list[int] = []
            started = time.perf_counter()
            batches = 0
            for batch in loader:
                ids += batch["index"][batch["valid"]].tolist()
                batches += 1
            if batch["image"].is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            counts = torch.tensor([len(ids), batches], dtype=torch.float64)
            if distributed:
                dist.all_reduce(counts)
                gathered: list = [None] * info.world_size
                dist.all_gather_object(gathered, ids)
            else:
                gathered = [ids]
            record[name] = gathered
            if lead:
                print(
                    f"epoch {epoch} {name:>5}: {int(counts[0])} images in {int(counts[1])} batches, "
                    f"{seconds:.2f} s, {counts[0] / seconds:,.0f} images/s (all ranks)"
                )
        audit["epochs"].append(record)
    if lead and (train.skipped_at_runtime or val.skipped_at_runtime):  # found after the scan (this rank)
        print(f"loaders: skipped samples after the runs (by reason): {info.skipped}")
    if lead and args.audit:
        args.audit.write_text(json.dumps(audit))
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
