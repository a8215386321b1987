"""Progress of `kiln data prepare` through its inputs (the chunks' bytes), with an ETA.

``--progress auto`` (the default) draws a live line on stderr when it is a terminal outside
Slurm, ``prepare 1.2G/4.8G |###    | 25% ETA 03:10 (01:03 so far, 19.0MB/s, 52,410 documents)``;
elsewhere (a log file, a Slurm job) it logs a plain line every :attr:`PrepareProgress.PLAIN_EVERY_S`.
``--no-progress`` shows neither.
"""

from __future__ import annotations

import logging
import sys
import time

from kiln.log import PROGRESS_MODES, progress_bar, wants_progress_bar, write_logs_above_the_bar

log = logging.getLogger(__name__)


def progress_mode(progress: str | bool) -> str:
    """``prepare(progress=...)``: a mode of :data:`kiln.log.PROGRESS_MODES`, or ``off``; True is auto."""
    mode = {True: "auto", False: "off"}.get(progress, progress)
    if mode not in (*PROGRESS_MODES, "off"):
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)} or off, got {progress!r}")
    return mode


class PrepareProgress:
    PLAIN_EVERY_S = 30.0

    def __init__(self, mode: str, *, total_bytes: int, done_bytes: int, stream=None) -> None:
        stream = stream or sys.stderr
        self.total_bytes, self.done_bytes, self.documents = total_bytes, done_bytes, 0
        self.bar = None
        self._restore_logs = lambda: None
        if mode != "off" and wants_progress_bar(mode, stream):
            self.bar = progress_bar(total=total_bytes, initial=done_bytes, desc="prepare", unit="B", unit_scale=True,
                                    stream=stream)
            self._restore_logs = write_logs_above_the_bar(stream)
        self.plain = mode != "off" and self.bar is None
        self._started, self._bytes_at_start = time.monotonic(), done_bytes  # a resumed run's own rate
        self._last_line = self._started

    def chunk_done(self, nbytes: int, documents: int) -> None:
        self.done_bytes += nbytes
        self.documents += documents
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.documents:,} documents", refresh=False)
            self.bar.update(nbytes)
        elif self.plain and time.monotonic() - self._last_line >= self.PLAIN_EVERY_S:
            self._last_line = time.monotonic()
            log.info(self.plain_line())

    def plain_line(self) -> str:
        from tqdm import tqdm

        elapsed = time.monotonic() - self._started
        rate = (self.done_bytes - self._bytes_at_start) / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total_bytes - self.done_bytes) / rate) if rate > 0 else "?"
        return (f"prepare: {100 * self.done_bytes / max(self.total_bytes, 1):.0f}% of "
                f"{tqdm.format_sizeof(self.total_bytes, 'B')} read, {self.documents:,} documents, "
                f"{tqdm.format_sizeof(rate, 'B/s')}, ETA {eta}")

    def close(self) -> None:
        self._restore_logs()
        if self.bar is not None:
            self.bar.close()
