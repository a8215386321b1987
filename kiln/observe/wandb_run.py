"""The W&B run of a run directory: its id, how it is opened, and which steps it already holds.

* **One run id per run directory**, in ``<run_dir>/wandb/run_id``, created on first use and kept
  for every later launch and restart. A run directory from before the id lived there takes the
  id its newest checkpoint saved (``callback.WandbLogger``), so its W&B run goes on; checkpoints
  no longer carry the id.
* **Mode**: ``offline`` and ``online`` as configured, except that ``online`` without an API key
  (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or ``wandb login``'s netrc entry) or without a
  reachable server, or whose ``wandb.init`` fails, logs offline after one warning.
* **What W&B already holds** (a new launch ships only the steps after it): online, the resumed
  run's last step as the server reports it (``starting_step`` is that step + 1); offline, the
  highest step in the transaction logs of earlier sessions of the id under ``<run_dir>/wandb``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import string
from pathlib import Path
from urllib.parse import urlsplit

from kiln.observe.wandb_records import last_logged_step

log = logging.getLogger("kiln")

DEFAULT_BASE_URL = "https://api.wandb.ai"
NETWORK_CHECK_TIMEOUT_S = 5.0
INIT_TIMEOUT_S = 60.0


def new_wandb_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits  # the alphabet of W&B's own run ids
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_id_for(run_dir: Path, checkpoint_root: Path) -> str:
    """The run directory's W&B run id, created on first use.

    The id is written to a private file, flushed, then hard-linked into place: a link never
    replaces an existing file, so processes racing to create it all end up reading one id.
    """
    path = run_dir / "wandb" / "run_id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(f".run_id.{os.getpid()}.{secrets.token_hex(4)}")
    with open(private, "w") as f:
        f.write((checkpointed_run_id(checkpoint_root) or new_wandb_run_id()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(private, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: a rename is atomic too, but last one wins
        os.replace(private, path)
    finally:
        private.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path.read_text().strip()


def checkpointed_run_id(checkpoint_root: Path) -> str | None:
    """The W&B run id the newest checkpoint saved, from kiln versions that kept it there."""
    from kiln.checkpoint.state import read_metadata
    from kiln.checkpoint.store import published_steps, step_dir_name

    for step in reversed(published_steps(checkpoint_root)):
        try:
            meta = read_metadata(checkpoint_root / step_dir_name(step))
        except Exception:  # noqa: BLE001 - an unreadable checkpoint: look at the one before
            continue
        run_id = meta.get("parts", {}).get("callback.WandbLogger", {}).get("run_id")
        if run_id:
            return run_id
    return None


def why_not_online() -> str | None:
    """Why an online run cannot start here (no credentials, no route to the server), or None."""
    base_url = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _netrc_key(base_url)):
        return "no API key (set WANDB_API_KEY or run `wandb login`)"
    url = urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=NETWORK_CHECK_TIMEOUT_S).close()
    except OSError as err:
        return f"{url.hostname}:{port} is unreachable ({err})"
    return None


def _netrc_key(base_url: str) -> bool:
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return read_netrc_auth(host=base_url) is not None
    except Exception:  # noqa: BLE001 - a malformed netrc or a moved wandb API: no usable key
        return False


def open_run(logging_config, run_dir: Path, run_id: str, run_config: dict):
    """``(run, last step W&B holds or None)`` for the configured mode, online falling back to offline."""
    mode = logging_config.wandb
    if mode == "online" and (reason := why_not_online()):
        _warn_offline(reason, run_dir)
        mode = "offline"
    try:
        return _init(mode, logging_config, run_dir, run_id, run_config)
    except Exception as err:  # noqa: BLE001 - any failure to reach the server: log offline instead
        if mode != "online":
            raise
        _warn_offline(f"wandb.init failed: {err}", run_dir)
        return _init("offline", logging_config, run_dir, run_id, run_config)


def _warn_offline(reason: str, run_dir: Path) -> None:
    log.warning(f"W&B online is unavailable: {reason}; logging offline to {run_dir / 'wandb'} instead "
                f"(upload it later with `wandb sync`)")


def _init(mode: str, logging_config, run_dir: Path, run_id: str, run_config: dict):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    # Offline: read the earlier sessions' logs before this session adds its own.
    earlier_offline = last_logged_step(run_dir / "wandb", run_id) if mode == "offline" else None
    run = wandb.init(
        mode=mode, project=logging_config.wandb_project, entity=logging_config.wandb_entity,
        name=logging_config.wandb_name or run_dir.name, group=logging_config.wandb_group,
        tags=list(logging_config.wandb_tags) or None, notes=logging_config.wandb_notes,
        dir=str(run_dir), config=run_config, id=run_id, resume="allow",
        # No console capture (kiln logs its own lines) and no system stats: metrics.jsonl is the history.
        settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=INIT_TIMEOUT_S),
    )
    log.info(f"W&B {mode}: {Path(run.dir).parent}" + (" (upload it with `wandb sync`)" if mode == "offline" else ""))
    return ServiceClosingRun(run), (earlier_offline if mode == "offline" else server_last_step(run))


class ServiceClosingRun:
    """A W&B run whose ``finish`` also shuts W&B's service down: ``run.finish()`` returns before the
    service has written the last rows of the transaction log, which a new launch reads for catch-up."""

    def __init__(self, run) -> None:
        self.run = run

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def finish(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()


def server_last_step(run) -> int | None:
    """The last step of a resumed online run: the server reports the next one as ``starting_step``."""
    candidates = [run.starting_step - 1] if run.starting_step > 0 else []
    summary_step = run.summary.get("_step")
    if isinstance(summary_step, (int, float)):
        candidates.append(int(summary_step))
    return max(candidates, default=None)
