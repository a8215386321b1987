"""The checkpoint directory on disk: naming, manifests, the `latest` pointer, retention.

Pure file-system logic (no torch.distributed), so it is testable on its own and usable by
``kiln ckpt``. The layout of ``checkpoint.dir``::

    step_000100/               one published checkpoint (torch DCP files + kiln files)
        kiln-manifest.json     written last, before the rename: every file's size and CRC32
    step_000200/
    .step_000300.partial/      a save in progress, or left by a crash: never loaded
    latest                     "step_000200": updated only after step_000200/ is complete

A checkpoint is *published* by renaming its finished ``.partial`` directory, so a directory
named ``step_N`` is complete unless a file was later damaged, which the manifest catches.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kiln")

MANIFEST = "kiln-manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 8 << 20


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def partial_dir_name(step: int) -> str:
    return f".{step_dir_name(step)}.partial"


def parse_step(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """{name: {"size", "crc32"}} for files of ``directory``."""
    return {name: {"size": (directory / name).stat().st_size, "crc32": file_crc32(directory / name)} for name in names}


def write_manifest(directory: Path, step: int, files: dict[str, dict[str, int]]) -> None:
    """Write the manifest (fsynced) into a finished checkpoint directory, before publishing."""
    body = {"format_version": FORMAT_VERSION, "step": step, "files": dict(sorted(files.items()))}
    _write_durably(directory / MANIFEST, json.dumps(body, indent=1) + "\n")


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""


def verify_files(directory: Path, names: list[str], manifest: dict, checksums: bool = True) -> Verdict:
    """Check that ``names`` exist with their manifest size (and CRC32)."""
    for name in names:
        expected = manifest["files"][name]
        path = directory / name
        if not path.is_file():
            return Verdict(False, f"{name} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            return Verdict(False, f"{name} has {size} bytes, the manifest says {expected['size']} (truncated?)")
        if checksums and file_crc32(path) != expected["crc32"]:
            return Verdict(False, f"{name} does not match its CRC32 in the manifest (corrupted)")
    return Verdict(True)


def check_manifest(directory: Path) -> tuple[dict | None, Verdict]:
    """The manifest of a checkpoint directory, or why there is no usable one."""
    if not directory.is_dir():
        return None, Verdict(False, "no such directory")
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return None, Verdict(False, f"{MANIFEST} is missing (the save never finished)")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, Verdict(False, f"{MANIFEST} is not valid JSON")
    if manifest.get("format_version") != FORMAT_VERSION or "files" not in manifest:
        return None, Verdict(False, f"{MANIFEST} has format {manifest.get('format_version')}, kiln reads {FORMAT_VERSION}")
    return manifest, Verdict(True)


def verify_checkpoint(directory: Path, checksums: bool = True) -> Verdict:
    """Whole-checkpoint check on one process (``kiln ckpt inspect``, tests)."""
    manifest, verdict = check_manifest(directory)
    if manifest is None:
        return verdict
    return verify_files(directory, sorted(manifest["files"]), manifest, checksums)


def published_steps(root: Path) -> list[int]:
    """Steps with a published directory under ``root``, ascending."""
    if not root.is_dir():
        return []
    steps = [parse_step(p.name) for p in root.iterdir() if p.is_dir()]
    return sorted(s for s in steps if s is not None)


def read_latest(root: Path) -> int | None:
    try:
        return parse_step((root / LATEST).read_text().strip())
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def write_latest(root: Path, step: int) -> None:
    """Point ``latest`` at a published step, atomically (write a temp file, rename over)."""
    _write_durably(root / LATEST, step_dir_name(step) + "\n")


def resume_candidates(root: Path) -> list[int]:
    """Steps to try, best first: the ``latest`` pointer's, then every other, newest first.

    A checkpoint newer than ``latest`` can exist when a crash came between the rename and the
    pointer update; it is complete (it was renamed), so it is tried first.
    """
    steps = published_steps(root)
    ordered = sorted(steps, reverse=True)
    latest = read_latest(root)
    if latest in steps and ordered and latest != ordered[0]:
        newer = [s for s in ordered if s > latest]
        ordered = newer + [latest] + [s for s in ordered if s < latest]
    return ordered


def steps_to_delete(steps: list[int], keep_last: int, keep_every: int, protect: set[int] = frozenset()) -> list[int]:
    """Retention: keep the newest ``keep_last``, every multiple of ``keep_every``, and ``protect``."""
    steps = sorted(steps)
    keep = set(steps[-keep_last:]) | set(protect)
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]


def remove_stale_partials(root: Path) -> list[Path]:
    """Delete ``.partial`` directories (saves that never finished). Only call when no save runs."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".step_") and path.name.endswith((".partial", ".deleting", ".replaced")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def delete_checkpoint(root: Path, step: int, in_background: bool = False) -> None:
    """Rename out of the published namespace first, so a crash mid-delete leaves no half ``step_N``
    (a leftover ``.deleting`` is swept by remove_stale_partials); ``in_background`` deletes the
    files in a daemon thread, off the training thread."""
    path = root / step_dir_name(step)
    doomed = root / f".{step_dir_name(step)}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    if in_background:
        threading.Thread(target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, daemon=True).start()
    else:
        shutil.rmtree(doomed, ignore_errors=True)


def publish(root: Path, step: int) -> Path:
    """Rename the finished partial directory to its step name, then move ``latest`` to it."""
    final = root / step_dir_name(step)
    if final.exists():  # a re-save of the same step (a run resumed from before it): replace it whole
        delete_checkpoint(root, step)
    os.rename(root / partial_dir_name(step), final)
    _fsync_dir(root)
    write_latest(root, step)
    return final


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)
