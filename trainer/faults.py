"""Faults inside the training step: non-finite steps (train.on_nonfinite) and a hung step
(dist.step_timeout_s). README "What it survives" lists every fault and the test that shows it.

Non-finite steps. A step whose loss or gradient norm is NaN/Inf updates nothing: no weight, no
optimizer state, no LR-schedule step. DeepSpeed skips such a step itself wherever it checks the norm
(ZeRO-1/2/3, and every bf16 path: its overflow check zeroes the gradients, leaves the optimizer and
the scheduler alone and reports the norm as inf; launcher/ds_config.py owns bf16.check_grad_overflow
so that ZeRO-1/2 bf16 checks too). Plain fp32 ZeRO-0 hands the gradients straight to the torch
optimizer with no check at all; there :meth:`NonFinite.guard` makes that step a no-op in the same
way. The verdict is the same on every rank: the norm is over the reduced gradients of all ranks (a
NaN on one rank reaches every rank's), and the loss read in the step's one sync is summed over ranks.

A hung step. :class:`Watchdog` is a thread armed at each step's start and disarmed after the step's
sync; a step that outlives ``dist.step_timeout_s`` ends the process with a message naming the step
and the rank, and every thread's Python stack (which says where this rank is stuck).
"""
from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from launcher.errors import EXIT_HUNG, EXIT_NONFINITE


def thread_stacks() -> str:
    """Every thread's Python stack, most recent call last: file, line and function only, read from
    the frames. No source line is read: a step hung on a stalled file system must not hang its
    watchdog in a stat() or read() of the code (traceback's linecache would)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        calls = [f'  File "{f.f_code.co_filename}", line {line}, in {f.f_code.co_name}'
                 for f, line in traceback.walk_stack(frame)]
        out.append(f"Thread {names.get(ident, ident)} (most recent call last):\n" + "\n".join(reversed(calls)))
    return "\n".join(out)


def write_report(rank: int, text: str) -> None:
    """``text`` on stderr with every line led by ``[rank R]``, written whole lines at a time in writes
    of at most PIPE_BUF bytes (atomic on a pipe, as srun gives, and on a file): the ranks of a hung step
    report at the same moment into one log, and a report written piece by piece (as faulthandler
    writes) would be cut mid-line by the others'."""
    sys.stderr.flush()
    chunk = b""
    for line in text.splitlines():
        data = f"[rank {rank}] {line}\n".encode("utf-8", "replace")[:select.PIPE_BUF]
        if len(chunk) + len(data) > select.PIPE_BUF:
            _write_all(chunk)
            chunk = b""
        chunk += data
    _write_all(chunk)


def _write_all(data: bytes) -> None:
    while data:
        data = data[os.write(2, data):]


def exit_code(status: str) -> int:
    """A finished run's exit code from train()'s status: done, already done or preempted (checkpointed
    to resume) 0; stopped on non-finite steps 3; anything else 1."""
    return {"done": 0, "already_done": 0, "preempted": 0, "nonfinite": EXIT_NONFINITE}.get(status, 1)


class NonFinite:
    """The non-finite-step policy and its counters (``train.on_nonfinite``, ``max_nonfinite_steps``)."""

    def __init__(self, engine, policy: str, limit: int, total: int = 0, start_step: int = 0):
        self.engine, self.policy, self.limit = engine, policy, limit
        # fp16: an overflow of the loss-scaled gradients with a finite loss is DeepSpeed's dynamic loss
        # scaling at work (it skips the step and lowers the scale); only a non-finite loss counts there.
        self.scaled = engine.fp16_enabled()
        self.total = total  # non-finite steps of the run (kept in checkpoints; logged as train/nonfinite_steps)
        self.in_a_row = 0  # counted from this start: a resumed run gets max_nonfinite_steps anew
        self.last_good = start_step  # the state the model is in is the one after this step
        self.applied = True  # whether the last step's update was applied
        self.applied_in_row = 0  # non-finite steps of the current row that were applied (finite gradients)

    @contextlib.contextmanager
    def guard(self, norm):
        """Around the engine.step() that ends a step. ``norm``: trainer/optim.py GradNorm after
        before_step(). On plain fp32 ZeRO-0 (where GradNorm computes the norm itself) a non-finite norm
        makes that engine.step() apply nothing: DeepSpeed clips the gradients, calls the optimizer
        (here a no-op), then drops the gradients; ``overflow`` is what DeepSpeed's own optimizers say
        on a skipped step, so the engine counts it as skipped and leaves the LR schedule alone. This
        reads the norm on the host, one sync that DeepSpeed's checking paths make inside their step."""
        if not norm.own or norm.value is None or math.isfinite(float(norm.value)):
            yield
            return
        optimizer = self.engine.optimizer  # the client torch optimizer itself on this path
        step = optimizer.step
        optimizer.step = lambda *args, **kwargs: None
        optimizer.overflow = True
        try:
            yield
        finally:
            optimizer.step = step
            del optimizer.overflow

    def count(self, step: int, loss: float, applied: bool) -> bool:
        """After optimizer step ``step`` (1-based), with the loss every rank read and whether the engine
        applied the update (engine.was_step_applied(): the same on every rank): was it a non-finite step?
        Not applied (a NaN/Inf gradient norm; under fp16 only with a non-finite loss, as a finite one is
        the loss scaler at work), or applied with a non-finite loss (its gradients were finite)."""
        self.applied = applied
        bad = not math.isfinite(loss) or (not applied and not self.scaled)
        if bad:
            self.total += 1
            self.in_a_row += 1
            self.applied_in_row += applied
        else:
            self.in_a_row = self.applied_in_row = 0
            self.last_good = step
        return bad

    @property
    def stop(self) -> bool:
        return self.policy == "stop" and self.in_a_row >= self.limit

    def skipped_note(self, step: int, loss: float, grad_norm: Optional[float]) -> str:
        limit = (f" of at most {self.limit} (train.on_nonfinite=stop, train.max_nonfinite_steps={self.limit})"
                 if self.policy == "stop" else " (train.on_nonfinite=skip)")
        what = ("its update was skipped (weights, optimizer state and LR schedule unchanged)" if not self.applied
                else "its gradients were finite, so its update was applied")
        return (f"step {step}: non-finite loss {loss} / gradient norm {grad_norm}: {what}; {self.in_a_row} in a "
                f"row{limit}, {self.total} so far")

    def stop_message(self, step: int, checkpoint) -> str:
        first = step - self.in_a_row + 1
        good = f"step {self.last_good}" if self.last_good else "step 0 (the initial weights)"
        held = (f"none of them was applied, so checkpoint {checkpoint} holds the weights and optimizer state after "
                f"{good}" if not self.applied_in_row else f"{self.applied_in_row} of them had finite gradients and "
                f"were applied; checkpoint {checkpoint} holds the state after step {step}")
        return (f"stopped: steps {first}-{step} had a non-finite loss or gradient norm ({self.in_a_row} in a row, "
                f"train.max_nonfinite_steps={self.limit}); {held}. Usual causes: a learning rate too high for this "
                "model, broken rows in the data of these steps, an overflow in low precision. Rerunning with the "
                "same run dir resumes from that checkpoint after the bad steps; add train.on_nonfinite=skip to skip "
                f"such steps and go on (exit code {EXIT_NONFINITE})")


class Watchdog:
    """``dist.step_timeout_s``: a step that has not finished that long after it started ends this
    process (exit 4) with a message naming the step and the rank, and the Python stack of every thread.
    0 = off (no thread). Armed at each step's start and disarmed after the step's sync, so evaluation
    and checkpoint saves are not timed (their collectives have the process-group timeout,
    dist.timeout_min). Every rank of a hung step fires at about the same time: the stuck rank, and
    the ranks waiting for it in a collective (their stacks show the collective). Before it exits a
    firing rank waits ``grace_s``, so that the other ranks' reports are printed too before the
    launcher (torchrun, srun) stops them."""

    def __init__(self, timeout_s: float, rank: int, grace_s: float = 3.0,
                 exit: Callable[[int], None] = os._exit):
        self.timeout_s, self.rank, self.grace_s, self._exit = timeout_s, rank, grace_s, exit
        self._armed: Optional[tuple[int, float]] = None  # (step, deadline): one attribute, written at once
        self._closed = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def arm(self, step: int) -> None:
        if self._thread is not None:
            self._armed = (step, time.monotonic() + self.timeout_s)

    def disarm(self) -> None:
        self._armed = None

    def close(self) -> None:
        self._armed = None
        self._closed.set()

    def _watch(self) -> None:
        # A new deadline is always later than the one being waited for, and a disarmed watchdog
        # re-checks every timeout_s: no deadline is ever passed by more than the thread's wake-up.
        while not self._closed.is_set():
            armed = self._armed
            wait = self.timeout_s if armed is None else armed[1] - time.monotonic()
            if armed is not None and wait <= 0 and armed is self._armed:
                self._fire(armed[0])
                return
            self._closed.wait(max(wait, 0.01))

    def _fire(self, step: int) -> None:
        t = f"{self.timeout_s:g}"
        message = (f"error: rank {self.rank} (host {socket.gethostname()}, pid {os.getpid()}): step {step} has "
                   f"not finished after {t} s (dist.step_timeout_s = {t}). This rank is stuck in it, or waits in a "
                   "collective for a rank that is: the Python stacks below say which (a waiting rank sits in a "
                   "collective such as all_reduce). Ending the process "
                   f"(exit {EXIT_HUNG}) so that the job fails now instead of hanging until its time limit.")
        try:
            write_report(self.rank, message + "\n" + thread_stacks())
            time.sleep(self.grace_s)
        finally:  # whatever the report met, the process ends
            self._exit(EXIT_HUNG)
