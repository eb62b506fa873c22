"""``torchrun --nproc_per_node=N --no-python flora train --config config/teacher_global.yaml [k=v ...]``.

Also ``flora train`` for one process. Multi-node: torchrun's own rendezvous
(``--nnodes``, ``--rdzv-endpoint``...); this script only reads the environment torchrun sets.
``--resume`` continues ``runs/<name>/last_checkpoint.pt``; ``--stop-after N`` stops cleanly after N
optimizer steps with a checkpoint written (a job slot ending, a preemption drill).

Leaves out: everything the loop does (loop.py); this file parses, logs and reports.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from flora.config import ConfigError
from flora.errors import ArgumentParser, fail
from flora.io import FolderError, OverlapError
from flora.loaders.index import LoaderError
from flora.training.checkpoint import CheckpointError
from flora.training.config import load_experiment
from flora.training.loop import Trainer, TrainingError, destroy_distributed
from flora.training.models import ModelError

EXPECTED_ERRORS = (
    ConfigError, LoaderError, TrainingError, ModelError, CheckpointError, FileNotFoundError, OverlapError,
    FolderError,
)  # fmt: skip


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or "flora train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (config/teacher_global.yaml ...)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name>/last_checkpoint.pt")
    parser.add_argument("--stop-after", type=int, help="stop after this many optimizer steps (checkpointed)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2 run.name=x")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # torchrun sets it; the logs say which rank spoke
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        cfg = load_experiment(args.config, args.overrides)
        trainer = Trainer(cfg, resume=args.resume, stop_after=args.stop_after)
        summary = trainer.fit()
    except EXPECTED_ERRORS as exc:
        return fail("train", exc)
    finally:
        destroy_distributed()
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
