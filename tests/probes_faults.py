"""Faults injected into real ranks by tests/test_faults_dist.py (dist_worker.py ``inspect`` / ``probe``
hooks, with the scenario's ``args``). Each one makes its fault happen by construction, at a given
optimizer step (0-based, as trainer/loop.py counts; the log calls it step + 1) on a given rank."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def _at_steps(run, hook, first: int, until=None, rank=None):
    """Register ``hook(module, output) -> output`` on the final norm (its output feeds the loss) for the
    training forwards of optimizer steps first..until-1 (until None: to the end) on ``rank`` (None: all)."""
    import torch.distributed as dist

    calls = {"n": 0}
    accum = run.plan.grad_accum

    def forward_hook(module, args, output):
        if not module.training:
            return output
        step = calls["n"] // accum
        calls["n"] += 1
        if (rank is None or dist.get_rank() == rank) and step >= first and (until is None or step < until):
            return hook(module, output)
        return output

    run.engine.module.model.norm.register_forward_hook(forward_hook)


def _fingerprint(engine) -> list[float]:
    """This rank's share of the weights as two float64 sums (ZeRO-3: its partitions, p.ds_tensor)."""
    import torch

    total = squares = 0.0
    for p in engine.module.parameters():
        t = (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().double()
        total += t.sum().item()
        squares += (t * t).sum().item()
    return [total, squares]


def record_steps(run) -> list[dict]:
    """Around every engine.step() that ends an optimizer step: the weights before and after, whether
    DeepSpeed says it applied the step, and the LR scheduler's step count (appended as training runs)."""
    engine, steps = run.engine, []
    original = engine.step

    def step(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        before = _fingerprint(engine) if boundary else None
        out = original(*args, **kwargs)
        if boundary:
            scheduler = engine.lr_scheduler
            steps.append({"before": before, "after": _fingerprint(engine), "applied": engine.was_step_applied(),
                          "scheduler_steps": getattr(scheduler, "last_epoch", None)})
        return out

    engine.step = step
    return steps


def nan_at(run, step: int, until=None, rank: int = 1, **_) -> dict:
    """This rank's hidden states become NaN from optimizer step ``step`` (so its loss and every
    gradient do; the reduction carries the NaN to every rank). Records every step (record_steps)."""
    _at_steps(run, lambda m, out: out * float("nan"), step, until, rank)
    return {"steps": record_steps(run)}


def sleep_at(run, step: int, rank: int = 1, seconds: float = 120.0, **_) -> dict:
    """This rank stops inside optimizer step ``step`` (its forward sleeps), as a hung rank does;
    RUN_DIR/hang.json records when it started."""
    marker = Path(run.cfg.run_dir) / "hang.json"

    def hang(module, out):
        marker.write_text(json.dumps({"time": time.time(), "pid": os.getpid()}))
        time.sleep(seconds)
        return out

    _at_steps(run, hang, step, step + 1, rank)
    return {}


def block_in_save(run, step: int, rank: int = 1, **_) -> dict:
    """On ``rank``, the first DeepSpeed file of checkpoint ``step`` is written half, then the process
    blocks inside engine.save_checkpoint (torch.save) and says so in RUN_DIR/in_save.json (its pid),
    for the test to SIGKILL it there."""
    import io

    import torch
    import torch.distributed as dist

    from trainer.checkpoint import tag_for

    if dist.get_rank() != rank:
        return {}
    original = torch.save
    tag = tag_for(step)

    def save(obj, f, *args, **kwargs):
        path = Path(str(f))
        if path.parent.name != tag or path.name.startswith("rng_rank"):
            return original(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        original(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(path, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        (Path(run.cfg.run_dir) / "in_save.json").write_text(json.dumps({"pid": os.getpid(), "file": str(path),
                                                                       "bytes": len(data)}))
        time.sleep(600)  # SIGKILLed here

    torch.save = save
    return {}


def break_disk_after_first_save(run, mode: str, **_) -> dict:
    """After the run's first checkpoint, rank 0 makes the disk of RUN_DIR/checkpoints (a tmpfs the
    test mounted there) full (``full``: a file grows until ENOSPC) or read-only (``ro``: remounted)."""
    import torch.distributed as dist

    ckpt = Path(run.cfg.run_dir) / "checkpoints"
    save, state = run.save, {"saves": 0}

    def save_then_break(step: int) -> None:
        save(step)
        state["saves"] += 1
        if state["saves"] == 1 and dist.get_rank() == 0:
            if mode == "full":
                with open(ckpt / "filler", "wb", buffering=0) as f:
                    for chunk in (65536, 4096, 1):  # until not one more byte fits
                        try:
                            while True:
                                f.write(b"\0" * chunk)
                        except OSError:
                            pass
            else:
                subprocess.run(["mount", "-o", "remount,ro", str(ckpt)], check=True)
        dist.barrier()

    run.save = save_then_break
    return {}


def truncate_shard(cfg, world, step: int, **_) -> dict:
    """After the scenario: rank 0 cuts one optimizer-state shard of checkpoint ``step`` to half its size."""
    import torch.distributed as dist

    from trainer.checkpoint import tag_for

    out = {}
    if world.is_main:
        shard = sorted((Path(cfg.run_dir) / "checkpoints" / tag_for(step)).glob("*optim_states.pt"))[-1]
        size = shard.stat().st_size
        os.truncate(shard, size // 2)
        out = {"file": shard.name, "bytes": size, "truncated_to": size // 2}
    dist.barrier()
    return out
