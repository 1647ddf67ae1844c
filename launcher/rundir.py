"""The run directory's layout, named once: every file and folder a run reads or writes.

    RUN_DIR/config.yaml         the resolved run config (the launcher writes it; the trainer reads it back)
    RUN_DIR/ds_config.json      the DeepSpeed config (rewritten by the trainer for the world it woke up in)
    RUN_DIR/finetune.sh         the batch script          RUN_DIR/hostfile   for `launcher run --nnodes N`
    RUN_DIR/world.json          every rank's view of the world
    RUN_DIR/metrics.jsonl, tb/  scalars (rank 0)          RUN_DIR/loss_curve.png
    RUN_DIR/checkpoints/        DeepSpeed checkpoints, `latest`, best/ (each a checkpoint folder:)
        stepNNNNNNNN/           one checkpoint (DeepSpeed's files), tagged by its optimizer step
        stepNNNNNNNN/rng_rank{r}.pt   rank r's RNG state
        stepNNNNNNNN/manifest.json    every file's size and checksum (trainer/manifest.py), written before COMPLETE
        stepNNNNNNNN/COMPLETE   written last: the step and the world size that wrote it
        stepNNNNNNNN/universal/ DeepSpeed's universal form, converted once when another world size resumes
                                it (its own COMPLETE is written last); latest_universal names it;
                                universal.failed holds a failed conversion's error
    RUN_DIR/checkpoints/stepNNNNNNNN.damaged/   a checkpoint a resume found damaged, set aside (never loaded,
                                pruned or replaced); its DAMAGED file (the COMPLETE it had) says what is wrong
    RUN_DIR/checkpoints/stepNNNNNNNN.old/   a complete checkpoint of a step being saved again (best/ after
                                a restart), removed once the new one is complete, put back if it never is
    RUN_DIR/eval/stepNNNNNNNN/  classification reports
    RUN_DIR/export/, adapter/   the exported model / peft adapter
    RUN_DIR/STOP                checkpoint at the next step and exit    RUN_DIR/DONE   the run finished
    RUN_DIR/previous-N/         an earlier attempt's outputs (OUTPUTS below), set aside when the run
                                started over (checkpoint.resume: false; trainer/start_over.py)
    RUN_DIR/jobs.jsonl          the Slurm jobs of this run: submitted / start / restart / end (launcher status)
    RUN_DIR/CANCEL              `launcher cancel --checkpoint`: checkpoint, then end without requeueing
    RUN_DIR/flight_recorder/    NCCL flight-recorder dumps (dist.flight_recorder)
    SWEEP_DIR/sweep.json, tasks/<i> -> ../<point>   a sweep (one job array): its index, and a link per task
    DIR/compare_loss.png, tb_compare/<run> -> <run>/tb   what `launcher compare` writes

The launcher, the trainer and the batch-script renderer all use these names. Pure: no disk access.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
SCRIPT = "finetune.sh"
HOSTFILE = "hostfile"
WORLD = "world.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
LOSS_CURVE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
BEST = "best"
EVAL = "eval"
EXPORT = "export"
ADAPTER = "adapter"
STOP = "STOP"
# The batch script exports this attempt's key (JOBKEY.RESTART) and writes it into STOP on a preemption
# signal; a trainer starting up keeps a STOP holding its own attempt's key (trainer/stop.py clear_stale).
STOP_KEY_ENV = "FINETUNE_STOP_KEY"
DONE = "DONE"
# inside a checkpoint folder (RUN_DIR/checkpoints or RUN_DIR/checkpoints/best)
LATEST = "latest"  # DeepSpeed's name: the tag of the newest complete checkpoint
STEP_TAG = "step{step:08d}"
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
DAMAGED = "DAMAGED"
DAMAGED_SUFFIX = ".damaged"
REPLACED_SUFFIX = ".old"  # a complete checkpoint of a step being saved again, until the new one is complete
RNG = "rng_rank{rank}.pt"
UNIVERSAL = "universal"
UNIVERSAL_OPTIMIZER_STATE = "zero/optimizer_state.pt"  # DeepSpeed's, inside universal/: the param groups
UNIVERSAL_FAILED = "universal.failed"  # rank 0's conversion error, for the ranks that wait on it
LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed's name (ds_to_universal writes it beside its output)
SLURM_OUT = "slurm-%j.out"  # Slurm filename patterns (%j = job id)
SLURM_ERR = "slurm-%j.err"
JOBS = "jobs.jsonl"
CANCEL = "CANCEL"
FLIGHT_RECORDER = "flight_recorder"
PREVIOUS = "previous-{n}"
# what one attempt of a run writes as it trains: set aside whole when the run starts over
OUTPUTS = (CHECKPOINTS, METRICS, TENSORBOARD, LOSS_CURVE, EVAL, EXPORT, ADAPTER)
NO_RETRY = ".no_retry"  # + ".<job>": a rank exited 2, 3 or 5 (trainer/node.py); the batch script reads and removes it
SWEEP_INDEX = "sweep.json"
SWEEP_TASKS = "tasks"
SLURM_ARRAY_OUT = "slurm-%A_%a.out"  # array task: %A = the array's job id, %a = the task index
SLURM_ARRAY_ERR = "slurm-%A_%a.err"
COMPARE_PNG = "compare_loss.png"
COMPARE_TB = "tb_compare"
# JSON holds no comments: generated JSON files name their writer under this key (DeepSpeed ignores it).
GENERATED_KEY = "_generated_by"


def stop_key(job: str, restart: int) -> str:
    """What the batch script (launcher/slurm.py: "$JOB_KEY.${SLURM_RESTART_COUNT:-0}") writes into STOP."""
    return f"{job}.{restart}"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""
    root: Path

    def __init__(self, root) -> None:
        object.__setattr__(self, "root", Path(root))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    config = property(lambda self: self.root / CONFIG)
    ds_config = property(lambda self: self.root / DS_CONFIG)
    script = property(lambda self: self.root / SCRIPT)
    hostfile = property(lambda self: self.root / HOSTFILE)
    world = property(lambda self: self.root / WORLD)
    metrics = property(lambda self: self.root / METRICS)
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    loss_curve = property(lambda self: self.root / LOSS_CURVE)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    best = property(lambda self: self.root / CHECKPOINTS / BEST)
    export = property(lambda self: self.root / EXPORT)
    adapter = property(lambda self: self.root / ADAPTER)
    stop = property(lambda self: self.root / STOP)
    done = property(lambda self: self.root / DONE)

    jobs = property(lambda self: self.root / JOBS)
    cancel = property(lambda self: self.root / CANCEL)
    flight_recorder = property(lambda self: self.root / FLIGHT_RECORDER)
    latest = property(lambda self: self.root / CHECKPOINTS / LATEST)

    def slurm_logs(self, job_id: str) -> tuple[Path, Path]:
        """The job's stdout and stderr files (the batch script's --output / --error). An array task's
        id is ARRAYID_TASK: slurm-%A_%a.out gives the same name."""
        return tuple(self.root / name.replace("%j", job_id) for name in (SLURM_OUT, SLURM_ERR))

    def no_retry(self, job_id: str) -> Path:
        return self.root / f"{NO_RETRY}.{job_id}"

    def previous(self, n: int) -> Path:
        return self.root / PREVIOUS.format(n=n)

    def eval_report(self, step: int) -> Path:
        return self.root / EVAL / STEP_TAG.format(step=step)
