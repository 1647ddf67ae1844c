"""Resuming a checkpoint on a different number of ranks.

A ZeRO checkpoint is cut by the world that wrote it: each rank saved its own slice of the fp32
weights and of the optimizer state, and DeepSpeed loads it only into the same data-parallel world
size ("The checkpoint being loaded used a DP world size of 2 but the current world size is 1").
When the ranks wake up in another world than the one that wrote ``latest`` (its COMPLETE record
says which), the trainer uses DeepSpeed's universal checkpoint instead: rank 0 converts the
checkpoint once with DeepSpeed's ds_to_universal (one folder per parameter holding its fp32
weights, Adam moments and step; trainer/checkpoint.py ``ensure_universal``), and the engine,
configured with ``checkpoint.load_universal``, cuts it anew for this world. The global batch is
kept by launcher/batch.py ``fit_world``; the sample order, the LR schedule and the step continue
(README, "Resuming on a different world size"). What DeepSpeed cannot convert is refused here,
before the model is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from launcher.config import BNB_OPTIMIZERS, ConfigError, RunConfig
from launcher.rundir import RunDir
from trainer import checkpoint


@dataclass(frozen=True)
class Resume:
    """What the run resumes from: ``tag`` (None: a fresh start), the world size that wrote it, and
    whether it is loaded from its universal form."""
    tag: Optional[str] = None
    written_world: Optional[int] = None
    world: int = 1
    universal: bool = False

    @property
    def note(self) -> Optional[str]:
        if not self.universal:
            return None
        return (f"checkpoint {self.tag} was written by {self.written_world} rank(s) and this job has {self.world}: "
                f"it is loaded from DeepSpeed's universal checkpoint ({self.tag}/universal), which cuts the "
                f"weights and optimizer state for {self.world} rank(s)")


def unsupported(cfg: RunConfig, tag: str, written: int, world: int) -> list[str]:
    """Why this run's checkpoint cannot move from ``written`` to ``world`` ranks (empty: it can)."""
    where = (f"checkpoint {tag} in {RunDir(cfg.run_dir).checkpoints} was written by {written} rank(s) but this "
             f"job started {world}")
    fix = (f"resume it on {written} rank(s), the world that wrote it (the same config, started on {written} "
           f"ranks: e.g. torchrun --nproc_per_node {written}, or sbatch --nodes/--gpus-per-node for {written}), "
           "or start a new run_dir")
    t = cfg.train
    if t.optimizer in BNB_OPTIMIZERS and cfg.zero.stage > 0:
        return [f"{where}; 'train.optimizer' = {t.optimizer!r} cannot change world size under zero.stage="
                f"{cfg.zero.stage}: DeepSpeed's universal checkpoint (ds_to_universal) converts Adam's "
                "exp_avg / exp_avg_sq, and a bitsandbytes 8-bit optimizer keeps quantized state1/state2 with "
                f"per-block absmax instead, partitioned by the {written} ranks; {fix}"]
    return []


def plan_resume(cfg: RunConfig, world) -> Resume:
    """Before the model is built: the checkpoint this run resumes from (the newest complete one whose
    files match their manifest: trainer/checkpoint.py ``choose``), and in which form. Same world
    (or ZeRO-0, which does not partition): DeepSpeed's own files. Another world: the universal form,
    converted now (rank 0, once; every rank waits). What DeepSpeed cannot convert is refused
    (ConfigError, exit 2). The global batch needs no check here: the run dir holds one run's config
    (launcher/rules_disk.py), and fit_world keeps its global batch in any world."""
    ckpt_dir = RunDir(cfg.run_dir).checkpoints
    tag = checkpoint.choose(ckpt_dir) if cfg.checkpoint.resume else None  # the newest undamaged one
    if tag is None:
        return Resume(world=world.world_size)
    written = checkpoint.written_world(ckpt_dir / tag)
    same = Resume(tag, written, world.world_size)
    if written is None or written == world.world_size or cfg.zero.stage == 0:
        return same
    problems = unsupported(cfg, tag, written, world.world_size)
    if problems:
        raise ConfigError(problems)
    try:
        checkpoint.ensure_universal(ckpt_dir / tag)
    except checkpoint.ConversionError as e:
        raise ConfigError([f"checkpoint {tag} was written by {written} rank(s) but this job started "
                           f"{world.world_size}, and converting it to DeepSpeed's universal form failed: {e}; "
                           f"resume it on {written} rank(s)"]) from None
    return Resume(tag, written, world.world_size, universal=True)
