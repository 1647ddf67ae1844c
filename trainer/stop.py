"""Graceful stop: a signal (Slurm's pre-timeout USR1/USR2) or a STOP file in the run dir.

Every rank polls once per optimizer step and the ranks agree (all-reduce; the loop fuses it with
the step's loss), so they all checkpoint at the same step boundary and exit together.
"""
from __future__ import annotations

import signal
from pathlib import Path

from trainer.dist import any_rank


class Stopper:
    def __init__(self, stop_file: Path, signals: tuple[str, ...] = ("SIGUSR1", "SIGUSR2")):
        self.stop_file = stop_file
        self.received: str | None = None
        for name in signals:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def local(self) -> bool:
        """This rank's request, without a collective (the loop sums it over ranks with the step's loss)."""
        return self.received is not None or self.stop_file.exists()

    def requested(self, device: str) -> bool:
        return any_rank(self.local(), device)
