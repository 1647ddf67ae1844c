"""One 2-rank launch for tests/test_day2_dist.py (run by torchrun):

1. trainer.main.main() with rank 1 reporting another transformers version, as a node with a different
   install would: the real all-gather, the real check, the real exit code (2) on every rank;
2. then a fresh process group with a timeout of 0.25 min (15 s; shorter ones fail the connect itself
   on a loaded machine): rank 1 skips a barrier, rank 0's barrier must fail with gloo's timeout, not hang.

    torchrun --nproc_per_node 2 tests/day2_worker.py CONFIG OUT_DIR FREE_PORT
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    config, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    if rank == 1:
        import transformers

        transformers.__version__ = "4.0.0-other-node"
    from trainer.main import main as trainer_main

    result = {"trainer_exit": trainer_main(["--config", config])}
    import torch.distributed as dist

    from trainer.dist import init_distributed

    # A new store for the second group: re-initialising on torchrun's agent store finds the first
    # group's stale addresses there (measured: "Connection refused" on a loaded machine).
    os.environ.update(MASTER_PORT=sys.argv[3], TORCHELASTIC_USE_AGENT_STORE="False")
    world = init_distributed(None, timeout_min=0.25)
    result["pg_initialized_again"] = dist.is_initialized()
    t0 = time.monotonic()
    if world.rank == 1:  # never enters the barrier; stays alive until rank 0 has seen its timeout
        while not (out / "rank0.json").exists() and time.monotonic() - t0 < 120:
            time.sleep(0.2)
    else:
        try:
            dist.barrier()
            result["barrier"] = "returned"
        except RuntimeError as e:
            result["barrier"] = str(e)
        result["barrier_waited_s"] = round(time.monotonic() - t0, 2)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
