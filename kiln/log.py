"""One logger for kiln: rank 0 prints to the console, every rank may also log to its own file."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path

logger = logging.getLogger("kiln")


def setup_logging(rank: int, log_dir: Path | None = None, all_ranks: bool = False) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("[kiln] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        console.addFilter(lambda record: record.name.startswith("kiln"))
        root.addHandler(console)
    if all_ranks and log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        per_rank = logging.FileHandler(log_dir / f"rank{rank}.log")
        per_rank.setFormatter(logging.Formatter(f"[kiln r{rank}] %(asctime)s %(name)s %(message)s"))
        root.addHandler(per_rank)
    quiet_third_party()


def quiet_third_party() -> None:
    """megatron-core and torch warn about missing optional kernels on every import; kiln says it once."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    # megatron-core 0.19 says these on import: an optional logging package, an unused model class.
    warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")
    warnings.filterwarnings("ignore", message=".*MimoModelConfig is experimental.*")
    # torch says this on every CPU-only import of cpp_extension (megatron-core imports it).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    for name in ("megatron", "megatron.core", "torch.distributed", "streaming"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


@functools.cache
def warn_once(message: str) -> None:
    logger.warning(message)
