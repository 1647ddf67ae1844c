"""Following jobs on the REAL local Slurm cluster (tests/slurm/start.sh), for the cluster test modules
(test_slurm_cluster.py, test_day2_cluster.py): the jobs' environment, `scontrol show job -o` polling,
`launcher submit`, and finding a rank's processes. Poll limits are hang detectors, not timing assertions."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_env(cluster_env: dict) -> dict:
    env = dict(cluster_env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("OMP_NUM_THREADS", None)
    return env


def show_job(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    fields = {k: m.group(1) for k in ("JobState", "ExitCode", "Restarts", "RunTime")
              if (m := re.search(rf"\b{k}=(\S+)", out))}
    name = re.search(r"JobName=(.*?) UserId=", out, re.S)
    fields["JobName"] = name.group(1) if name else None
    return fields


def seconds(hms: str) -> float:
    return float(sum(int(x) * 60**i for i, x in enumerate(reversed(hms.split("-")[-1].split(":")))))


def wait_job(job: str, env: dict, limit_s: float = 900, until=FINAL) -> dict:
    """Poll every 0.2 s until the job's state is in ``until``; records state changes."""
    t0, seen, last = time.monotonic(), [], None
    while True:
        info = show_job(job, env)
        key = (info.get("JobState"), info.get("Restarts"))
        if key != last:
            seen.append((round(time.monotonic() - t0, 2), *key))
            last = key
        if info.get("JobState") in until:
            info["history"] = seen
            return info
        if time.monotonic() - t0 > limit_s:
            pytest.fail(f"job {job} still {info.get('JobState')} after {limit_s} s (a hang?); history {seen}")
        time.sleep(0.2)


def submit_cli(config: Path, cwd: Path, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "launcher", "submit", str(config)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return re.search(r"submitted job (\d+)", p.stdout).group(1)


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def pids_of_rank(config: Path, rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = b" ".join((proc / "cmdline").read_bytes().split(b"\0"))
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"-m trainer.main" in cmd and str(config).encode() in cmd and b"torch.distributed.run" not in cmd
                and f"RANK={rank}".encode() in environ):
            pids.append(int(proc.name))
    return pids
