"""Runs several training scenarios inside ONE multi-rank launch (a 2-rank start costs ~9 s).

    torchrun --nproc_per_node 2 tests/dist_worker.py SPEC.json

SPEC: {"scenarios": [{"name": str, "config": {...run config dict...}, "stop_at": int|null,
       "probe": "module:function"|null}]}
Each scenario's outcome goes to <run_dir>/worker_result.json (rank 0): the trainer's result,
or the error text. `stop_at` asks the real Stopper to fire after that optimizer step, which
exercises the real checkpoint-and-exit path. `probe` names a function(cfg, world) that runs
after the scenario on every rank (e.g. to evaluate an export) and returns a JSON-able dict.
"""
from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.rules import validate  # noqa: E402
from trainer.dist import init_distributed  # noqa: E402
from trainer.main import run  # noqa: E402
from trainer import stop as stop_mod  # noqa: E402


def _patch_stop(stop_at):
    original = stop_mod.Stopper.local  # polled once per optimizer step (the loop all-reduces it)
    calls = {"n": 0}

    def local(self):
        calls["n"] += 1
        return original(self) or (stop_at is not None and calls["n"] >= stop_at)

    stop_mod.Stopper.local = local
    return original


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    world = init_distributed()
    failed = 0
    for sc in spec["scenarios"]:
        out: dict
        original = _patch_stop(sc.get("stop_at"))
        try:
            cfg = validate(sc["config"], source=sc["name"])
            out = {"result": run(cfg, world)}
            if sc.get("probe"):
                mod, fn = sc["probe"].split(":")
                out["probe"] = getattr(importlib.import_module(mod), fn)(cfg, world)
        except Exception as e:  # recorded for the test to assert on
            failed += 1
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        finally:
            stop_mod.Stopper.local = original
        if world.is_main:
            run_dir = Path(sc["config"]["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "worker_result.json").write_text(json.dumps(out, indent=1, default=str))
        import torch.distributed as dist

        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
