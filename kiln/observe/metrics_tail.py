"""Follow a JSONL file that one writer appends to and now and then rewrites.

metrics.jsonl is appended line by line, and on every resume rewritten (a temporary file renamed
over it) without the records past the checkpoint. A follower therefore reads only complete lines
(a line without its newline is still being written, or was torn by a kill and is rewritten on the
next resume) and, when the path names a different file or a shorter one than it has read, opens
the path again and reads from the start: the reader of the records decides what it has seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from kiln.log import warn_once

READ_BYTES = 8 << 20  # per read; a long file is read in pieces, not all at once


class MetricsTail:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None
        self.identity: tuple[int, int] | None = None  # (device, inode) of the open file
        self.offset = 0  # bytes consumed: always just after a newline

    def new_records(self) -> Iterator[dict]:
        """The records of the complete lines written since the last call (from the start after a rewrite)."""
        self._reopen_if_rewritten()
        if self.file is None:
            return
        while True:
            self.file.seek(self.offset)
            chunk = self.file.read(READ_BYTES)
            end = chunk.rfind(b"\n") + 1
            if end == 0:
                return
            self.offset += end
            for line in chunk[:end].splitlines():
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        warn_once(f"{self.path}: skipping a line that is not JSON: {line[:80]!r}")
            if len(chunk) < READ_BYTES:
                return

    def _reopen_if_rewritten(self) -> None:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return  # not written yet: look again next time
        if self.file is not None and (current.st_dev, current.st_ino) == self.identity \
                and current.st_size >= self.offset:
            return
        self.close()
        try:
            self.file = open(self.path, "rb")
        except FileNotFoundError:
            return
        opened = os.fstat(self.file.fileno())  # the file actually opened, should the path move again
        self.identity, self.offset = (opened.st_dev, opened.st_ino), 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
