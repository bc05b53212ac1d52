"""Where numbers go: RUN/metrics.jsonl, TensorBoard scalars, one console line per interval, a progress bar."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("maepipe.train")


class MetricsSink:
    """Rank 0 only. `log(step, values)` appends one JSON line and TensorBoard scalars."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = _progress(total_steps, start_step)

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(f"train/{key}", value, step)
        log.info("step %d | %s", step, " ".join(f"{k} {_fmt(v)}" for k, v in values.items()))

    def advance(self, step: int, loss: float | None = None) -> None:
        if self.bar is not None:
            progress, task = self.bar
            progress.update(task, completed=step, description=f"loss {loss:.4f}" if loss is not None else "train")

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.bar is not None:
            self.bar[0].stop()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _progress(total: int, start: int):
    """A rich bar on a terminal; in logs (not a tty) the per-interval lines are the progress."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress.start()
    return progress, progress.add_task("train", total=total, completed=start)
