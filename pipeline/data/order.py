"""The epoch's sample order and how it is cut into per-rank, per-worker streams.

Everything here is a pure function of (manifest shard counts, seed, epoch, layout): never of timing.

Order. Shards are permuted by (seed, epoch) and concatenated into a sequence C of N positions.
C is cut into windows of `window` positions; inside window k the positions are permuted by
(seed, epoch, k). The result is the epoch order O: O[p] is a position of C, i.e. a (shard, sample).
Because the shard writer already shuffled the dataset globally, shard order plus a window shuffle
mixes well, while every window still maps to one or two contiguous byte ranges per shard.

Plan. The part of the epoch not yet consumed is a list of intervals over O ("remaining"; [[0, N)]
at the start). For a layout (world ranks x workers, micro-batch B) each rank gets
nb = R // (world*B) batches (`drop`; `wrap` rounds up and repeats the start), so ranks are
balanced by construction and at most world*B - 1 samples are dropped. `keep` (evaluation: every
sample once) splits R evenly over ranks; a rank's last batch may be short and ranks may differ by one
batch, so it is for passes without per-batch collectives. Rank r's batch i is made by
its worker i % workers; stream (r, w) is a contiguous run of the remaining sequence, streams laid
out in (rank, worker) order.

State. After t batches per rank, stream (r, w) has consumed len(range(w, t, workers)) batches.
The state is just {epoch, remaining at plan start, layout, t}: small JSON. Same layout: each
stream restarts at its offset (exact resume). Another layout: the unconsumed tail of every
stream, plus the samples the old plan left out, become the new "remaining" (elastic resume).
Under `wrap` the padding (repeats of the first remaining samples, at the end of the plan's sequence)
is never carried over: its samples are either consumed already or still left as themselves, and the
new plan pads its own last global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Interval = tuple[int, int]  # [start, end) over positions of the epoch order O


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@dataclass(frozen=True)
class EpochOrder:
    """O for one epoch: position p -> (shard id, sample index in shard, global sample id)."""

    counts: tuple[int, ...]
    seed: int
    epoch: int
    window: int
    shuffle: bool = True

    def __post_init__(self):
        m = len(self.counts)
        perm = _rng(self.seed, self.epoch, 0x5A4D).permutation(m) if self.shuffle else np.arange(m)
        counts = np.asarray(self.counts, dtype=np.int64)
        # global id of a sample: its rank in manifest order (shard offsets in manifest order)
        object.__setattr__(self, "_first_id", np.concatenate([[0], np.cumsum(counts)]))
        object.__setattr__(self, "_shard_perm", perm)
        object.__setattr__(self, "_c_start", np.concatenate([[0], np.cumsum(counts[perm])]))
        object.__setattr__(self, "_window_perms", {})

    @property
    def size(self) -> int:
        return int(self._c_start[-1])

    def window_perm(self, k: int) -> np.ndarray:
        cache = self._window_perms
        if k not in cache:
            n = min(self.window, self.size - k * self.window)
            cache[k] = _rng(self.seed, self.epoch, k, 0x57) .permutation(n) if self.shuffle else np.arange(n)
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
        return cache[k]

    def c_position(self, p: int) -> int:
        k, j = divmod(p, self.window)
        return k * self.window + int(self.window_perm(k)[j])

    def locate(self, c: int) -> tuple[int, int]:
        """C position -> (shard id in manifest order, sample index inside that shard)."""
        i = int(np.searchsorted(self._c_start, c, side="right")) - 1
        return int(self._shard_perm[i]), c - int(self._c_start[i])

    def global_id(self, shard: int, index: int) -> int:
        return int(self._first_id[shard]) + index


def total(intervals: list[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def take(intervals: list[Interval], start: int, stop: int) -> list[Interval]:
    """The sub-sequence [start, stop) of the concatenation of `intervals`, as intervals."""
    out, offset = [], 0
    for a, b in intervals:
        n = b - a
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:
            out.append((a + lo, a + hi))
        offset += n
        if offset >= stop:
            break
    return out


def merge(intervals: list[Interval]) -> list[Interval]:
    """Join touching neighbours (keeps the state small after repeated elastic resumes)."""
    out: list[Interval] = []
    for a, b in intervals:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class Layout:
    world: int
    workers: int  # DataLoader workers per rank; 0 counts as 1 stream read in-process
    batch: int
    remainder: str = "drop"  # drop | wrap | keep (keep: evaluation, last batch may be short)

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.workers)


@dataclass
class Plan:
    layout: Layout
    remaining: list[Interval]
    batches_per_rank: int = field(init=False)
    streams: dict[tuple[int, int], list[Interval]] = field(init=False)
    """(rank, worker) -> its intervals over O, in reading order."""

    def __post_init__(self):
        L, R = self.layout, total(self.remaining)
        per_step = L.world * L.batch
        if L.remainder == "drop":
            nb = R // per_step
        else:
            nb = -(-R // per_step)
        seq = list(self.remaining)
        if L.remainder == "wrap" and nb * per_step > R and R > 0:
            need = nb * per_step - R
            while need > 0:  # repeat the start of the sequence to fill the last global batch
                pad = take(self.remaining, 0, min(need, R))
                seq += pad
                need -= total(pad)
        if L.remainder == "keep":  # evaluation: ranks split R evenly, a rank's last batch may be short
            per_rank = [R * (r + 1) // L.world - R * r // L.world for r in range(L.world)]
            nb = -(-max(per_rank) // L.batch)
        else:
            per_rank = [nb * L.batch] * L.world
        self.batches_per_rank = nb
        self.streams = {}
        self._spans: dict[tuple[int, int], tuple[int, int]] = {}  # (rank, worker) -> [start, end) in seq
        W = L.streams_per_rank
        offset = 0
        for r, n_rank in enumerate(per_rank):
            nb_rank = -(-n_rank // L.batch)
            for w in range(W):
                n = len(range(w, nb_rank, W)) * L.batch
                if nb_rank and (nb_rank - 1) % W == w:  # this stream holds the rank's (maybe short) last batch
                    n -= nb_rank * L.batch - n_rank
                self.streams[(r, w)] = take(seq, offset, offset + n)
                self._spans[(r, w)] = (offset, offset + n)
                offset += n
        self.unassigned = take(seq, offset, total(seq)) if L.remainder == "drop" else []

    def consumed_samples(self, worker: int, batches_done: int) -> int:
        return len(range(worker, batches_done, self.layout.streams_per_rank)) * self.layout.batch

    def remaining_after(self, batches_done: int) -> list[Interval]:
        """What this epoch has left after every rank consumed `batches_done` batches."""
        # seq offsets from total(remaining) on are wrap padding: cut off, so no sample is carried twice
        real = total(self.remaining)
        left: list[Interval] = []
        for (_, w), (start, end) in self._spans.items():
            done = self.consumed_samples(w, batches_done)
            left += take(self.remaining, start + done, min(end, real))
        return merge(left + self.unassigned)
