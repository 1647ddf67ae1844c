"""The launcher on a REAL Slurm cluster: two slurmd "nodes" on this host (tests/slurm/start.sh).

One module fixture submits four jobs at once (they share the 2 CPU cores; the cluster declares
16 CPUs per node), then each test follows its own job:

- ``hostile``: `python -m launcher submit`, 2 nodes x 1 rank, with a run dir, config path, job name
  and data path full of spaces, quotes, $, ;, backticks and newlines. It must train (world 2,
  node ranks 0,1), log TensorBoard events, and execute nothing injected (no CANARY file).
- ``preempt``: the same run, preempted with `scancel --signal=USR2 --batch` once it trains: it
  checkpoints, requeues itself, resumes, and its loss curve equals the uninterrupted one's.
- ``direct``: `sbatch --nodes=2 --gpus-per-node=2 slurm/finetune.sh CONFIG` (the checked-in script;
  the cluster's GPUs are fake /dev/null devices, so the ranks run on CPU) for a config that plans
  1 node x 2 ranks: 2 ranks per node from SLURM_GPUS_ON_NODE, world 4, node ranks 0,0,1,1, and the
  trainer adapts accumulation to keep the global batch.
- ``crash``: rank 1 is SIGKILLed after the first complete checkpoint: the job fails non-zero,
  promptly, without requeueing, and `latest` still loads.

Jobs are polled with `scontrol show job -o` (sbatch --wait sleeps up to 32 s between checks).
Poll limits are hang detectors, not timing assertions.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import ROOT, arith_rows, assert_curves_close, losses, tiny_config, write_jsonl
from slurm_jobs import FINAL, job_env, pids_of_rank, seconds, show_job, submit_cli, wait_job, write_config

pytestmark = pytest.mark.slurm

# The injected commands name an absolute canary (~ expands to $HOME wherever they would run), so an
# injection that runs in another directory is still seen.
EVIL = "sp ace 'q\" $(touch ~/CANARY) `touch ~/CANARY`; touch ~/CANARY;\nnl $HOME"
CANARY = Path.home() / "CANARY"
# Paths refuse control characters (launcher/strict.py, PathStr): the run dir and the data path keep every
# other hostile character; the job name and the config file's name keep the newline too.
EVIL_PATH = EVIL.replace("\n", " ")
# HF datasets expands $NAME in data paths (os.path.expandvars in datasets.utils.file_utils), so the
# data file's name keeps every hostile character except a $NAME (reported to the trainer's owner).
EVIL_DATA = EVIL_PATH.replace("$HOME", "$(ls)")
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    env = job_env(slurm_cluster)
    CANARY.unlink(missing_ok=True)
    rows = arith_rows(256, seed=1)
    train = write_jsonl(tmp / "data" / "train.jsonl", rows)
    cpu2 = {"gpus_per_node": 0, "cpus_per_task": 2, "time_min": 10, "signal_lead_s": 60}
    two_nodes = dict(dist={"nodes": 2, "procs_per_node": 1}, train={"max_steps": 40},
                     logging={"every_steps": 10, "progress_bar": False, "peak_tflops": 1.0})
    j, t_submit = {}, time.monotonic()

    evil = tmp / f"h {EVIL_PATH}"
    evil_train = write_jsonl(tmp / f"d {EVIL_DATA}" / f"train {EVIL_DATA}.jsonl", rows)
    j["hostile"] = {"cwd": evil, "run_dir": evil / f"run {EVIL_PATH}", "job_name": f"job {EVIL}"}
    cfg = tiny_config(j["hostile"]["run_dir"], evil_train, slurm={**cpu2, "job_name": j["hostile"]["job_name"]},
                      **two_nodes)
    j["hostile"]["id"] = submit_cli(write_config(evil / f"cfg {EVIL}.yaml", cfg), evil, env)

    j["preempt"] = {"run_dir": tmp / "preempt"}
    cfg = tiny_config(tmp / "preempt", train, slurm=cpu2, **two_nodes)
    j["preempt"]["id"] = submit_cli(write_config(tmp / "preempt.yaml", cfg), tmp, env)

    # The checked-in script. The config plans 1 node x 2 ranks, micro 4 x accum 2 = global batch 16;
    # the command line asks for 2 nodes with 2 (fake) GPUs each: a world of 4.
    direct_cwd = tmp / "direct-submit"
    direct_cwd.mkdir()
    j["direct"] = {"run_dir": tmp / "direct", "cwd": direct_cwd}
    cfg = tiny_config(tmp / "direct", train, dist={"nodes": 1, "procs_per_node": 2},
                      train={"max_steps": 8, "grad_accum": 2}, slurm={"cpus_per_task": 2})
    config = write_config(tmp / f"direct {EVIL}.yaml", cfg)
    p = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2",
                        str(ROOT / "slurm" / "finetune.sh"), str(config)],
                       cwd=direct_cwd, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    j["direct"]["id"] = p.stdout.strip().split(";")[0]

    j["crash"] = {"run_dir": tmp / "crash"}
    cfg = tiny_config(tmp / "crash", train, dist={"nodes": 2, "procs_per_node": 1}, slurm=cpu2,
                      train={"max_steps": 100_000}, checkpoint={"every_steps": 2, "keep_last": 2, "export": False})
    j["crash"]["config"] = write_config(tmp / "crash.yaml", cfg)
    j["crash"]["id"] = submit_cli(j["crash"]["config"], tmp, env)

    # Watchers act at the right moment whatever order the tests run in.
    j["preempt"]["thread"] = threading.Thread(target=preempt_when_training, args=(j["preempt"], env), daemon=True)
    j["crash"]["thread"] = threading.Thread(target=kill_rank_after_checkpoint, args=(j["crash"], env), daemon=True)
    j["preempt"]["thread"].start()
    j["crash"]["thread"].start()
    yield {"tmp": tmp, "env": env, "t_submit": t_submit, **j}
    ids = [v["id"] for v in j.values()]
    subprocess.run(["scancel", *ids], env=env, capture_output=True, timeout=30)
    print("\nSlurm figures (s): " + ", ".join(f"{k} {v:.1f}" for k, v in FIGURES.items()))


def slurm_output(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text() + (run_dir / f"slurm-{job}.err").read_text()


def world(run_dir: Path) -> list[tuple]:
    return [(w["rank"], w["node_rank"], w["slurm_nodename"], w["world_size"])
            for w in json.loads((run_dir / "world.json").read_text())]


def preempt_when_training(job: dict, env: dict) -> None:
    """Once the job logs a training step (its signal handling is set up), USR2 to the batch shell."""
    run_dir, t0 = job["run_dir"], time.monotonic()
    while not (run_dir / "metrics.jsonl").exists() or not losses(run_dir):
        if show_job(job["id"], env).get("JobState") not in ("PENDING", "RUNNING") or time.monotonic() - t0 > 400:
            job["error"] = f"the job never trained: {show_job(job['id'], env)}"
            return
        time.sleep(0.1)
    job["t_signal"] = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", "--batch", job["id"]], env=env, check=True, timeout=30)
    for state in ("PENDING", "RUNNING"):  # requeued, then started again
        wait_job(job["id"], env, until=(state,) + FINAL)
        job[f"t_{state.lower()}"] = time.monotonic()


def kill_rank_after_checkpoint(job: dict, env: dict) -> None:
    """SIGKILL rank 1 (like the OOM killer) once a complete checkpoint exists."""
    ckpt, t0 = job["run_dir"] / "checkpoints", time.monotonic()
    while not list(ckpt.glob("step*/COMPLETE")):
        if show_job(job["id"], env).get("JobState") not in ("PENDING", "RUNNING") or time.monotonic() - t0 > 400:
            job["error"] = f"no checkpoint was ever completed: {show_job(job['id'], env)}"
            return
        time.sleep(0.1)
    pids = pids_of_rank(job["run_dir"] / "config.yaml", 1)
    if len(pids) != 1:
        job["error"] = f"expected one process of rank 1, found {pids}"
        return
    os.kill(pids[0], signal.SIGKILL)
    job["t_kill"] = time.monotonic()
    wait_job(job["id"], env, limit_s=120)
    job["t_end"] = time.monotonic()


def test_preempted_job_checkpoints_requeues_resumes_and_matches_the_uninterrupted_curve(jobs):
    p, env = jobs["preempt"], jobs["env"]
    job, run_dir = p["id"], p["run_dir"]
    final = wait_job(job, env)
    p["thread"].join(timeout=60)
    assert "error" not in p, p["error"]
    assert "t_running" in p, "the watcher did not see the job requeued and running again"
    FIGURES["preempt: USR2 -> requeued (PENDING)"] = p["t_pending"] - p["t_signal"]
    FIGURES["preempt: requeue delay (PENDING -> RUNNING)"] = p["t_running"] - p["t_pending"]
    FIGURES["preempt: RunTime of the resumed run"] = seconds(final["RunTime"])
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), final
    log = slurm_output(run_dir, job)
    assert "[finetune] SIGUSR2 received" in log and "requeueing (restart 1 of at most 3)" in log
    stopped = int(re.search(r"checkpointed at step (\d+)", log).group(1))
    assert 1 <= stopped < 40, "the signal came after the last step: nothing was preempted"
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in log
    assert log.count("[finetune] job ") == 2 and (run_dir / "DONE").exists()
    # the loss curve of the interrupted run equals the uninterrupted one (same config and world)
    ref_dir = jobs["hostile"]["run_dir"]
    assert wait_job(jobs["hostile"]["id"], env)["JobState"] == "COMPLETED"
    curve = losses(run_dir)
    assert [s for s, _ in curve] == list(range(1, 41))
    assert_curves_close(curve, losses(ref_dir), rel=1e-5)


def test_a_rank_that_dies_fails_the_job_promptly_and_keeps_the_last_checkpoint(jobs):
    c, env = jobs["crash"], jobs["env"]
    job, run_dir = c["id"], c["run_dir"]
    final = wait_job(job, env)
    c["thread"].join(timeout=130)
    assert "error" not in c, c["error"]
    FIGURES["crash: SIGKILL of rank 1 -> job ended"] = c["t_end"] - c["t_kill"]
    # promptly: the other ranks must not sit in a collective until a timeout (measured 5.7 s; this
    # bound is a hang detector, far above any machine's noise, not a speed claim)
    assert c["t_end"] - c["t_kill"] < 60, c
    assert final["JobState"] == "FAILED" and final["ExitCode"] != "0:0" and final["Restarts"] == "0", final
    log = slurm_output(run_dir, job)
    assert "[finetune] training failed (exit" in log and not (run_dir / "DONE").exists()
    # `latest` names a complete checkpoint, and it loads (DeepSpeed's own consolidation, one process)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from helpers import TINY_LLAMA
    from launcher.memory import params_from_hf_config

    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "COMPLETE").exists()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    assert sum(t.numel() for t in state.values()) == params_from_hf_config(TINY_LLAMA)


def test_submit_runs_a_two_node_job_with_hostile_names_and_paths(jobs):
    h, env = jobs["hostile"], jobs["env"]
    final = wait_job(h["id"], env)
    FIGURES["hostile 2x1 (launcher submit): RunTime"] = seconds(final["RunTime"])
    run_dir = h["run_dir"]
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), slurm_output(run_dir, h["id"])[-4000:]
    assert final["JobName"] == h["job_name"]  # the name reached Slurm byte for byte (newline included)
    assert world(run_dir) == [(0, 0, "node1", 2), (1, 1, "node2", 2)]
    curve = losses(run_dir)
    assert len(curve) == 40 and curve[-1][1] < curve[0][1] - 1.0
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "DONE").exists() and "[finetune] finished" in slurm_output(run_dir, h["id"])
    assert not CANARY.exists() and not list(jobs["tmp"].rglob("CANARY")) and not list(ROOT.glob("CANARY"))


def test_sbatch_of_the_checked_in_script_with_a_node_override(jobs):
    d, env = jobs["direct"], jobs["env"]
    final = wait_job(d["id"], env)
    FIGURES["direct sbatch 2x2: RunTime"] = seconds(final["RunTime"])
    out = (d["cwd"] / f"slurm-{d['id']}.out").read_text()
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), out[-3000:]
    assert world(d["run_dir"]) == [(0, 0, "node1", 4), (1, 0, "node1", 4), (2, 1, "node2", 4), (3, 1, "node2", 4)]
    assert ("the config plans world size 2 (global batch 16 = micro 4 x accum 2 x world 2) but the job started 4 "
            "ranks; keeping global batch 16 by setting grad_accum 2 -> 1") in out
    ds = json.loads((d["run_dir"] / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, 1)
    assert len(losses(d["run_dir"])) == 8


def test_an_invalid_config_submits_nothing(slurm_cluster, tmp_path):
    env = job_env(slurm_cluster)
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(8))
    name = f"invalid-{os.getpid()}-{time.time_ns()}"
    cfg = tiny_config(tmp_path / "run", train, dist={"nodes": 2, "procs_per_node": 2},
                      train={"global_batch_size": 12}, data={"eval": str(tmp_path / "nope.jsonl")},
                      slurm={"job_name": name, "time_min": 1, "signal_lead_s": 120})
    p = subprocess.run([sys.executable, "-m", "launcher", "submit", str(write_config(tmp_path / "c.yaml", cfg))],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "3 problem(s)" in p.stderr, p.stderr
    assert "'train.global_batch_size' = 12 is not divisible" in p.stderr
    assert "'slurm.signal_lead_s' = 120 is not shorter than the time limit" in p.stderr
    assert f"'data.eval' = '{tmp_path / 'nope.jsonl'}' does not exist" in p.stderr
    assert not (tmp_path / "run").exists() and "submitted" not in p.stdout
    jobs_known = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True).stdout
    assert name not in jobs_known
