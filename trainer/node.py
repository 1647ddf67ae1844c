"""One node's share of a Slurm job: torchrun, and a note when a rank stopped in a way a retry cannot cure.

    python -m trainer.node --no-retry-file PATH [torchrun options] -m trainer.main --config CONFIG ...

The batch script runs this on every node (one srun task each). torchrun exits 1 whatever its ranks
exited with, and srun --kill-on-bad-exit then reports the other nodes' SIGTERM (143), so the exit
code cannot tell a config or data error (exit 2), a stop on non-finite steps (3) or a checkpoint that
could not be written (5) from a crash (which dist.max_restarts retries): launcher/errors.py
NOT_RETRIED. When a local rank exited with one of those, this appends a line to PATH ("rank(s) R
exited N (why)"; several nodes may write it) and exits N; the batch script reads and removes it, and
ends the job with N.
"""
from __future__ import annotations

import sys
from pathlib import Path

from launcher.errors import EXIT_USER_ERROR, NOT_RETRIED


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--no-retry-file":
        print("usage: python -m trainer.node --no-retry-file PATH [torchrun arguments]", file=sys.stderr)
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
        final = sorted({f.exitcode for f in e.failures.values()} & NOT_RETRIED.keys())
        if not final:
            return 1
        with marker.open("a") as f:
            for code in final:
                ranks = sorted(rank for rank, fail in e.failures.items() if fail.exitcode == code)
                f.write(f"rank(s) {', '.join(map(str, ranks))} exited {code} ({NOT_RETRIED[code]}; the message is "
                        "above)\n")
        return final[0]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
