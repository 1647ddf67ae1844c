"""Checkpoints (engine.save_checkpoint on every rank + our client state) and the final export.

A checkpoint becomes ``latest`` only after every rank has finished writing it; the oldest
complete ones beyond ``keep_last`` are pruned. ``latest`` has DeepSpeed's own name and format,
so DeepSpeed's tools (zero_to_fp32.py) work on our checkpoints too.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if (p / COMPLETE).exists())


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    f = ckpt_dir / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag / COMPLETE).exists() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int, rank: int) -> str:
    import torch
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text(str(step))
        _atomic_write(ckpt_dir / "latest", tag)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def resume(engine, ckpt_dir: Path, rank: int) -> Optional[dict[str, Any]]:
    """Load ``latest`` if there is one; returns its client state (or None for a fresh run)."""
    import torch

    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return dict(client_state or {}, tag=tag)


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
