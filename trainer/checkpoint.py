"""Checkpoints (engine.save_checkpoint on every rank + our client state) and the final export.

A checkpoint becomes ``latest`` only after every rank has finished writing it: its manifest (every
file's size and checksum, trainer/manifest.py) and then its ``COMPLETE`` record, written last, which
names the step and the world size that wrote it. The oldest complete ones beyond ``keep_last`` are
pruned. ``latest`` has DeepSpeed's own name and format, so DeepSpeed's tools (zero_to_fp32.py,
ds_to_universal.py) work on our checkpoints too. A resume (:func:`choose`) takes the newest complete
checkpoint whose files match their manifest: a damaged one is set aside (renamed ``STEP.damaged``,
``DAMAGED`` in it says why) and the one before it is used; a folder a killed save left behind (no
``COMPLETE``) is removed. A save that fails (disk full, read-only) raises
:class:`CheckpointWriteError` naming the folder and the OS error; the previous checkpoint stays
``latest``. A run resumed by another world size loads the checkpoint's universal form
(:func:`ensure_universal`; the decision is in trainer/elastic.py).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from launcher import rundir
from launcher.execute import write_files
from trainer import manifest

_TAG = re.compile(rundir.STEP_TAG.replace("{step:08d}", r"\d{8}"))


class ConversionError(RuntimeError):
    """DeepSpeed's ds_to_universal failed on a checkpoint (raised on every rank)."""


class CheckpointWriteError(RuntimeError):
    """This rank could not write its part of a checkpoint (disk full, read-only, no permission)."""


class CheckpointReadError(RuntimeError):
    """A checkpoint's files could not be read to check them (raised on every rank; a crash, exit 1)."""


def tag_for(step: int) -> str:
    return rundir.STEP_TAG.format(step=step)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int, step: int, rank: int) -> None:
    """python / numpy / torch (and CUDA) RNGs seeded from (run seed, step, rank): distinct per rank,
    the same for every resume of this step on this world."""
    import numpy as np
    import torch

    s = ((seed * 1_000_003 + step) * 10_007 + rank) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # seeds every CUDA device too


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders (named by STEP_TAG exactly: not set-aside or replaced ones), oldest first."""
    return sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and _TAG.fullmatch(p.name))


def complete_tags(ckpt_dir: Path) -> list[str]:
    return [p.name for p in step_dirs(ckpt_dir) if (p / rundir.COMPLETE).exists()]


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    f = ckpt_dir / rundir.LATEST
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag / rundir.COMPLETE).exists() else None


def written_world(step_dir: Path) -> Optional[int]:
    """How many ranks wrote a complete checkpoint: its COMPLETE record; for a checkpoint written
    before the record named it, the number of DeepSpeed's per-rank optimizer shards (None when there
    are none: ZeRO-0 does not partition, its files fit any world)."""
    try:
        record = json.loads((step_dir / rundir.COMPLETE).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("world_size"), int):
        return record["world_size"]
    return len(list(step_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int, rank: int) -> str:
    """Every rank writes its part (DeepSpeed's files, its RNG state), then its share of the manifest's
    checksums; rank 0 writes the manifest, COMPLETE, ``latest``, and prunes the oldest beyond
    ``keep_last`` (never the one just written). A complete folder already there for this step (a
    best/ step reached again after a restart) is kept as STEP.old until the new one is complete
    (:func:`choose` puts it back if a crash comes first); a partial one is removed."""
    import torch
    import torch.distributed as dist

    tag = tag_for(step)
    step_dir, old = ckpt_dir / tag, ckpt_dir / (tag + rundir.REPLACED_SUFFIX)
    try:
        if rank == 0 and step_dir.exists():
            if (step_dir / rundir.COMPLETE).exists():
                shutil.rmtree(old, ignore_errors=True)
                step_dir.rename(old)
            else:
                shutil.rmtree(step_dir)
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), step_dir / rundir.RNG.format(rank=rank))
        dist.barrier()  # every rank's shards are on disk
        _write_manifest(step_dir, rank)
        if rank == 0:
            record = {"step": step, "world_size": dist.get_world_size(), "plan": client_state.get("plan"),
                      "manifest": True}
            write_files({step_dir / rundir.COMPLETE: json.dumps(record) + "\n"})
            write_files({ckpt_dir / rundir.LATEST: tag})
    except (OSError, RuntimeError) as e:
        raise _write_error(e, step_dir, rank) from e
    if rank == 0:
        shutil.rmtree(old, ignore_errors=True)
        older = [t for t in complete_tags(ckpt_dir) if t < tag]
        for t in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)
    dist.barrier()
    return tag


def _write_manifest(step_dir: Path, rank: int) -> None:
    """Rank 0 lists the files, each rank checksums its share (trainer/manifest.py), rank 0 writes the
    manifest."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    listing = [manifest.sizes(step_dir) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    mine = manifest.describe(step_dir, manifest.shares(listing[0], dist.get_world_size())[rank])
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if rank != 0:
        return
    files = {name: entry for part in parts for name, entry in sorted(part.items())}
    record = {"algorithm": manifest.ALGORITHM, "bytes": sum(e["bytes"] for e in files.values()),
              "seconds": round(time.perf_counter() - t0, 3), "files": dict(sorted(files.items()))}
    write_files({step_dir / rundir.MANIFEST: json.dumps(record, indent=1) + "\n"})


def _write_error(error: Exception, step_dir: Path, rank: int) -> Exception:
    """``error`` raised while this rank wrote ``step_dir``, as a CheckpointWriteError naming the folder
    and the OS error when it is one (torch.save says only "file write failed": a small probe write in the
    folder finds the errno, e.g. ENOSPC or EROFS). Anything else (a collective that failed) is returned
    as it is."""
    os_error = error if isinstance(error, OSError) else _probe(step_dir)
    if os_error is None:
        return error
    free = shutil.disk_usage(step_dir.parent).free if step_dir.parent.exists() else None
    latest = latest_tag(step_dir.parent)
    kept = (f"the previous checkpoint {step_dir.parent / latest} stands (latest still names it)" if latest
            else "there is no earlier complete checkpoint")
    return CheckpointWriteError(
        f"rank {rank} could not write checkpoint {step_dir}: {os_error.strerror or os_error} "
        f"({os_error.filename or step_dir}{'' if free is None else f'; {free:,} bytes free there'}). Nothing of "
        f"this checkpoint is used (it has no {rundir.COMPLETE} record) and {kept}. Free some space or fix the "
        "permissions of the run dir, then rerun with the same run_dir to resume"
        + ("" if error is os_error else f" (the error: {type(error).__name__}: {error})"))


def _probe(folder: Path) -> Optional[OSError]:
    """The OS error a small write in ``folder`` meets now (None: it works)."""
    probe = folder / f".write_probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def verify(step_dir: Path) -> list[str]:
    """Collective: how the files of a complete checkpoint differ from its manifest (each rank checks
    its share; every rank gets every problem). Empty: they match, or it predates manifests."""
    import torch.distributed as dist

    record: list = [None]
    if dist.get_rank() == 0:
        record[0] = _read_manifest(step_dir)
    dist.broadcast_object_list(record, src=0)
    if isinstance(record[0], str):
        return [record[0]]
    entries = record[0]
    mine = manifest.shares({k: v["bytes"] for k, v in entries.items()}, dist.get_world_size())[dist.get_rank()]
    try:
        part = (manifest.problems(step_dir, {k: entries[k] for k in mine}), None)
    except OSError as e:  # a file that cannot be read now (EIO, a stale NFS handle): not proof of damage
        part = ([], f"{e.filename}: {e.strerror or e}")
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, part)
    unreadable = [err for _, err in found if err]
    if unreadable:  # every rank raises: a rerun may read it; nothing is set aside on a read error
        raise CheckpointReadError(f"checkpoint {step_dir} could not be read to check it against its "
                                  f"{rundir.MANIFEST}: {'; '.join(unreadable)}. Nothing was loaded or set aside; "
                                  "rerun once the filesystem reads again")
    return sorted(p for problems, _ in found for p in problems)


def _read_manifest(step_dir: Path):
    """Rank 0: the manifest's entries ({} for a checkpoint saved before manifests), or what is wrong
    with it (a str: the checkpoint counts as damaged)."""
    try:
        saved_with = json.loads((step_dir / rundir.COMPLETE).read_text()).get("manifest") is True
    except (OSError, ValueError, AttributeError):
        saved_with = False
    try:
        files = json.loads((step_dir / rundir.MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"its {rundir.MANIFEST} is missing" if saved_with else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {rundir.MANIFEST} cannot be read ({type(e).__name__}: {e})"
    ok = isinstance(files, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("bytes"), int)
        and isinstance(v.get(manifest.ALGORITHM), str) for k, v in files.items())
    return files if ok else f"its {rundir.MANIFEST} is not a manifest (its 'files' are not name -> bytes, checksum)"


def choose(ckpt_dir: Path) -> Optional[str]:
    """Collective: the checkpoint to resume from: the newest complete one whose files match their
    manifest. A damaged one is set aside (:func:`_set_aside`) with a message, and the one before it is
    tried; ``latest`` is pointed at the one chosen (:func:`_tidy` runs first). Rank 0 reads the folder
    and decides; every rank returns the same tag (None: nothing to resume). When every checkpoint
    was set aside, now or before, this raises ConfigError (exit 2) instead of starting over; a file
    that cannot be read raises CheckpointReadError."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tags: list = [None]
    if rank == 0:
        tags[0] = _tidy(ckpt_dir) if ckpt_dir.is_dir() else []
    dist.broadcast_object_list(tags, src=0)
    for tag in reversed(tags[0]):
        problems = verify(ckpt_dir / tag)
        if not problems:
            if rank == 0 and latest_tag(ckpt_dir) != tag:
                write_files({ckpt_dir / rundir.LATEST: tag})
            return tag
        if rank == 0:
            step_dir = ckpt_dir / tag
            aside = _set_aside(step_dir, problems)
            print(f"checkpoint {step_dir} is damaged and is not loaded: {'; '.join(problems)}. It is set aside as "
                  f"{aside} ({rundir.DAMAGED} there says why; delete it when done looking); trying the checkpoint "
                  "before it", flush=True)
    damaged: list = [sorted(str(p) for p in ckpt_dir.glob(f"step*{rundir.DAMAGED_SUFFIX}*")) if rank == 0 else None]
    dist.broadcast_object_list(damaged, src=0)
    if damaged[0]:  # never start over silently when there were checkpoints
        from launcher.errors import ConfigError

        raise ConfigError([f"no checkpoint in {ckpt_dir} can be resumed: every one was found damaged and set aside "
                           f"({', '.join(damaged[0])}; the DAMAGED file in each says why). Nothing was loaded. To "
                           "start this run over from step 0, move those folders out of the run dir, or "
                           "train in a new run_dir"], source=str(ckpt_dir))
    return None


def _tidy(ckpt_dir: Path) -> list[str]:
    """Rank 0, before choosing: a step a crash caught while its folder was being replaced gets its
    complete copy (STEP.old) back; folders a killed save left (no COMPLETE) are removed. Returns the
    complete tags."""
    for old in sorted(ckpt_dir.glob(f"step*{rundir.REPLACED_SUFFIX}")):
        new = ckpt_dir / old.name[: -len(rundir.REPLACED_SUFFIX)]
        if (new / rundir.COMPLETE).exists():
            shutil.rmtree(old, ignore_errors=True)
        elif (old / rundir.COMPLETE).exists():
            shutil.rmtree(new, ignore_errors=True)
            old.rename(new)
    for partial in step_dirs(ckpt_dir):
        if not (partial / rundir.COMPLETE).exists():
            shutil.rmtree(partial, ignore_errors=True)
            print(f"removed {partial}: a checkpoint whose save never finished (no {rundir.COMPLETE} record)",
                  flush=True)
    return complete_tags(ckpt_dir)


def _set_aside(step_dir: Path, problems: list[str]) -> Path:
    """A damaged checkpoint: its COMPLETE becomes DAMAGED (what is wrong), and the folder is renamed
    STEP.damaged (numbered if taken), so that it is never loaded, pruned or replaced by a later save."""
    (step_dir / rundir.DAMAGED).write_text("\n".join(problems) + "\n")
    (step_dir / rundir.COMPLETE).unlink()
    aside, n = step_dir.with_name(step_dir.name + rundir.DAMAGED_SUFFIX), 1
    while aside.exists():
        n += 1
        aside = step_dir.with_name(f"{step_dir.name}{rundir.DAMAGED_SUFFIX}{n}")
    step_dir.rename(aside)
    return aside


def resume(engine, ckpt_dir: Path, rank: int, seed: Optional[int] = None,
           tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Load checkpoint ``tag`` (None: :func:`choose` one); returns its client state and ``tag`` (or None
    when there is none).

    An engine configured with ``checkpoint.load_universal`` (a resume on another world size, see
    trainer/elastic.py) loads the checkpoint's universal form, converted first if it is not there yet.
    RNG: when this world size wrote the checkpoint, each rank restores its own ``rng_rank{r}.pt``
    (an exact continuation). In another world rank r has no counterpart (its data shard changed too),
    so no file is read: with ``seed`` given, every rank seeds its RNGs from (seed, step, rank) --
    distinct per rank, and the same for every resume of this step on this world.
    """
    import torch
    import torch.distributed as dist

    tag = tag if tag is not None else choose(ckpt_dir)
    if tag is None:
        return None
    universal = engine.load_universal_checkpoint()
    load_dir, load_tag = (ckpt_dir / tag, ensure_universal(ckpt_dir / tag).name) if universal else (ckpt_dir, tag)
    path, client_state = engine.load_checkpoint(str(load_dir), tag=load_tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
    if universal and engine.zero_optimization_stage() == 3:
        _repair_universal_load(engine, load_dir / load_tag)
    state = dict(client_state or {}, tag=tag)
    rng = ckpt_dir / tag / rundir.RNG.format(rank=rank)
    if written_world(ckpt_dir / tag) in (None, dist.get_world_size()) and rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    elif seed is not None:
        seed_rng(seed, int(state.get("step", 0)), rank)
    return state


def ensure_universal(step_dir: Path, poll_s: float = 0.5) -> Path:
    """STEP/universal: the checkpoint in DeepSpeed's universal form. Rank 0 converts it once with
    DeepSpeed's ds_to_universal into ``universal.tmp``, writes COMPLETE in it last and
    renames it; a folder without COMPLETE is never used (a crash mid-way leaves only the .tmp, which the
    next attempt removes). The other ranks wait for the folder on the shared filesystem (no collective,
    so a long conversion meets no communication timeout). A failure raises ConversionError everywhere."""
    import torch.distributed as dist

    out = step_dir / rundir.UNIVERSAL
    failed = step_dir / rundir.UNIVERSAL_FAILED
    convert = dist.get_rank() == 0 and not (out / rundir.COMPLETE).exists()
    if convert:
        failed.unlink(missing_ok=True)  # an earlier attempt's error
    dist.barrier()
    if convert:
        try:
            _convert(step_dir, out)
        except Exception as e:  # noqa: BLE001 -- every rank must learn the outcome, whatever it was
            failed.write_text(str(e) if isinstance(e, ConversionError) else f"{type(e).__name__}: {e}")
    while not (out / rundir.COMPLETE).exists() and not failed.exists():
        time.sleep(poll_s)
    dist.barrier()
    if failed.exists():
        raise ConversionError(failed.read_text())
    return out


def _convert(step_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal STEP -> OUT (via OUT.tmp), in this process and serially: no
    interpreter start (about 4 s on a CPU) and no worker processes forked from a rank that holds a
    process group. ``inject_missing_state``: a ZeRO-1/2 checkpoint of a plain (not Megatron) model
    carries no universal-checkpoint info; DeepSpeed's own flag adds the default."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a folder without COMPLETE is not trusted
    args = argparse.Namespace(input_folder=str(step_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed validates with assert and raises what it meets
        raise ConversionError(f"DeepSpeed's ds_to_universal failed on {step_dir}: {type(e).__name__}: {e}") from e
    record = {"from": step_dir.name, "written_world": written_world(step_dir),
              "seconds": round(time.perf_counter() - t0, 2)}
    (tmp / rundir.COMPLETE).write_text(json.dumps(record) + "\n")
    os.replace(tmp, out)
    write_files({step_dir / rundir.LATEST_UNIVERSAL: out.name})  # DeepSpeed's pointer, now to the final name


def _repair_universal_load(engine, universal_dir: Path) -> None:
    """What a same-world load restores and DeepSpeed 0.19.8's ZeRO-3 universal load does not
    (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3; measured: step k+2's loss off by
    1e-4 to 1e-3 without this): each parameter group's own hyperparameters (it gives every group the
    first group's lr and weight_decay, and our name and depth), and one step counter per group (it
    hands every group the same step tensor, which torch's AdamW then advances once per group, so the
    bias correction runs ahead). ZeRO-1/2 loads are left as they are (already right)."""
    import torch

    saved = torch.load(universal_dir / rundir.UNIVERSAL_OPTIMIZER_STATE, map_location="cpu", mmap=True,
                       weights_only=False)["param_groups"]
    groups = engine.optimizer.param_groups
    if len(saved) == len(groups):
        for group, old in zip(groups, saved):
            group.update({k: v for k, v in old.items() if k != "params"})
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def full_state_dict(engine, stage: int) -> Optional[dict]:
    """The whole model's weights on rank 0 (None elsewhere). Under ZeRO-3 the partitions are
    gathered module by module -- a plain state_dict() there holds empty tensors."""
    import torch.distributed as dist

    if stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if dist.get_rank() == 0 else None
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def write_pretrained(model, tokenizer, out_dir: Path, **save_kwargs) -> None:
    """model.save_pretrained + tokenizer into OUT.tmp, then swapped in: a crash never leaves half a folder."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), **save_kwargs)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def export_hf(engine, tokenizer, out_dir: Path, stage: int) -> None:
    """A Hugging Face save_pretrained folder (safetensors, config, tokenizer), written atomically."""
    import torch.distributed as dist

    sd = full_state_dict(engine, stage)
    if dist.get_rank() == 0:
        write_pretrained(engine.module, tokenizer, out_dir, state_dict=sd)
    dist.barrier()
