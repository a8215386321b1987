"""Hang detection: a rank whose step overruns its allowance dumps its stacks and exits 124.

A hung rank (a deadlock, a stuck filesystem write, a GPU that stopped answering) stalls every
peer in its next collective. The first rank whose deadline passes, hung or waiting, rings every
other rank's :class:`HangWatchdog` through the process group's store, and each writes what it
was doing, which is what tells the hung rank from the waiting ones:

* ``<run_dir>/logs/stacks-rank<N>.txt``: every thread's Python stack (faulthandler), appended, so
  the dumps of earlier attempts of the same run stay;
* ``<run_dir>/logs/nccl-trace-rank<N>``: on GPUs, NCCL's flight recorder (the last collectives of
  every process group, with their states), the file NCCL itself writes when a collective times
  out; read them with torch's ``torchfrtrace <run_dir>/logs -p nccl-trace-rank``;
* ``<run_dir>/hung.json``: the marker that tells the ``kiln train`` launcher that its workers
  died of a hang (they exit :data:`EXIT_HUNG`; torchrun itself only reports a failure).

The watchdog is armed without a gap from the first step to :meth:`HangWatchdog.close`: at each
step start with the step's allowance, and at each step end with the allowance of the loop's work
between steps (logging collectives, evaluation, checkpoint saves). A Python thread watches the
deadline; it runs while the main thread waits in C with the GIL released (a sleep, a gloo or NCCL
wait). For a main thread stuck in C *holding* the GIL, faulthandler's C-level watchdog writes the
stacks a minute later and exits with its own code, 1, and no marker.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from kiln.trainer.callbacks import Callback

log = logging.getLogger("kiln")

EXIT_HUNG = 124  # as timeout(1): "the command timed out"
HUNG_MARKER = "hung.json"
# How long after the Python thread's deadline faulthandler's C thread writes the stacks and exits:
# time for the Python thread to finish its dumps, which it normally does within a second.
BACKSTOP_GRACE_S = 60.0
# Arming faulthandler starts a thread (~0.1-0.5 ms), too much for every step: its deadline is moved
# only when the Python one would pass it, and then this much further.
BACKSTOP_SLACK_S = 60.0


def stacks_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"stacks-rank{rank}.txt"


def nccl_trace_prefix(run_dir: Path | str) -> str:
    """The file name prefix of NCCL's flight-recorder dumps (the rank is appended, as NCCL does)."""
    return str(Path(run_dir) / "logs" / "nccl-trace-rank")


def flight_recorder_environment(run_dir: str | None) -> dict[str, str]:
    """Environment that makes NCCL keep its flight recorder and write it when a collective times
    out (torch's own NCCL watchdog), beside the stacks; variables already set are the user's."""
    # torch renamed two of them (TORCH_FR_*): both names are set, and a setting under either is the user's.
    settings = {("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"): "2000", ("TORCH_NCCL_DUMP_ON_TIMEOUT",): "1"}
    if run_dir:
        settings["TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"] = nccl_trace_prefix(run_dir)
    env: dict[str, str] = {}
    for names, value in settings.items():
        if not any(name in os.environ for name in names):
            env.update(dict.fromkeys(names, value))
    return env


class _Deadline:
    """One daemon thread that calls ``on_expiry(what, seconds)`` when a deadline passes unmoved.

    Moving the deadline later costs a lock: the sleeping thread finds out when it wakes at the old
    one. Only a deadline moved earlier wakes it (a notify, the GIL handed over once)."""

    def __init__(self, on_expiry: Callable[[str, float], None]) -> None:
        self._on_expiry = on_expiry
        self._condition = threading.Condition()
        self._deadline: float | None = None
        self._what, self._seconds = "", 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="kiln-hang-watchdog", daemon=True)
        self._thread.start()

    def set(self, seconds: float, what: str) -> None:
        """Expire in ``seconds`` unless moved again; 0 clears the deadline."""
        deadline = time.monotonic() + seconds if seconds > 0 else None
        with self._condition:
            earlier = deadline is not None and (self._deadline is None or deadline < self._deadline)
            self._deadline, self._what, self._seconds = deadline, what, seconds
            if earlier:
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._condition.wait(left)
                    continue
                what, seconds = self._what, self._seconds
                break
            else:
                return
        self._on_expiry(what, seconds)


class _PeerAlarm:
    """Rings every rank's watchdog when one fires, through the process group's key-value store,
    and lets the ranks wait for each other's dumps before they exit.

    Needed because one hung rank does not stall its peers at the same moment, nor under the same
    allowance (a rank stuck in a checkpoint write has the long one; its peers wait in a step's
    collective), and a rank that exits breaks its peers' gloo collectives: an exception that would
    end them (exit 1) before their dumps. A listening thread waits on the store server (no polling)
    with a client of its own; the rank that fires uses another.
    """

    def __init__(self, world_size: int, on_ring: Callable[[dict], None]) -> None:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        # Keys per attempt: a store torchrun shares across restarts keeps an earlier attempt's.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.fired_key, self.dumped_key = f"kiln/watchdog/{attempt}/fired", f"kiln/watchdog/{attempt}/dumped"
        self.world_size = world_size
        self._ringer, self._listener = store.clone(), store.clone()  # one client per thread
        self._on_ring = on_ring
        self._thread = threading.Thread(target=self._listen, name="kiln-hang-watchdog-peers", daemon=True)
        self._thread.start()

    def ring(self, message: dict) -> None:
        self._ringer.compare_set(self.fired_key, "", json.dumps(message))  # the first message stands

    def close(self) -> None:
        """End the listener: a thread still inside the store's C++ client when the interpreter
        exits aborts the process. A rank that is done rings "done", which every listener takes
        as the end (the run is over, or going down with this rank); a hang's alarm, if it came
        first, stands."""
        try:
            self.ring({"done": True})
        except Exception:  # noqa: BLE001 - the store's rank exited: the listener has returned
            pass
        self._thread.join(timeout=5)

    def wait_for_all_dumps(self, timeout_s: float) -> None:
        """Count this rank's dump in, then wait until every rank's is (a stopped rank's never is)."""
        deadline = time.monotonic() + timeout_s
        dumped = self._ringer.add(self.dumped_key, 1)
        while dumped < self.world_size and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                dumped = self._ringer.add(self.dumped_key, 0)
            except Exception:  # noqa: BLE001 - the store's rank saw every dump counted and exited
                return

    def _listen(self) -> None:
        from datetime import timedelta

        try:
            self._listener.wait([self.fired_key], timedelta(days=365))
            message = json.loads(self._listener.get(self.fired_key))
        except Exception:  # noqa: BLE001 - the store closed: the run ended
            return
        if not message.get("done"):
            self._on_ring(message)


class HangWatchdog(Callback):
    """On every rank: a step (or the work between steps) that overruns its allowance is a hang."""

    # After its dump, a rank waits up to this long for the other ranks' before it exits.
    PEERS_DUMP_S = 10.0

    def __init__(self, config, *, rank: int, run_dir: Path, device_type: str) -> None:
        self.config, self.rank, self.run_dir, self.device_type = config, rank, Path(run_dir), device_type
        self.stacks = stacks_path(self.run_dir, rank)
        self._stack_file = None
        self._deadline: _Deadline | None = None
        self._peers: _PeerAlarm | None = None
        self._fired = threading.Lock()  # held by the first of this rank's deadline and the peers' alarm
        self._backstop_at: float | None = None  # when faulthandler's C thread dumps and exits
        self._steps_started = 0

    def on_train_start(self, trainer) -> None:
        import torch.distributed as dist

        if self.rank == 0:  # an earlier attempt's marker: this attempt has not hung (yet)
            (self.run_dir / HUNG_MARKER).unlink(missing_ok=True)
        self.stacks.parent.mkdir(parents=True, exist_ok=True)
        # Opened now: faulthandler's C thread writes to a file descriptor it holds from the start.
        self._stack_file = open(self.stacks, "a")
        self._deadline = _Deadline(self._overran)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._peers = _PeerAlarm(dist.get_world_size(), self._peer_overran)

    def on_step_start(self, trainer) -> None:
        step = trainer.state.step + 1
        if self._steps_started == 0:
            self._arm(self.config.first_step_timeout_s, f"step {step}, the first after the start,")
        else:
            self._arm(self.config.timeout_s, f"step {step}")
        self._steps_started += 1

    def on_step_end(self, trainer, result) -> None:
        self._arm(self.config.between_steps_timeout_s,
                  f"the work after step {trainer.state.step} (logging, evaluation, checkpoint save)")

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
        if self._peers is not None:
            self._peers.close()
        if self._fired.locked():
            # A peer's exit broke this rank's collective while the watchdog writes this rank's
            # dump: let it finish; it ends the process (exit 124).
            threading.Event().wait()
        faulthandler.cancel_dump_traceback_later()
        if self._stack_file is not None:
            self._stack_file.close()
            if self.stacks.stat().st_size == 0:  # nothing hung: leave no empty dump behind
                self.stacks.unlink()

    def _arm(self, seconds: float, what: str) -> None:
        self._deadline.set(seconds, what)
        if seconds <= 0:
            faulthandler.cancel_dump_traceback_later()
            self._backstop_at = None
            return
        # The backstop may fire late (after a longer allowance, up to that allowance late), never early.
        needed = time.monotonic() + seconds + BACKSTOP_GRACE_S
        if self._backstop_at is None or self._backstop_at < needed:
            self._backstop_at = needed + BACKSTOP_SLACK_S
            faulthandler.dump_traceback_later(seconds + BACKSTOP_GRACE_S + BACKSTOP_SLACK_S, exit=True,
                                              file=self._stack_file)

    # -- in a watchdog thread: the main thread is stuck ------------------------------------
    def _overran(self, what: str, seconds: float) -> None:
        reason = f"{what} took longer than {seconds:g}s"
        if self._fired.acquire(blocking=False):
            self._dump_and_exit(reason, f"{reason}: hung", tell_peers=True)

    def _peer_overran(self, message: dict) -> None:
        if self._fired.acquire(blocking=False):
            self._dump_and_exit(f"rank {message['rank']}'s {message['reason']}",
                                f"stopped by rank {message['rank']}'s watchdog", tell_peers=False)

    def _dump_and_exit(self, reason: str, verdict: str, tell_peers: bool) -> None:
        """Stacks, the other ranks' alarm, marker, flight recorder, exit."""
        # Should this thread get stuck too, faulthandler's thread ends the process.
        faulthandler.dump_traceback_later(BACKSTOP_GRACE_S, exit=True, file=self._stack_file)
        when = datetime.now().isoformat(timespec="seconds")
        self._stack_file.write(f"=== kiln watchdog, rank {self.rank}, {when}: {reason}; "
                               f"every thread's stack, most recent call first ===\n")
        self._stack_file.flush()
        faulthandler.dump_traceback(self._stack_file, all_threads=True)
        self._stack_file.flush()
        if tell_peers and self._peers is not None:
            self._tell_peers(lambda peers: peers.ring({"rank": self.rank, "reason": reason}))
        self._write_marker(reason)
        sys.stderr.write(f"kiln: rank {self.rank}: {verdict}; stacks in {self.stacks}; exiting {EXIT_HUNG}\n")
        sys.stderr.flush()
        if self.device_type == "cuda":
            dump_nccl_flight_recorder(self.run_dir, self.rank)
        for handler in logging.getLogger().handlers:  # the per-rank log files keep what led here
            handler.flush()
        if self._peers is not None:
            self._tell_peers(lambda peers: peers.wait_for_all_dumps(self.PEERS_DUMP_S))
        os._exit(EXIT_HUNG)

    def _tell_peers(self, action: Callable[[_PeerAlarm], None]) -> None:
        try:
            action(self._peers)
        except Exception as err:  # noqa: BLE001 - the store's host is gone: the peers are going down anyway
            first_line = str(err).splitlines()[0] if str(err) else ""
            sys.stderr.write(f"kiln: rank {self.rank}: the other ranks' watchdogs are out of reach "
                             f"({type(err).__name__}: {first_line})\n")

    def _write_marker(self, reason: str) -> None:
        """Every rank that fires writes it (atomically); the launcher needs one, with its launch id."""
        marker = {"launch_id": os.environ.get("KILN_LAUNCH_ID"), "rank": self.rank, "reason": reason,
                  "stacks": str(self.stacks), "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
        tmp = self.run_dir / f"{HUNG_MARKER}.tmp.{os.getpid()}"
        tmp.write_text(json.dumps(marker) + "\n")
        os.replace(tmp, self.run_dir / HUNG_MARKER)


def dump_nccl_flight_recorder(run_dir: Path, rank: int) -> None:
    """NCCL's flight recorder (a pickle) to ``<run_dir>/logs/nccl-trace-rank<N>``; GPU runs only."""
    path = Path(nccl_trace_prefix(run_dir) + str(rank))
    try:
        from torch._C._distributed_c10d import _dump_nccl_trace

        path.write_bytes(_dump_nccl_trace(includeCollectives=True, includeStackTraces=True, onlyActive=False))
    except Exception as err:  # noqa: BLE001 - a private torch API: the stacks are already written
        sys.stderr.write(f"kiln: rank {rank}: no NCCL flight recorder dump ({type(err).__name__}: {err})\n")
