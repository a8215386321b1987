"""Graceful stop on SIGTERM/SIGUSR1: how Slurm announces preemption and the time limit.

The handler only records the signal; the loop asks :meth:`PreemptionWatcher.requested` after
each step, which agrees across ranks (a signal may reach ranks at different steps), saves a
checkpoint at that step and exits with :data:`EXIT_PREEMPTED`.

torchrun also sends SIGTERM to the survivors when a worker dies; those may be stuck in a
collective with the dead peer and would never reach the step boundary. So a signal arms a
watchdog: a rank that is not back at a step boundary within ``grace`` exits at once (code
128 + signal, as if killed), instead of holding the restart up for the whole save timeout.

The first stop signal names the stop: under Slurm every process of the step gets the signal
(launcher, torchrun's agent, workers), and a signal that follows it (the agent's own SIGTERM as
it shuts down, Slurm's SIGTERM at the time limit) must not rename it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from kiln.parallel import collectives

log = logging.getLogger("kiln")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; a Slurm script can requeue on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(Exception):
    """Raised out of the run after the preemption checkpoint is published."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.step, self.signum = step, signum


class PreemptionWatcher:
    MIN_GRACE_S = 30.0

    def __init__(self) -> None:
        self.received: int | None = None
        self.step_time_s = 0.0  # the loop keeps it current; the watchdog allows a few steps
        self._watchdog: threading.Timer | None = None
        self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        start_resource_tracker_deaf_to_stop_signals()

    def _record(self, signum: int, frame) -> None:
        if self.received is None:  # the first signal is the one that arrived; later ones follow from it
            log.warning(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")
            grace = max(self.MIN_GRACE_S, 3 * self.step_time_s)
            self._watchdog = threading.Timer(grace, _exit_stuck, args=(signum, grace))
            self._watchdog.daemon = True
            self._watchdog.start()
            self.received = signum

    def requested(self) -> int | None:
        """The stop signal if any rank received one, else None (collective, one tiny all-reduce)."""
        (flag,) = collectives.reduce_floats([self.received or 0], op="max")
        signum = int(flag) or None
        if signum is not None and self._watchdog is not None:
            self._watchdog.cancel()  # every rank is alive and at the boundary: the save may take its time
        return signum

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def start_resource_tracker_deaf_to_stop_signals() -> None:
    """Start multiprocessing's resource tracker now, with the stop signals blocked in it.

    mosaicml-streaming's shared memory starts the tracker in each worker. It ignores SIGTERM but
    dies on SIGUSR1, which reaches it with the worker's process group (torchrun) or the whole
    step (Slurm); the worker then prints a KeyError traceback for every block it frees. A
    blocked signal stays blocked across fork and exec, and the tracker unblocks only SIGINT and
    SIGTERM; here the worker's own handler is already set, so a signal arriving meanwhile waits
    for the unblock and is delivered to it.
    """
    from multiprocessing import resource_tracker

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()  # a no-op when it is already running
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exit_stuck(signum: int, grace: float) -> None:
    log.error(f"{signal.Signals(signum).name}: not back at a step boundary within {grace:.0f}s "
              f"(a peer died?); exiting without a checkpoint")
    logging.shutdown()
    os._exit(128 + signum)
