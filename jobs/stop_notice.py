"""Preemption notices for Ray Train workers: they reach the loop's StopFlag as SIGUSR1/SIGTERM do under torchrun.

Ray Train runs the training function in a thread of each worker actor, and Python takes signal handlers
only on a process's main thread, so the loop cannot catch them itself. Two routes bring a notice in:

- to the driver: `ray job stop` sends SIGTERM to the job's entrypoint (the driver) and its children, and
  a scheduler or a person may send SIGTERM/SIGUSR1 to it. `relay_driver_signals` catches them and sets a
  StopRequest actor; in every worker a thread waits on that actor and notifies the StopFlag.
- to a worker process (e.g. a node agent's SIGTERM): NoticeTorchConfig's backend runs `take_signals` on
  each worker actor's main thread as training starts, and those handlers notify the StopFlag.

One rank's notice is enough: the loop all-reduces the flag at every step boundary, so all ranks save
the same step and return 75 (EXIT_REQUEUE). `ray job stop` follows its SIGTERM with SIGKILL after
RAY_JOB_STOP_WAIT_TIME_S (3 s by default, read from the job's runtime env): give the job at least one
step plus one checkpoint save (`maepipe submit ray train` sets it; see jobs/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@ray.remote(num_cpus=0)
class StopRequest:
    """Set once by the driver; every worker waits on it (an async actor: waiters do not hold a thread)."""

    def __init__(self):
        self.event = asyncio.Event()
        self.signum = 0

    async def request(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    async def wait(self) -> int:
        await self.event.wait()
        return self.signum


def relay_driver_signals(request) -> None:
    """Driver side, after ray.init (which installs its own SIGTERM handler): SIGUSR1/SIGTERM set `request`.

    The handler only wakes a thread: it runs on the main thread, possibly inside a ray.get of
    trainer.fit(), where calling into Ray again is not safe."""
    received: list[int] = []
    wake = threading.Event()

    def relay() -> None:
        wake.wait()
        log.warning("driver got %s: asking every worker to checkpoint and stop", signal.Signals(received[0]).name)
        ray.get(request.request.remote(received[0]))

    def handle(signum, _frame) -> None:
        received.append(signum)
        wake.set()

    threading.Thread(target=relay, name="stop-relay", daemon=True).start()
    for sig in SIGNALS:
        signal.signal(sig, handle)


# ---- worker side: this process's notices, for the StopFlag of the training thread

_flags: list = []  # the StopFlag(s) of training threads in this process
_received: list[int] = []  # signals taken before a flag was attached


def _on_signal(signum, _frame) -> None:
    _received.append(signum)
    for flag in _flags:
        flag.notify(signum)


def take_signals() -> None:
    """Runs on a worker actor's main thread (Backend.on_training_start): its SIGUSR1/SIGTERM now ask for a
    checkpoint and stop instead of ending the process (Ray's default SIGTERM handler exits at once)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def attach(flag, request) -> None:
    """Training thread: feed `flag` this process's signals and the driver's StopRequest."""
    _flags.append(flag)
    for signum in _received:
        flag.notify(signum)

    def wait_for_driver() -> None:
        try:
            signum = ray.get(request.wait.remote())
        except ray.exceptions.RayError:  # the driver (which owns the actor) is gone: nothing to relay
            return
        log.warning("stop requested by the driver (%s)", signal.Signals(signum).name)
        flag.notify(signum)

    threading.Thread(target=wait_for_driver, name="stop-notice", daemon=True).start()


class _NoticeBackend(_TorchBackend):
    def on_training_start(self, worker_group, backend_config) -> None:
        worker_group.execute(take_signals)  # on each worker actor's main thread, before the training thread
        super().on_training_start(worker_group, backend_config)


@dataclass
class NoticeTorchConfig(TorchConfig):
    """TorchConfig whose workers take SIGUSR1/SIGTERM as preemption notices (see take_signals)."""

    @property
    def backend_cls(self):
        return _NoticeBackend
