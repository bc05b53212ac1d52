"""Progress for long runs: a rich bar on a terminal, one log line per interval otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("data_shards")


class Progress:
    """Counts finished shards, images and bytes; shows images/s and bytes/s since the start."""

    def __init__(self, total_shards: int, total_images: int, enabled: bool = True, interval: float = 10.0):
        self.total_shards, self.total_images = total_shards, total_images
        self.shards = self.images = self.bytes = self.rejected = 0
        self.start = time.perf_counter()
        self.interval, self.last_log = interval, self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn
            self.bar = RichProgress(TextColumn("sharding"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("shard", total=total_images, rate="")
            self.bar.start()
        self.enabled = enabled

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.images / elapsed, self.bytes / elapsed

    def update(self, images: int, nbytes: int, rejected: int) -> None:
        self.shards += 1
        self.images += images
        self.bytes += nbytes
        self.rejected += rejected
        ips, bps = self.rates()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.images + self.rejected,
                            rate=f"{ips:,.0f} img/s {bps / 2**20:,.1f} MiB/s")
        elif self.enabled and (time.perf_counter() - self.last_log >= self.interval
                               or self.shards == self.total_shards):
            self.last_log = time.perf_counter()
            log.info("shards %d/%d, images %d/%d, %.0f img/s, %.1f MiB/s, rejected %d", self.shards,
                     self.total_shards, self.images + self.rejected, self.total_images, ips, bps / 2**20,
                     self.rejected)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
