"""Graceful stop: a signal (Slurm's pre-timeout USR1/USR2) or a STOP file in the run dir.

Every rank polls once per optimizer step and the ranks agree (all-reduce; the loop fuses it with
the step's loss), so they all checkpoint at the same step boundary and exit together.

Under Slurm the batch script traps the signal and writes STOP, holding the attempt's key
(launcher/rundir.py STOP_KEY_ENV). At start, rank 0 removes a STOP that an earlier attempt (or an
earlier local run) left, and keeps one holding this attempt's key: the signal came while the ranks
were starting (importing, loading the model), and they checkpoint at their first step.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Mapping

from launcher.rundir import STOP_KEY_ENV
from trainer.dist import any_rank


def clear_stale(stop_file: Path, environ: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 at start: remove an earlier attempt's STOP; keep one that this attempt's batch script
    wrote. Returns whether a STOP stands (a stop was asked for while the ranks were starting). The STOP
    found is first renamed aside, atomically, and judged there: a STOP the trap writes meanwhile (by
    rename too, never half-written) is a new file, and stays."""
    key = environ.get(STOP_KEY_ENV)
    seen = stop_file.with_name(stop_file.name + ".seen")
    try:
        os.replace(stop_file, seen)
    except FileNotFoundError:
        return False
    try:
        live = bool(key) and seen.read_text().strip() == key
    except (OSError, UnicodeDecodeError):
        live = False
    if live:
        os.replace(seen, stop_file)
    else:
        seen.unlink(missing_ok=True)
    return stop_file.exists()


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
