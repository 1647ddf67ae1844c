"""Faults injected into real DeepSpeed ranks (2 CPU ranks, gloo), each made to happen by construction
(tests/probes_faults.py): a NaN step under every ZeRO stage and precision, the stop policy and its
resume, a hung rank, a SIGKILL inside engine.save_checkpoint, a truncated shard, a full and a
read-only checkpoint disk. The launches that end in a fault run the real entry point
(trainer/main.py main, through dist_worker.py --main) so that its exit codes are what is asserted.
README "What it survives" points here.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, arith_rows, curve, env_for_ranks, launch, losses, results, tiny_config, write_jsonl

STAGES = {"z0": {"stage": 0}, "z1": {"stage": 1}, "z2": {"stage": 2},
          "z3": {"stage": 3, "param_persistence_threshold": 0}}
# (name, zero, dtype, grad_accum): our own guard covers fp32 ZeRO-0 (accumulated, so the guard must act
# on the window's last micro-batch only); DeepSpeed's checks cover the rest (bf16 ZeRO-1/2 through
# bf16.check_grad_overflow, which launcher/ds_config.py owns).
SKIP_CASES = [("z0-fp32-acc2", "z0", "fp32", 2), ("z1-fp32", "z1", "fp32", 1), ("z2-fp32", "z2", "fp32", 1),
              ("z3-fp32", "z3", "fp32", 1), ("z0-bf16", "z0", "bf16", 1), ("z2-bf16", "z2", "bf16", 1),
              ("z3-bf16", "z3", "bf16", 1)]
NAN_STEP = 2  # 0-based: the log's step 3


def _checkpointed(tmp: Path, train: Path, name: str, **sections) -> dict:
    return tiny_config(tmp / name, train, zero=STAGES["z2"], train={"max_steps": 6},
                       checkpoint={"every_steps": 2, "keep_last": 3}, **sections)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return tmp, write_jsonl(tmp / "train.jsonl", arith_rows(256, seed=1))


@pytest.fixture(scope="module")
def runs(data):
    """One launch: the skip policy under every stage and precision, a clean reference run, and a run
    whose newest checkpoint gets a truncated shard before it is resumed."""
    tmp, train = data
    sc = [{"name": name, "inspect": "probes_faults:nan_at", "args": {"step": NAN_STEP, "until": NAN_STEP + 1},
           "config": tiny_config(tmp / name, train, zero=STAGES[zero], precision={"dtype": dtype},
                                 train={"max_steps": 5, "grad_accum": accum, "on_nonfinite": "skip"})}
          for name, zero, dtype, accum in SKIP_CASES]
    sc.append({"name": "clean", "config": _checkpointed(tmp, train, "clean")})
    sc.append({"name": "corrupt", "stop_at": 4, "probe": "probes_faults:truncate_shard", "args": {"step": 4},
               "config": _checkpointed(tmp, train, "corrupt")})
    sc.append({"name": "corrupt-resume", "config": _checkpointed(tmp, train, "corrupt")})
    # the only checkpoint damaged: the resume refuses (and so does the next), it never starts over
    sc.append({"name": "lost", "stop_at": 2, "probe": "probes_faults:truncate_shard", "args": {"step": 2},
               "config": _checkpointed(tmp, train, "lost")})
    for i in range(2):
        sc.append({"name": f"lost-resume-{i}", "config": _checkpointed(tmp, train, "lost")})
    return tmp, launch(sc, tmp, timeout=900)


def start(cfg: dict, tmp: Path, name: str, inspect: str | None = None, args: dict | None = None,
          overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    """2 ranks of the real entry point (trainer/main.py main) on ``cfg``, with an injected fault
    (dist_worker.py --main), under torchrun run by trainer.node as the batch script runs it on each node
    (its exit code is what the script acts on; its note goes to tmp/<name>.noretry); output in tmp/<name>.log."""
    cfg_file = tmp / f"{name}.yaml"
    cfg_file.write_text(json.dumps(cfg))  # JSON is YAML
    spec = tmp / f"{name}.spec.json"
    spec.write_text(json.dumps({"inspect": inspect, "args": args or {}}))
    entry = ([str(ROOT / "tests" / "dist_worker.py"), "--main", str(spec), "--"] if inspect
             else [str(ROOT / "trainer" / "main.py")])
    cmd = [sys.executable, "-m", "trainer.node", "--no-retry-file", str(tmp / f"{name}.noretry"), "--standalone",
           "--nproc_per_node=2", *entry, "--config", str(cfg_file), *overrides]
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env_for_ranks(), stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, tmp: Path, name: str, timeout: float = 600) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, (tmp / f"{name}.log").read_text()


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def tensors_equal(a, b, where: str = "") -> list[str]:
    """Where two loaded checkpoint files differ (tensors exactly; other leaves ignored)."""
    import torch

    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        return [d for k in a for d in tensors_equal(a[k], b.get(k) if isinstance(b, dict) else None, f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensors_equal(x, y, f"{where}[{i}]")]
    return []


def load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


# --- NaN/Inf: skip --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [c[0] for c in SKIP_CASES])
def test_a_nan_step_is_skipped_whole_under_every_stage_and_precision(runs, name):
    tmp, _ = runs
    out = results(tmp / name)[-1]
    assert out.get("result", {}).get("status") == "done", out.get("traceback", out)
    steps = out["inspect"]["steps"]
    assert len(steps) == 5, steps
    bad = steps[NAN_STEP]
    # the mechanism: DeepSpeed reports the step not applied, rank 0's weights did not move, and the
    # LR schedule did not advance; every other step was applied and moved them
    assert bad["applied"] is False and bad["after"] == bad["before"], bad
    assert bad["scheduler_steps"] == steps[NAN_STEP - 1]["scheduler_steps"], steps
    for i, s in enumerate(steps):
        if i != NAN_STEP:
            assert s["applied"] is True and s["after"] != s["before"], (i, s)
    assert all(v == v and abs(v) != float("inf") for s in steps for v in s["after"]), "NaN reached the weights"
    loss = dict(losses(tmp / name))
    assert loss[NAN_STEP + 1] != loss[NAN_STEP + 1]  # the NaN step is logged as NaN...
    assert all(v == v for s, v in loss.items() if s != NAN_STEP + 1), loss  # ...and training went on
    assert curve(tmp / name, "train/nonfinite_steps") == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]


def test_the_nonfinite_count_reaches_tensorboard(runs):
    tmp, _ = runs
    assert tb_scalars(tmp / "z2-fp32", "train/nonfinite_steps") == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]


# --- NaN/Inf: stop, checkpointing the last good state, then resume ---------------------------------

def test_nonfinite_steps_in_a_row_stop_with_the_last_good_state_and_resume(data):
    tmp, train = data
    cfg = tiny_config(tmp / "stop", train, zero=STAGES["z2"], train={"max_steps": 8, "on_nonfinite": "stop",
                      "max_nonfinite_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 3})
    rc, out = finish(start(cfg, tmp, "stop", "probes_faults:nan_at", {"step": NAN_STEP}), tmp, "stop")
    assert rc == 3, out[-4000:]  # EXIT_NONFINITE, through trainer.node: the batch script ends the job, no restart
    # (the rank that exits first is reported; torchrun then stops the other)
    assert re.fullmatch(r"rank\(s\) (0|1|0, 1) exited 3 \(non-finite steps in a row, train.on_nonfinite=stop; the "
                        r"message is above\)\n", (tmp / "stop.noretry").read_text())
    ckpt = tmp / "stop" / "checkpoints"
    assert f"stopped: steps 3-4 had a non-finite loss or gradient norm (2 in a row" in out, out[-4000:]
    assert f"checkpoint {ckpt / 'step00000004'} holds the weights and optimizer state after step 2" in out
    assert (ckpt / "latest").read_text() == "step00000004"
    # the stop checkpoint holds exactly the state after step 2: weights and optimizer state
    for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        a, b = load(ckpt / "step00000002" / f), load(ckpt / "step00000004" / f)
        key = "module" if "model" in f else "optimizer_state_dict"
        assert tensors_equal(a[key], b[key]) == [], f
    assert tb_scalars(tmp / "stop", "train/nonfinite_steps") == [(1, 0), (2, 0), (3, 1), (4, 2)]

    # the rerun (skipping from now on: a key a resubmission may change) resumes from that checkpoint
    rc, out = finish(start(cfg, tmp, "stop-resume", overrides=("train.on_nonfinite=skip",)), tmp, "stop-resume")
    assert rc == 0, out[-4000:]
    assert f"resumed from {ckpt / 'step00000004'} at step 4" in out
    after = [v for s, v in losses(tmp / "stop")[-4:]]
    assert [s for s, _ in losses(tmp / "stop")[-4:]] == [5, 6, 7, 8] and all(v == v for v in after), after
    assert tb_scalars(tmp / "stop", "train/nonfinite_steps")[-1] == (8, 2)  # the count survives the resume


# --- a hung rank ----------------------------------------------------------------------------------

def test_a_hung_rank_ends_the_job_naming_the_step_and_the_rank(data):
    tmp, train = data
    cfg = tiny_config(tmp / "hang", train, train={"max_steps": 6}, dist={"step_timeout_s": 5})
    proc = start(cfg, tmp, "hang", "probes_faults:sleep_at", {"step": NAN_STEP, "rank": 1, "seconds": 300})
    rc, out = finish(proc, tmp, "hang", timeout=300)
    ended = time.time()
    hung = json.loads((tmp / "hang" / "hang.json").read_text())["time"]
    assert rc == 1 and "exitcode  : 4" in out, out[-4000:]  # EXIT_HUNG: a restart may help, so retried
    assert not (tmp / "hang.noretry").exists()
    report = {r: [line for line in out.splitlines() if line.startswith(f"[rank {r}] ")] for r in (0, 1)}
    assert report[1] and report[1][0].startswith("[rank 1] error: rank 1 "), out[-4000:]
    assert "step 3 has not finished after 5 s (dist.step_timeout_s = 5)" in report[1][0]
    assert report[0] and report[0][0].startswith("[rank 0] error: rank 0 ")  # the rank waiting for it says so too
    # each report is whole (one write, lines led by the rank, though both ranks wrote at once):
    # rank 1's stack shows where it is stuck (the probe's sleeping hook)...
    assert any(line.endswith(", in hang") for line in report[1]), "\n".join(report[1])
    # ...and rank 0's that it waits for rank 1 in the step's collective
    assert any(line.endswith(", in all_reduce") for line in report[0]), "\n".join(report[0])
    # within the configured 5 s (+ 3 s grace for the other ranks' reports, + teardown), not 300 s
    print(f"\nhang: rank 1 stuck in step 3 -> job ended {ended - hung:.1f} s later (dist.step_timeout_s = 5)")
    assert 5 <= ended - hung < 60, ended - hung


# --- SIGKILL while a checkpoint is being written --------------------------------------------------

def test_a_rank_killed_inside_save_checkpoint_resumes_from_the_previous_checkpoint(runs, data):
    tmp, train = data
    cfg = _checkpointed(tmp, train, "killsave")
    proc = start(cfg, tmp, "killsave", "probes_faults:block_in_save", {"step": 4, "rank": 1})
    marker = tmp / "killsave" / "in_save.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), (tmp / "killsave.log").read_text()[-4000:]
    ckpt = tmp / "killsave" / "checkpoints"
    partial = Path(json.loads(marker.read_text())["file"])
    assert partial.parent == ckpt / "step00000004" and partial.exists()
    assert (ckpt / "latest").read_text() == "step00000002"  # latest never names the partial one
    os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
    rc, out = finish(proc, tmp, "killsave", timeout=120)
    assert rc != 0, out[-3000:]
    assert (ckpt / "latest").read_text() == "step00000002" and not (ckpt / "step00000004" / "COMPLETE").exists()

    rc, out = finish(start(cfg, tmp, "killsave-resume"), tmp, "killsave-resume")
    assert rc == 0, out[-4000:]
    assert f"removed {ckpt / 'step00000004'}: a checkpoint whose save never finished" in out
    assert f"resumed from {ckpt / 'step00000002'} at step 2" in out
    # an exact continuation: steps 3-6 are the uninterrupted run's
    clean, resumed = dict(losses(runs[0] / "clean")), dict(losses(tmp / "killsave"))
    assert [resumed[s] for s in (3, 4, 5, 6)] == pytest.approx([clean[s] for s in (3, 4, 5, 6)], rel=1e-6)


# --- a corrupted checkpoint -----------------------------------------------------------------------

def test_a_truncated_shard_is_found_by_the_manifest_and_the_previous_checkpoint_is_used(runs):
    tmp, proc = runs
    first, second = results(tmp / "corrupt")
    assert first["result"]["status"] == "preempted"
    cut = first["probe"]
    assert cut["truncated_to"] < cut["bytes"]
    ckpt = tmp / "corrupt" / "checkpoints"
    assert second["result"]["status"] == "done", second.get("traceback")
    assert (f"checkpoint {ckpt / 'step00000004'} is damaged and is not loaded: {cut['file']} has "
            f"{cut['truncated_to']} bytes, the manifest says {cut['bytes']}") in proc.stdout
    assert f"resumed from {ckpt / 'step00000002'} at step 2" in proc.stdout
    aside = ckpt / "step00000004.damaged"  # set aside, never loaded; the resumed run saved a new step 4
    assert f"It is set aside as {aside}" in proc.stdout
    assert "bytes, the manifest says" in (aside / "DAMAGED").read_text() and not (aside / "COMPLETE").exists()
    assert (aside / cut["file"]).stat().st_size == cut["truncated_to"]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == [
        "step00000002", "step00000004", "step00000004.damaged", "step00000006"]  # a new, whole step 4
    clean, resumed = dict(losses(tmp / "clean")), dict(losses(tmp / "corrupt"))
    assert [resumed[s] for s in (3, 4, 5, 6)] == pytest.approx([clean[s] for s in (3, 4, 5, 6)], rel=1e-6)
    manifest = json.loads((tmp / "clean" / "checkpoints" / "step00000004" / "manifest.json").read_text())
    assert {"mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"} <= set(manifest["files"])


# --- a full or read-only checkpoint disk ----------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m"):
    """A small tmpfs mounted at ``path`` (root). CI (FT_REQUIRE_SLURM=1, which asks for the real parts
    of this machine) fails where it cannot be mounted; elsewhere the test is skipped."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("FT_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("mode,errno_text", [("full", "No space left on device"), ("ro", "Read-only file system")])
def test_a_full_or_read_only_disk_at_save_time_is_a_clear_error_and_the_previous_checkpoint_stands(
        data, mode, errno_text):
    from trainer import manifest

    tmp, train = data
    cfg = _checkpointed(tmp, train, f"disk-{mode}")
    ckpt = tmp / f"disk-{mode}" / "checkpoints"
    with tmpfs(ckpt):
        rc, out = finish(start(cfg, tmp, f"disk-{mode}", "probes_faults:break_disk_after_first_save",
                               {"mode": mode}), tmp, f"disk-{mode}")
        assert rc == 5 and "exitcode  : 5" in out, out[-4000:]  # EXIT_CHECKPOINT_WRITE: never retried
        assert "exited 5 (a checkpoint could not be written" in (tmp / f"disk-{mode}.noretry").read_text()
        assert f"could not write checkpoint {ckpt / 'step00000004'}: {errno_text}" in out, out[-4000:]
        assert f"the previous checkpoint {ckpt / 'step00000002'} stands" in out
        assert f'File "{ROOT / "trainer"}' not in out  # a message, not a traceback from our code
        assert (ckpt / "latest").read_text() == "step00000002"
        entries = json.loads((ckpt / "step00000002" / "manifest.json").read_text())["files"]
        assert manifest.problems(ckpt / "step00000002", entries) == []  # intact, byte for byte
        if mode == "full":  # space freed: the rerun resumes from it
            (ckpt / "filler").unlink()
            rc, out = finish(start(cfg, tmp, "disk-full-resume"), tmp, "disk-full-resume")
            assert rc == 0, out[-4000:]
            assert f"resumed from {ckpt / 'step00000002'} at step 2" in out


def test_when_every_checkpoint_is_damaged_the_run_refuses_instead_of_starting_over(runs):
    tmp, _ = runs
    first, *resumes = results(tmp / "lost")
    assert first["result"]["status"] == "preempted" and len(resumes) == 2
    ckpt = tmp / "lost" / "checkpoints"
    for r in resumes:  # the second start finds only the set-aside folder, and refuses too
        assert r["error"].startswith(f"ConfigError: 1 problem(s) in {ckpt}:"), r
        assert f"no checkpoint in {ckpt} can be resumed: every one was found damaged and set aside " \
               f"({ckpt / 'step00000002.damaged'}" in r["error"]
        assert "move those folders out of the run dir, or train in a new run_dir" in r["error"]
    assert [s for s, _ in losses(tmp / "lost")] == [1, 2]  # nothing trained after the stop
