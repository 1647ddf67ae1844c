"""Best-checkpoint selection and early stopping: pure bookkeeping over (step, metric value).

An evaluation *improves* when its value beats the best so far by more than ``min_delta`` (higher
for mode max, lower for mode min; the first finite value always improves). The best step is the
last improvement; after ``patience`` evaluations in a row without one, training stops. The state
is a small dict that goes into each checkpoint, so a resumed run keeps counting.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Verdict:
    improved: bool  # this step is the new best: keep its weights
    stop: bool  # patience is used up: stop training now


@dataclass
class EarlyStopping:
    metric: str
    mode: str  # "max" | "min"
    patience: Optional[int]  # None = never stop, only select the best
    min_delta: float = 0.0
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    stopped_step: Optional[int] = None

    @classmethod
    def from_config(cls, es, state: Optional[dict] = None) -> "EarlyStopping":
        tracker = cls(es.metric, es.mode, es.patience, es.min_delta)
        if state:
            tracker.best_value, tracker.best_step = state["best_value"], state["best_step"]
            tracker.bad_evals, tracker.stopped_step = state["bad_evals"], state["stopped_step"]
        return tracker

    def improves(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, step: int, metrics: dict[str, float]) -> Verdict:
        """Record the evaluation at optimizer step ``step``."""
        value = metrics[self.metric]
        if self.improves(value):
            self.best_value, self.best_step, self.bad_evals = float(value), step, 0
            return Verdict(improved=True, stop=False)
        self.bad_evals += 1
        stop = self.patience is not None and self.bad_evals >= self.patience
        if stop:
            self.stopped_step = step
        return Verdict(improved=False, stop=stop)

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best_value", "best_step", "bad_evals", "stopped_step")}

    def summary(self) -> str:
        if self.best_step is None:
            return f"no finite {self.metric} was seen; the export holds the last weights"
        return f"best checkpoint: step {self.best_step} ({self.metric} {self.best_value:.4f}, mode {self.mode})"
