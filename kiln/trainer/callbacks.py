"""Side concerns around the loop: console line, metrics.jsonl, Weights & Biases.

Each sink gets the same metrics dict on logged steps; only the logging rank builds them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("kiln")


class Callback:
    def on_log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleLogger(Callback):
    def __init__(self, max_steps: int) -> None:
        self.width = len(str(max_steps))

    def on_log(self, m: dict[str, Any]) -> None:
        log.info(
            f"step {m['step']:>{self.width}} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
            f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tok/s | {m['step_time_s'] * 1000:.0f} ms"
            + (f" | MFU {m['mfu'] * 100:.1f}%" if m.get("mfu") is not None else "")
            + (f" | data wait {m['data_wait_frac'] * 100:.1f}%" if m.get("data_wait_frac") is not None else "")
            + (f" | val loss {m['val_loss']:.4f}" if "val_loss" in m else "")
        )


class JsonlLogger(Callback):
    """One JSON object per logged step, appended and flushed (a crash loses nothing logged)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)

    def on_log(self, m: dict[str, Any]) -> None:
        self.file.write(json.dumps(m) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbLogger(Callback):
    """W&B run in the run directory; offline mode needs no network and no API key.

    Resumed runs pass the checkpoint's run id, so the dashboard shows one continuous run.
    """

    def __init__(self, mode: str, project: str, entity: str | None, name: str, run_dir: Path, config: dict,
                 run_id: str | None = None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=mode,
            project=project,
            entity=entity,
            name=name,
            dir=str(run_dir),
            config=config,
            id=run_id,  # the checkpoint keeps it: a resumed run continues the same W&B run
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        log.info(f"W&B {mode}: {Path(self.run.dir).parent}" + (" (upload later with `wandb sync`)" if mode == "offline" else ""))

    def on_log(self, m: dict[str, Any]) -> None:
        self.run.log({(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"): v for k, v in m.items() if k != "step"},
                     step=m["step"])

    def close(self) -> None:
        self.run.finish()
