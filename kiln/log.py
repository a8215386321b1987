"""One logger for kiln: rank 0 prints to the console, every rank may also log to its own file."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

logger = logging.getLogger("kiln")


def setup_logging(rank: int, log_dir: Path | None = None, all_ranks: bool = False, console_stream=None) -> None:
    """Rank 0's log lines to ``console_stream`` (default stdout; commands that print their result
    there, such as ``kiln generate``, log to stderr)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("[kiln] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(console_stream or sys.stdout)
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


# -- live progress lines (kiln train's rank 0, kiln data prepare) --------------------------------
PROGRESS_MODES = ("auto", "bar", "plain")
_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% ETA {remaining} ({elapsed} so far, {rate_fmt}{postfix})"


def wants_progress_bar(mode: str, stream) -> bool:
    """``bar`` or ``plain`` as asked; ``auto``: a bar on a terminal, outside Slurm (whose output is
    a file that carriage returns would fill with every update)."""
    if mode != "auto":
        return mode == "bar"
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "SLURM_JOB_ID" not in os.environ


def progress_bar(*, total: float, initial: float, desc: str, unit: str, stream, unit_scale: bool = False):
    """A tqdm line that redraws itself in place: ``desc n/total |bar| pct% ETA m:ss (...)``."""
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(stream.fileno())
        follow_the_size = size.columns > 0 and size.lines > 0
    except (AttributeError, OSError, ValueError):
        follow_the_size = False
    # A terminal that reports no size (a container's tty) gets a fixed one: tqdm would draw nothing.
    sizing = {"dynamic_ncols": True} if follow_the_size else {"ncols": 100, "nrows": 24}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, file=stream,
                bar_format=_BAR_FORMAT, smoothing=0.1, **sizing)


def write_logs_above_the_bar(stream) -> Callable[[], None]:
    """Make the logging handlers that write to ``stream`` write above its progress bars; returns
    what puts them back."""
    redirected = [(handler, handler.setStream(AboveTheBar(stream))) for handler in logging.getLogger().handlers
                  if isinstance(handler, logging.StreamHandler) and handler.stream is stream]

    def restore() -> None:
        for handler, original in redirected:
            handler.setStream(original)

    return restore


class AboveTheBar:
    """A stream for a logging handler: each write clears the progress bars drawn on ``stream``,
    writes the line, and draws them again below it."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            self.stream.write(text)
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
