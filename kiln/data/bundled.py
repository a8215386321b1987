"""The bundled corpus as a ready MDS dataset, prepared on first use and cached."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path

from kiln.data.pack import TMP_MARK, is_complete_dataset, pack_text_to_mds
from kiln.data.tokenizer import bundled_corpus_path, bundled_tokenizer_path, file_sha256
from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

CACHE_ENV = "KILN_CACHE_DIR"


def default_cache_dir() -> str:
    """``$KILN_CACHE_DIR/datasets`` if set, else ``~/.cache/kiln/datasets``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return os.path.join(root, "datasets")
    return str(Path.home() / ".cache" / "kiln" / "datasets")


def bundled_dataset_key(seq_len: int) -> str:
    """Cache key: changes when seq_len, the corpus or the tokenizer changes."""
    h = hashlib.sha256()
    for p in (bundled_corpus_path(), bundled_tokenizer_path()):
        h.update(file_sha256(p).encode())
    return f"bundled-seq{seq_len}-{h.hexdigest()[:16]}"


def _remove_stale_tmp_dirs(path: str) -> None:
    """Remove temp dirs a killed preparation of ``path`` left; call only while holding its lock."""
    parent, name = os.path.split(path)
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}{TMP_MARK}"):
            log.info("removing %s, left by an interrupted preparation", entry)
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def ensure_bundled_dataset(seq_len: int, cache_dir: str | None = None) -> str:
    """Return the MDS directory of the bundled corpus at ``seq_len``, preparing it if missing.

    Safe to call from many processes at once: one prepares under an exclusive ``flock`` while
    the others wait, and the directory itself only appears by an atomic rename when complete.
    """
    if seq_len < 1:
        raise KilnDataError(f"seq_len must be >= 1, got {seq_len}")
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, bundled_dataset_key(seq_len))
    if is_complete_dataset(path):
        return path
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise KilnDataError(f"cannot create the dataset cache {cache_dir} (set {CACHE_ENV}): {e}") from e
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete_dataset(path):  # another process finished while we waited
                return path
            if os.path.exists(path):
                # Only a rename creates this path, so this cannot be a half-written dataset;
                # still, never guess: name it so the user can remove it.
                raise KilnDataError(f"{path} exists but is not a complete dataset; remove it and retry")
            _remove_stale_tmp_dirs(path)
            log.info("preparing the bundled dataset (seq_len=%d) in %s", seq_len, path)
            pack_text_to_mds([bundled_corpus_path()], bundled_tokenizer_path(), seq_len, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
