"""kiln's megatron-core version shim: the pin this Python gets, and what each version needs."""

from __future__ import annotations

import sys

import pytest
from packaging.requirements import Requirement

from kiln.errors import KilnCheckpointError
from kiln.parallel import megatron_compat
from tests.kiln_run import REPO


def test_the_installed_megatron_core_is_the_one_pinned_for_this_python():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    requirements = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = [str(r.specifier) for r in requirements if r.name == "megatron-core" and (r.marker is None or r.marker.evaluate())]
    assert len(pins) == 1, f"Python {sys.version_info[:2]} matches megatron-core pins {pins}"
    assert pins[0] == f"=={megatron_compat.version('megatron-core')}"


@pytest.mark.parametrize("installed, kwargs", [((0, 16), {}), ((0, 19), {"async_strategy": "mcore"})])
def test_async_saves_use_megatrons_own_writer(monkeypatch, installed, kwargs):
    monkeypatch.setattr(megatron_compat, "megatron_core_version", lambda: installed)
    assert megatron_compat.async_save_kwargs() == kwargs


@pytest.mark.parametrize("installed, saved, readable", [
    ((0, 16), "0.16.1", True), ((0, 16), "unknown", True), ((0, 16), "0.19.2", False),
    ((0, 19), "0.16.1", True), ((0, 19), "0.19.2", True),
])
def test_a_checkpoint_of_a_newer_megatron_core_is_refused_with_the_reason(monkeypatch, installed, saved, readable):
    monkeypatch.setattr(megatron_compat, "megatron_core_version", lambda: installed)
    if readable:
        megatron_compat.check_can_read_checkpoint(saved, "ckpt/step_000002")
    else:
        with pytest.raises(KilnCheckpointError, match=r"ckpt/step_000002 was saved with megatron-core 0\.19\.2"):
            megatron_compat.check_can_read_checkpoint(saved, "ckpt/step_000002")
