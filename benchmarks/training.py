"""``python -m benchmarks.training``: the training loop's speed on the CPU with the smoke teacher config.

Measures, in one run and on the same shards (the sample world, 3,000 records, built once under
benchmarks/out/loader): the loop fed by DALI-CPU, the loop fed by the torch reference loader, and the
same model's compute alone (forward + backward + AdamW on one batch held in memory: the ceiling a
loader can at best let the loop reach). Prints a table, writes benchmarks/results/training.json.
Figures: steps/s and images/s of training epochs (validation excluded), and the data-wait fraction
(time the loop waited for its next batch / epoch time).

Leaves out: GPU figures (a GPU run writes its own result file with the device named).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.loader import OUT as LOADER_OUT
from benchmarks.loader import cores
from benchmarks.photos import build_world_shards
from benchmarks.results import command_line, print_table, publish
from flora.training.config import load_experiment
from flora.training.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "training"
CONFIG = REPO / "config" / "teacher_global_smoke.yaml"


def compute_only(trainer: Trainer, steps: int) -> float:
    """Steps/s of forward + backward + optimizer step on one in-memory batch (no loader)."""
    batch = next(iter(trainer.train_loader))
    model, objective, optimizer = trainer.model, trainer.objective, trainer.optimizer
    model.train()
    for i in range(steps + 3):
        if i == 3:
            started = time.perf_counter()
        out = objective(model, batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--world-records", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per loop")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("overrides", nargs="*", help="extra config overrides (section.key=value)")
    args = parser.parse_args(argv)
    shards, _ = build_world_shards(LOADER_OUT, args.world_records)
    shutil.rmtree(OUT, ignore_errors=True)
    rows, result = [], {}
    for backend in ("dali", "torch"):
        cfg = load_experiment(
            CONFIG,
            [
                f"data.shards={shards}",
                f"data.backend={backend}",
                f"data.threads={args.threads}",
                f"run.root={OUT}",
                f"run.name={backend}",
                f"train.max_steps={args.steps}",
                "train.epochs=1000",
                "train.eval_every=1000",
                "train.progress=false",
                *args.overrides,
            ],
        )
        summary = Trainer(cfg).fit()
        row = {
            "loop": f"train loop, {backend} loader",
            "steps/s": summary["train_steps_per_s"],
            "img/s": summary["images_per_s"],
            "data wait": f"{summary['data_wait_fraction']:.1%}",
        }
        rows.append(row)
        result[backend] = {
            k: summary[k]
            for k in ("train_steps_per_s", "images_per_s", "data_wait_fraction", "steps", "steps_per_s")
        }
        result[backend]["val_top1"] = summary["last_epoch"].get("val_top1")
    trainer = Trainer(
        load_experiment(
            CONFIG, [f"data.shards={shards}", f"run.root={OUT}", "run.name=compute", "train.progress=false"]
        )
    )
    rate = compute_only(trainer, args.steps)
    batch = trainer.cfg.data.batch_size
    rows.append(
        {"loop": "compute only (batch in memory)", "steps/s": rate, "img/s": rate * batch, "data wait": "-"}
    )
    result["compute_only"] = {"steps_per_s": rate, "images_per_s": rate * batch}
    print()
    print_table(rows, ["loop", "steps/s", "img/s", "data wait"])
    ratios = {
        "dali_vs_torch_loader": result["dali"]["train_steps_per_s"] / result["torch"]["train_steps_per_s"],
        "dali_loop_vs_compute_only": result["dali"]["train_steps_per_s"] / rate,
    }
    print({k: round(v, 2) for k, v in ratios.items()})
    publish(
        "training",
        {
            "command": command_line("benchmarks.training", argv),
            "machine": {
                "cpus": cores(),
                "processor": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
            },
            "config": str(CONFIG.relative_to(REPO)),
            "model": trainer.cfg.model.name,
            "image_size": trainer.cfg.data.image_size,
            "batch_size": batch,
            "results": result,
            "ratios": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
