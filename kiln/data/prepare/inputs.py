"""Input files → a deterministic list of chunks → documents.

A chunk is the unit of work and of resumption. Plain JSONL and plain text files are cut at
record boundaries into byte ranges of about ``input.chunk_bytes`` (found by a few small reads,
so planning a terabyte costs seconds); compressed files are one chunk each (a stream cannot be
entered in the middle); Parquet files are cut at row-group boundaries. Chunks follow the sorted
paths, then the file offset, which fixes the global document order.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from kiln.data.pack import iter_blank_line_blocks
from kiln.data.prepare.config import InputConfig
from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

_COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
SUPPORTED = "*.jsonl, *.ndjson, *.txt, *.text, *.md (each also .gz / .zst), *.parquet"


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str
    kind: str  # jsonl | text | parquet
    compression: str | None  # None | gz | zst
    start: int  # byte offset, or first row group for parquet
    end: int  # byte offset (exclusive), -1 for the whole stream, or row group (exclusive)
    nbytes: int  # on-disk bytes this chunk covers (drives the progress bar)

    def to_dict(self) -> dict:
        return asdict(self)


def file_kind(path: str) -> tuple[str, str | None] | None:
    """``("jsonl", "zst")`` for ``x.jsonl.zst``; None for a file kiln does not read."""
    root, ext = os.path.splitext(path.lower())
    compression = _COMPRESSIONS.get(ext)
    if compression:
        root, ext = os.path.splitext(root)
    kind = _KINDS.get(ext)
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (files, directories searched recursively, globs), sorted."""
    if not patterns:
        raise KilnDataError("no inputs given")
    found: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise KilnDataError(f"input {pattern!r} matches no file")
        for m in matches:
            if os.path.isdir(m):
                for root, dirs, files in os.walk(m):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    found.update(os.path.abspath(os.path.join(root, f)) for f in files
                                 if not f.startswith(".") and file_kind(f))
            elif os.path.isfile(m):
                if file_kind(m) is None:
                    if glob.has_magic(pattern):
                        continue  # a glob may sweep up other files; a named file must be readable
                    raise KilnDataError(f"input {m}: unknown file type (supported: {SUPPORTED})")
                found.add(os.path.abspath(m))
            else:
                raise KilnDataError(f"input {m} does not exist")
    if not found:
        raise KilnDataError(f"inputs {patterns} hold no readable file (supported: {SUPPORTED})")
    return sorted(found)


def _split_points(path: str, size: int, target: int, blocks: bool) -> list[int]:
    """Record-aligned offsets ~``target`` bytes apart: line starts (JSONL) or block starts (text)."""
    bounds = [0]
    with open(path, "rb") as f:
        pos = target
        while pos < size:
            f.seek(pos)
            f.readline()  # to the next line start
            if blocks:  # then past the next blank line, so no block straddles two chunks
                while True:
                    line = f.readline()
                    if not line or not line.strip():
                        break
            p = f.tell()
            if p >= size:
                break
            bounds.append(p)
            pos = p + target
    bounds.append(size)
    return bounds


def plan_chunks(paths: list[str], cfg: InputConfig) -> list[Chunk]:
    chunks: list[Chunk] = []
    for path in paths:
        kind, compression = file_kind(path)  # type: ignore[misc]
        size = os.path.getsize(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            start, acc = 0, 0
            for rg in range(meta.num_row_groups):
                acc += meta.row_group(rg).total_byte_size
                if acc >= cfg.chunk_bytes or rg == meta.num_row_groups - 1:
                    share = size * (rg + 1 - start) // max(meta.num_row_groups, 1)
                    chunks.append(Chunk(len(chunks), path, kind, None, start, rg + 1, share))
                    start, acc = rg + 1, 0
        elif compression or (kind == "text" and cfg.text_mode == "file"):
            chunks.append(Chunk(len(chunks), path, kind, compression, 0, -1, size))
        else:
            bounds = _split_points(path, size, cfg.chunk_bytes, blocks=kind == "text")
            for a, b in zip(bounds, bounds[1:]):
                chunks.append(Chunk(len(chunks), path, kind, None, a, b, b - a))
    return chunks


def _read_text(chunk: Chunk) -> str:
    if chunk.compression == "gz":
        with gzip.open(chunk.path, "rb") as f:
            data = f.read()
    elif chunk.compression == "zst":
        import zstandard

        with open(chunk.path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            data = f.read()
    else:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            data = f.read(-1 if chunk.end < 0 else chunk.end - chunk.start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KilnDataError(f"{chunk.path}: not UTF-8 at byte {chunk.start + e.start}: {e.reason}") from None


def _iter_blocks(text: str) -> Iterator[str]:
    """Blank-line separated blocks, exactly as :func:`kiln.data.pack.iter_documents` cuts them."""
    return iter_blank_line_blocks(io.StringIO(text))


def _iter_jsonl(text: str, chunk: Chunk, field: str) -> Iterator[str]:
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines cuts.
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        where = f"{chunk.path}: line {i + 1} of the chunk at byte {chunk.start}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise KilnDataError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise KilnDataError(f"{where}: no field {field!r} (the record has {keys}); set input.text_field")
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise KilnDataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
        yield value or ""


def _iter_parquet(chunk: Chunk, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(chunk.path)
    names = pf.schema_arrow.names
    if field not in names:
        raise KilnDataError(f"{chunk.path}: no column {field!r} (columns: {names}); set input.text_field")
    table = pf.read_row_groups(list(range(chunk.start, chunk.end)), columns=[field])
    for value in table.column(0).to_pylist():
        if value is not None and not isinstance(value, str):
            raise KilnDataError(f"{chunk.path}: column {field!r} holds {type(value).__name__}, not strings")
        yield value or ""


def read_chunk(chunk: Chunk, cfg: InputConfig) -> list[str]:
    """The documents of one chunk, in file order (empty ones included: the pipeline counts them)."""
    if chunk.kind == "parquet":
        return list(_iter_parquet(chunk, cfg.text_field))
    text = _read_text(chunk)
    if chunk.kind == "jsonl":
        return list(_iter_jsonl(text, chunk, cfg.text_field))
    if cfg.text_mode == "file":
        return [text]
    return list(_iter_blocks(text))
