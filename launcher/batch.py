"""Batch arithmetic, in one place: DeepSpeed's rule train_batch_size = micro x accum x world."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from launcher.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def tokens_per_step(self, seq_len: int) -> int:
        """Upper bound: every sequence at full length."""
        return self.global_batch_size * seq_len


def batch_problems(micro: int, accum: int, global_batch: Optional[int], world: int) -> list[str]:
    if global_batch is None:
        return []
    per_step = micro * world
    if global_batch % per_step:
        lo = max(per_step, global_batch // per_step * per_step)
        return [f"'train.global_batch_size' = {global_batch} is not divisible by micro_batch_size "
                f"x world size = {micro} x {world} = {per_step}; use a multiple of {per_step} "
                f"(e.g. {lo} or {lo + per_step}) or change train.micro_batch_size"]
    return []


def plan_batch(micro: int, accum: int, global_batch: Optional[int], world: int) -> BatchPlan:
    """The configured plan. With ``global_batch`` set, accumulation is derived from it."""
    problems = batch_problems(micro, accum, global_batch, world)
    if problems:
        raise ConfigError(problems)
    if global_batch is not None:
        accum = global_batch // (micro * world)
    return BatchPlan(micro, accum, world)


def fit_world(planned: BatchPlan, actual_world: int, policy: str) -> tuple[BatchPlan, Optional[str]]:
    """The plan for the world the ranks actually woke up in.

    The global batch is the invariant. ``adapt`` changes accumulation to keep it when the new
    world divides it; otherwise (or with ``error``) raise a message naming both numbers.
    Returns (plan, note) where note says what changed, or None.
    """
    if actual_world == planned.world_size:
        return planned, None
    gbs, micro = planned.global_batch_size, planned.micro_batch_size
    where = (f"the config plans world size {planned.world_size} (global batch {gbs} = micro "
             f"{micro} x accum {planned.grad_accum} x world {planned.world_size}) but the job "
             f"started {actual_world} ranks")
    if policy == "adapt" and gbs % (micro * actual_world) == 0:
        new = BatchPlan(micro, gbs // (micro * actual_world), actual_world)
        return new, f"{where}; keeping global batch {gbs} by setting grad_accum {planned.grad_accum} -> {new.grad_accum}"
    if policy == "adapt":
        raise ConfigError([f"{where}, and {gbs} is not divisible by micro x world = {micro * actual_world}; "
                         f"set dist.nodes/dist.procs_per_node to match the job, or pick "
                         f"train.global_batch_size divisible by {micro * actual_world}"])
    raise ConfigError([f"{where}; set dist.nodes/dist.procs_per_node to match the job, "
                     f"or dist.on_world_mismatch=adapt to keep the global batch by changing accumulation"])
