"""Set-up for a trainer's helper processes (checkpoint writers, the writer-results server).

Imports nothing heavy: it is the initializer of a *spawned* process, where importing torch
would add seconds to the first save.
"""

from __future__ import annotations

import signal


def quiet_helper_process() -> None:
    """Ignore stop signals (the trainer handles them and waits for its helpers) and die with
    the trainer, so a SIGKILLed trainer leaves no orphan holding a checkpoint directory."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a helper may outlive a killed trainer, harmlessly, inside .partial
