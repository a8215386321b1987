"""Read W&B's own transaction logs (``run-<id>.wandb``) back: which steps a run already holds.

wandb 0.31 writes these from its Go service and no longer ships a Python reader, so this is a
small one for the format it writes: LevelDB's log format with a W&B file header.

* the file starts with a 7-byte header: ``:W&B``, the magic 0xBEE1 (uint16, little-endian) and a
  version byte;
* then 32 KiB blocks (the file header counts as the first block's first bytes); each holds
  chunks of a 7-byte header (CRC-32 of the type byte and the data, uint32; data length, uint16;
  type: 1 a whole record, 2/3/4 its first/middle/last piece) and the data; a block's last
  bytes, too few for a chunk header, are padding;
* a record is one serialized ``wandb_internal_pb2.Record``.

A W&B service killed mid-write leaves a torn tail: reading stops at the first chunk that is cut
short or fails its CRC, and everything before it counts.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC = b":W&B", 0xBEE1
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_BYTES = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_payloads(data: bytes) -> Iterator[bytes]:
    """The serialized records of one transaction log, up to the first damaged or missing byte."""
    if len(data) < FILE_HEADER.size:
        return
    ident, magic, _version = FILE_HEADER.unpack_from(data)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise ValueError("not a W&B transaction log (bad file header)")
    offset, pieces = FILE_HEADER.size, []
    while True:
        room = BLOCK_BYTES - offset % BLOCK_BYTES
        if room < CHUNK_HEADER.size:
            offset += room  # block padding
            continue
        if offset + CHUNK_HEADER.size > len(data):
            return
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        start = offset + CHUNK_HEADER.size
        body = data[start:start + length]
        if length > room - CHUNK_HEADER.size or len(body) < length or kind not in (FULL, FIRST, MIDDLE, LAST):
            return  # torn tail (or zero padding a writer preallocated)
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != checksum:
            return
        offset = start + length
        if kind == FULL:
            pieces = []
            yield body
        elif kind == FIRST:
            pieces = [body]
        elif pieces:  # MIDDLE or LAST of a record whose FIRST we read
            pieces.append(body)
            if kind == LAST:
                yield b"".join(pieces)
                pieces = []


def history_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(step, {key: value as JSON text}) of every history row in one transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    for payload in record_payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a record the installed wandb cannot parse ends what we trust
            return
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
            yield record.history.step.num, items


def transaction_logs(wandb_dir: Path, run_id: str) -> list[Path]:
    """Every local transaction log of ``run_id`` (offline and online sessions), oldest first."""
    # Session directories are <offline-run|run>-<YYYYMMDD_HHMMSS>-<id>[-<n>]: order by what follows the mode.
    return sorted(wandb_dir.glob(f"*-{run_id}*/run-{run_id}.wandb"),
                  key=lambda p: p.parent.name.removeprefix("offline-"))


def last_logged_step(wandb_dir: Path, run_id: str) -> int | None:
    """The highest history step any local session of ``run_id`` wrote, or None when there is none."""
    steps = [step for path in transaction_logs(wandb_dir, run_id) for step, _ in history_rows(path)]
    return max(steps, default=None)
