"""Runs several training scenarios inside ONE multi-rank launch (a 2-rank start costs ~9 s).

    torchrun --nproc_per_node 2 tests/dist_worker.py SPEC.json
    torchrun --nproc_per_node 2 tests/dist_worker.py --main SPEC.json -- --config CONFIG  (main_with_fault)

SPEC: {"scenarios": [{"name": str, "config": {...run config dict...}, "stop_at": int|null,
       "probe": "module:function"|null, "inspect": "module:function"|null, "args": {...}|null}]}
Each scenario's outcome goes to <run_dir>/worker_result.json (rank 0): the trainer's result,
or the error text; every scenario of that run dir is also appended to worker_results.jsonl (a
stopped run and its resume share a run dir). `stop_at` asks the real Stopper to fire after that
optimizer step, which exercises the real checkpoint-and-exit path. `probe` names a
function(cfg, world) that runs after the scenario on every rank (e.g. to evaluate an export);
`inspect` names a function(run) that runs on every rank with the live engine just before the
training loop starts (trainer/loop.py Run). Both return a JSON-able dict (rank 0's is kept); ``args``
are keyword arguments for both (e.g. the step and rank a fault is injected at).
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


def _patch_train(inspect, out: dict, args: dict):
    """Wrap trainer.loop.train (main.run imports it at call time) to inspect the live run first."""
    import trainer.loop as loop

    original = loop.train
    if inspect:
        mod, fn = inspect.split(":")
        probe = getattr(importlib.import_module(mod), fn)

        def train(run, start_step):
            out["inspect"] = probe(run, **args)
            return original(run, start_step)

        loop.train = train
    return original


def main_with_fault() -> int:
    """``dist_worker.py --main SPEC.json -- TRAINER ARGS``: the real entry point (trainer/main.py main:
    its error handling and exit codes) with the spec's ``inspect`` hook (and ``args``) installed, for a
    fault that must happen inside the run (tests/probes_faults.py)."""
    from trainer.main import main as trainer_main

    spec = json.loads(Path(sys.argv[2]).read_text())
    _patch_train(spec["inspect"], {}, spec.get("args") or {})
    return trainer_main(sys.argv[sys.argv.index("--") + 1:])


def main() -> int:
    if sys.argv[1] == "--main":
        return main_with_fault()
    spec = json.loads(Path(sys.argv[1]).read_text())
    world = init_distributed()
    failed = 0
    for sc in spec["scenarios"]:
        out: dict
        original = _patch_stop(sc.get("stop_at"))
        inspected: dict = {}
        original_train = _patch_train(sc.get("inspect"), inspected, sc.get("args") or {})
        try:
            cfg = validate(sc["config"], source=sc["name"])
            out = {"result": run(cfg, world), **inspected}
            if sc.get("probe"):
                mod, fn = sc["probe"].split(":")
                out["probe"] = getattr(importlib.import_module(mod), fn)(cfg, world, **(sc.get("args") or {}))
        except Exception as e:  # recorded for the test to assert on
            failed += 1
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        finally:
            stop_mod.Stopper.local = original
            import trainer.loop

            trainer.loop.train = original_train
        if world.is_main:
            run_dir = Path(sc["config"]["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "worker_result.json").write_text(json.dumps(out, indent=1, default=str))
            with (run_dir / "worker_results.jsonl").open("a") as f:
                f.write(json.dumps({"name": sc["name"], **out}, default=str) + "\n")
        import torch.distributed as dist

        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
