"""torchrun's elastic agent as ``kiln train --nproc-per-node`` starts it: one stop signal, one stop.

``python -m kiln.torchrun_agent`` takes torchrun's arguments and runs torchrun's own ``main``,
with two changes to how the agent treats a stop signal (SIGTERM, SIGUSR1):

* Only the first one counts. torchrun turns it into ``SignalException``, sends the same signal to
  the workers and waits ``--shutdown-timeout`` for them to save. Under Slurm every process of the
  step gets the signal, and the ``kiln train`` launcher forwards it too, so a second one arrives
  during that wait; torchrun's handler raises again, which cuts the wait short and makes the
  agent shut the workers down a second time with its default SIGTERM. The workers then saw
  SIGTERM after Slurm's SIGUSR1, and the agent exited with two chained tracebacks.
* The ``SignalException`` that ends the run is the expected outcome of a stop, not a crash: the
  agent exits with 128 + the signal and no traceback. Whether the workers saved is theirs to say
  (the launcher reads their ``preempted.json``); a worker's failure still raises as torchrun does.
"""

from __future__ import annotations

import sys


def _first_stop_only(handler):
    """torchrun's signal handler, called for the first signal only; later ones are absorbed."""
    received: list[int] = []

    def handle(signum, frame):
        if received:
            return  # already shutting the workers down for the first signal
        received.append(signum)
        handler(signum, frame)

    return handle


def main() -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing import api as elastic_api

    # torchrun registers this module attribute as the handler when it starts the workers. If a
    # torch release renames it, the agent behaves as plain torchrun (the workers still name the
    # first signal; see kiln.trainer.preemption).
    if hasattr(elastic_api, "_terminate_process_handler"):
        elastic_api._terminate_process_handler = _first_stop_only(elastic_api._terminate_process_handler)
    try:
        torchrun.main()
    except SignalException as stop:
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
