"""A scheduler's notice that the job must end soon (SIGTERM, or SLURM's ``--signal=USR1@120``), turned into
a stop at the next step boundary on every rank, with a checkpoint, and an exit status a requeue script
can act on.

A signal reaches one process, or all of them at slightly different steps. The handler only raises a
flag; the ranks agree on it through the all-reduce the loss makes every step anyway (the flag rides
along as one more number, :attr:`lilt_ds.losses.ContrastiveLoss.step_signal`), and the trainer reads
the sum with the step's loss, in the one host sync a step makes. A run that gets no signal pays
nothing.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger("lilt_ds")

PREEMPTED_EXIT_STATUS = 75
"""The exit status of a run stopped by one of ``train.stop_signals`` after its checkpoint (EX_TEMPFAIL
of sysexits.h: try again later). A requeue script resumes it with ``--resume auto``."""


class StopRequest:
    """Catches ``names`` while installed; :attr:`flag` is a device tensor, 1 once a signal came."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = list(names)
        self.received: str | None = None
        self._zero = torch.zeros(1, device=device)
        self._one = torch.ones(1, device=device)
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: stopping at the next step boundary with a checkpoint", self.received)

    def install(self) -> StopRequest:
        """Catch the signals (the main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: train.stop_signals are not caught")
            return self
        for name in self.names:
            number = signal.Signals[name]
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    @property
    def flag(self) -> torch.Tensor:
        """What this rank adds to the step's all-reduce: 1 once a signal came, else 0 (no copy, no sync)."""
        return self._zero if self.received is None else self._one
