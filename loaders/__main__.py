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
    parser.add_argument(
        "--stop-after", type=int, metavar="N", help="stop after N training batches of the first epoch run"
    )
    parser.add_argument(
        "--save-state", type=Path, metavar="FILE", help="with --stop-after: every rank's loader state (JSON)"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="FILE",
        help="a --save-state file: go on where it stopped (on any number of ranks and batch size)",
    )
    parser.add_argument("overrides", nargs="*", help="data.key=value")
    args = parser.parse_args(argv)
    if args.save_state and args.stop_after is None:
        return fail("loaders", "--save-state needs --stop-after N (the place to save)")
    distributed = torchrun_env().distributed
    try:
        train, val, info = create_dataloaders(args.config, overrides=args.overrides)
        if args.resume:
            train.load_state_dict(_read_states(args.resume))
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
        print(f"loaders: sampling {sampling_line(info.sampling)}")
    first = train.epoch
    audit: dict = {"world_size": info.world_size, "samples": info.samples, "first_epoch": first, "epochs": []}
    states = None
    for epoch in range(first, args.epochs):
        record = {}
        for name, loader in ((val.index.split, val), (train.index.split, train)):
            loader.set_epoch(epoch)
            ids: list[int] = []
            started = time.perf_counter()
            batches = 0
            stop = args.stop_after if loader is train and epoch == first else None
            for batch in loader:
                ids += batch["index"][batch["valid"]].tolist()
                batches += 1
                if stop is not None and batches >= stop:
                    states = train.state_dict()  # inside the loop: DALI's iterator is alive
                    break
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
        if states is not None:
            break
    if args.save_state and states is not None:
        every: list = [None] * info.world_size
        if distributed:
            dist.all_gather_object(every, states)
        else:
            every = [states]
        if lead:
            args.save_state.write_text(json.dumps(every))
    if lead and (train.skipped_at_runtime or val.skipped_at_runtime):  # found after the scan (this rank)
        print(f"loaders: skipped samples after the runs (by reason): {info.skipped}")
    if lead and args.audit:
        args.audit.write_text(json.dumps(audit))
    if distributed:
        dist.destroy_process_group()
    return 0


def sampling_line(sampling: dict) -> str:
    """``info.sampling`` in one line: the policy and what epoch 0's list realised."""
    cfg, got = sampling["config"], sampling["epoch_0"]
    draws = got["draws_per_species"]
    line = (
        f"policy={cfg['policy']} epoch 0: {got['samples']} draws of {got['distinct_samples']} distinct "
        f"samples, {got['species_seen']}/{got['species']} species drawn, draws per species "
        f"min {draws['min']} median {draws['median']:g} max {draws['max']}"
    )
    if "stream_shares" in got:
        line += " streams " + ", ".join(f"{k} {v:.3f}" for k, v in got["stream_shares"].items())
    return line


def _read_states(path: Path) -> list[dict]:
    try:
        states = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoaderError(f"--resume {path}: cannot read a loader state file ({exc})") from None
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise LoaderError(f"--resume {path}: expected a JSON list of loader states (--save-state's)")
    return states


if __name__ == "__main__":
    sys.exit(main())
