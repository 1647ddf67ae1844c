"""A run started over (``checkpoint.resume: false``) in a run dir an earlier attempt of it wrote.

The earlier attempt's outputs are moved, whole, into ``RUN_DIR/previous-N/`` (N = 1, 2, ...: the
first free one): nothing is deleted, and nothing of the two attempts is mixed. Mixed, metrics.jsonl,
TensorBoard and ``launcher status`` would show two attempts' steps as one curve, and the earlier
attempt's later checkpoints would stay among the new ones, outside keep_last."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from launcher.rundir import OUTPUTS, RunDir


def set_aside(run_dir: RunDir) -> Optional[Path]:
    """Move the earlier attempt's outputs (launcher/rundir.py OUTPUTS that exist) into the first free
    ``previous-N/``; return that folder, or None when there was nothing to move. Rank 0 only, before
    this attempt writes any of them."""
    present = [name for name in OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    n = 1
    while run_dir.previous(n).exists():
        n += 1
    dest = run_dir.previous(n)
    dest.mkdir()
    for name in present:
        os.replace(run_dir / name, dest / name)  # same file system (inside the run dir): a rename
    return dest
