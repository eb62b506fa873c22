"""What a run records as it goes, on rank 0: TensorBoard scalars, ``metrics.json``, the curves.

Owns ``RunLog``: the per-epoch ``history`` (rows of ``metrics.json``'s ``epochs``, restored on
resume), the per-window throughput rows (``windows``: images/s and data wait of each ``log_every``
window, the first window of an epoch flagged as it also holds the loader's start), TensorBoard
scalars (non-finite values skipped), and the final summary with ``curves.png``.
Other ranks hold a RunLog that writes nothing. Also ``Window``: the running figures of a stretch of
training (a log window, or the epoch so far): loss terms summed per micro-batch, images, data wait.

Leaves out: what the numbers are (loop.py computes the losses and times the data) and plotting
details (plots.py).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from flora.io import atomic_write_text

METRICS = "metrics.json"


class Window:
    """A stretch of training as it goes: loss terms summed over its micro-batches (``seen`` of them),
    the images those held and the seconds spent waiting for data, since ``start`` (``perf_counter``)."""

    def __init__(
        self, sums: dict[str, float] | None = None, seen: int = 0, start: float | None = None,
        first_in_epoch: bool = False,
    ):  # fmt: skip
        self.start = time.perf_counter() if start is None else start
        self.sums, self.seen = dict(sums or {}), seen
        self.images, self.wait = 0, 0.0
        self.first_in_epoch = first_in_epoch  # the epoch's first log window also holds the loader's start

    @classmethod
    def mean_of(cls, partials: list[dict]) -> Window:
        """The mean of several ranks' saved windows (``{sums, seen}``): what each of another number of
        ranks carries on when a run resumes on them."""
        keys = {k for p in partials for k in p["sums"]}
        sums = {k: sum(p["sums"].get(k, 0.0) for p in partials) / len(partials) for k in keys}
        return cls(sums, round(sum(int(p["seen"]) for p in partials) / len(partials)))

    def restarted(self) -> Window:
        """The same loss sums with the images, the data wait and the clock starting now (a resumed epoch)."""
        return Window(self.sums, self.seen)

    def add(self, keys: list[str], rows: list[list[float]]) -> None:
        """Micro-batches' rows: the loss terms named by ``keys``, then the images (valid rows) last."""
        for row in rows:
            for key, value in zip(keys, row, strict=False):
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.images += int(row[-1])
        self.seen += len(rows)

    def means(self) -> dict[str, float]:
        """Each loss term's mean over the micro-batches seen."""
        return {k: v / max(self.seen, 1) for k, v in self.sums.items()}

    def rates(self, now: float, world_size: int) -> tuple[float, float]:
        """Images per second over ``world_size`` ranks (each seeing as many) and the data wait fraction."""
        span = max(now - self.start, 1e-9)
        return self.images * world_size / span, self.wait / span


class RunLog:
    def __init__(self, run_dir: Path, main: bool):
        self.run_dir, self.main = Path(run_dir), main
        self.history: list[dict] = []  # one row per epoch
        self.windows: list[dict] = []  # one row per log_every window of this session
        self._writer = None

    def restore(self, before_epoch: int) -> None:
        """Keeps the epochs of ``metrics.json`` before ``before_epoch`` (a resumed run rewrites the rest)."""
        path = self.run_dir / METRICS
        if path.is_file():
            history = json.loads(path.read_text()).get("epochs", [])
            self.history = [h for h in history if h["epoch"] < before_epoch]

    def scalars(self, values: dict[str, float | None], step: int, purge_step: int | None = None) -> None:
        """TensorBoard scalars at ``step`` (rank 0; ``purge_step`` drops events a resumed run rewrites)."""
        if not self.main:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step or None)
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def window(self, epoch: int, step: int, first_in_epoch: bool, images_per_s: float, wait: float) -> None:
        self.windows.append(
            {
                "epoch": epoch,
                "step": step,
                "first_in_epoch": first_in_epoch,
                "images_per_s": images_per_s,
                "data_wait_fraction": wait,
            }
        )

    def write_metrics(self, summary: dict | None = None) -> None:
        """``metrics.json``: the epochs so far and the summary (kept from the file until a new one)."""
        if not self.main:
            return
        path = self.run_dir / METRICS
        data: dict = {"epochs": self.history}
        if summary is not None:
            data["summary"] = summary
        elif path.is_file():
            previous = json.loads(path.read_text())
            if "summary" in previous:
                data["summary"] = previous["summary"]
        atomic_write_text(path, json.dumps(data, indent=2))

    def finish(self, summary: dict, title: str) -> None:
        """The summary into ``metrics.json``, ``curves.png``, and TensorBoard closed."""
        self.write_metrics(summary)
        if self.main and self.history:
            from flora.training.plots import training_curves

            training_curves(self.history, self.run_dir / "curves.png", title=title)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
