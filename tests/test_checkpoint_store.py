"""The checkpoint directory logic on its own: publish, verify, resume order, retention."""

from __future__ import annotations

import json

import pytest

from kiln.checkpoint import store


def _fake_checkpoint(root, step, files=None, publish=True):
    """A finished save: files in the partial dir, manifest, then (optionally) the rename."""
    partial = root / store.partial_dir_name(step)
    partial.mkdir(parents=True)
    files = files or {"__0_0.distcp": b"x" * 100, ".metadata": b"meta", "kiln.json": b"{}"}
    for name, data in files.items():
        (partial / name).write_bytes(data)
    store.write_manifest(partial, step, store.describe_files(partial, sorted(files)))
    if publish:
        store.publish(root, step)
    return root / store.step_dir_name(step)


def test_publish_renames_then_moves_latest(tmp_path):
    _fake_checkpoint(tmp_path, 4)
    assert (tmp_path / "step_000004").is_dir() and not (tmp_path / ".step_000004.partial").exists()
    assert store.read_latest(tmp_path) == 4
    _fake_checkpoint(tmp_path, 8)
    assert store.read_latest(tmp_path) == 8
    assert store.published_steps(tmp_path) == [4, 8]
    assert json.loads((tmp_path / "step_000008" / store.MANIFEST).read_text())["step"] == 8


def test_unpublished_partial_is_never_a_candidate_and_is_cleaned(tmp_path):
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8, publish=False)  # crashed between manifest and rename
    assert store.resume_candidates(tmp_path) == [4]
    removed = store.remove_stale_partials(tmp_path)
    assert [p.name for p in removed] == [".step_000008.partial"]
    assert store.published_steps(tmp_path) == [4]


def test_verify_accepts_intact_and_names_what_is_wrong(tmp_path):
    path = _fake_checkpoint(tmp_path, 4)
    assert store.verify_checkpoint(path).ok

    shard = path / "__0_0.distcp"
    shard.write_bytes(b"x" * 50)
    verdict = store.verify_checkpoint(path)
    assert not verdict.ok and "__0_0.distcp" in verdict.reason and "truncated" in verdict.reason

    shard.write_bytes(b"y" * 100)  # same size, different bytes
    verdict = store.verify_checkpoint(path)
    assert not verdict.ok and "CRC32" in verdict.reason
    assert store.verify_checkpoint(path, checksums=False).ok  # size-only check cannot see it

    shard.unlink()
    verdict = store.verify_checkpoint(path)
    assert not verdict.ok and "missing" in verdict.reason

    (path / store.MANIFEST).unlink()
    verdict = store.verify_checkpoint(path)
    assert not verdict.ok and "never finished" in verdict.reason


def test_resume_candidates_prefer_latest_but_try_newer_renamed_ones_first(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    assert store.resume_candidates(tmp_path) == [6, 4, 2]
    # A crash after renaming step 6 but before moving the pointer: 6 is complete, try it first.
    store.write_latest(tmp_path, 4)
    assert store.resume_candidates(tmp_path) == [6, 4, 2]
    (tmp_path / store.LATEST).unlink()
    assert store.resume_candidates(tmp_path) == [6, 4, 2]
    assert store.resume_candidates(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    "steps, keep_last, keep_every, protect, deleted",
    [
        ([1, 2, 3, 4, 5], 2, 0, set(), [1, 2, 3]),
        ([100, 200, 300, 400, 500], 1, 200, set(), [100, 300]),
        ([10, 20, 30], 1, 0, {10}, [20]),  # the checkpoint just resumed from / saved is never deleted
        ([10], 1, 0, set(), []),
        ([], 3, 0, set(), []),
    ],
)
def test_retention(steps, keep_last, keep_every, protect, deleted):
    assert store.steps_to_delete(steps, keep_last, keep_every, protect) == deleted


def test_delete_and_resave_same_step_leave_no_half_directory(tmp_path):
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 4, files={"__0_0.distcp": b"new", ".metadata": b"m", "kiln.json": b"{}"})
    assert (tmp_path / "step_000004" / "__0_0.distcp").read_bytes() == b"new"
    store.delete_checkpoint(tmp_path, 4)
    assert list(tmp_path.iterdir()) == [tmp_path / store.LATEST]
