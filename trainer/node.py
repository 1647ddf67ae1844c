"""One node's share of a Slurm job: torchrun, and a note when a rank stopped on a user error.

    python -m trainer.node --user-error-file PATH [torchrun options] -m trainer.main --config CONFIG ...

The batch script runs this on every node (one srun task each). torchrun exits 1 whatever its ranks
exited with, and srun --kill-on-bad-exit then reports the other nodes' SIGTERM (143), so the exit
code cannot tell a config or data error (the trainer's exit 2: retrying cannot help) from a crash
(which dist.max_restarts retries). When a local rank exited 2 this writes PATH (one line per such
rank, appended: several nodes may write it) and exits 2; the batch script reads and removes it.
"""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--user-error-file":
        print("usage: python -m trainer.node --user-error-file PATH [torchrun arguments]", file=sys.stderr)
        return EXIT_USER_ERROR
    marker, torchrun_args = Path(argv[1]), argv[2:]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(torchrun_args)
    except SignalException as e:  # srun stops this node because another one failed (or scancel)
        print(f"trainer.node: {e}; the local ranks were stopped", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        print(str(e), file=sys.stderr, flush=True)  # torchrun's own table of the failed ranks
        user = sorted(rank for rank, f in e.failures.items() if f.exitcode == EXIT_USER_ERROR)
        if not user:
            return 1
        with marker.open("a") as f:
            f.write(f"rank(s) {', '.join(map(str, user))} exited {EXIT_USER_ERROR} "
                    "(a problem with the config or data; the message is above)\n")
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
