"""Suite-wide pytest set-up: the real local Slurm cluster for tests marked ``slurm``.

The cluster is two slurmd daemons on 127.0.0.11/12 plus slurmctld and munged, from Debian's
packages (tests/slurm/start.sh installs them with apt when missing). Bringing it up needs root.
Without root, or when it cannot start, Slurm tests skip with the reason -- unless the suite is told
Slurm is required (``FT_REQUIRE_SLURM=1`` or ``--require-slurm``, as .ci/run does): then they fail.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SLURM_TOOLS = Path(__file__).resolve().parent / "slurm"
SLURM_DIR = os.environ.get("SLURM_LOCAL_DIR", "/tmp/slurm-local")


def pytest_addoption(parser):
    parser.addoption("--require-slurm", action="store_true", default=False,
                     help="fail (do not skip) tests marked slurm when no local Slurm cluster can be started; "
                          "same as FT_REQUIRE_SLURM=1")


def slurm_required(config) -> bool:
    return config.getoption("--require-slurm") or os.environ.get("FT_REQUIRE_SLURM") == "1"


def _unavailable(request, reason: str):
    if slurm_required(request.config):
        pytest.fail(f"Slurm is required (FT_REQUIRE_SLURM=1 / --require-slurm) but unavailable: {reason}",
                    pytrace=False)
    pytest.skip(f"no local Slurm cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """Start (or reuse) the local 2-node cluster; yields the environment for Slurm commands."""
    if os.geteuid() != 0:
        _unavailable(request, "starting slurmctld/slurmd needs root (run the suite as root, or start "
                              "tests/slurm/start.sh yourself as root)")
    env = dict(os.environ, SLURM_CONF=f"{SLURM_DIR}/slurm.conf", SLURM_LOCAL_DIR=SLURM_DIR)
    try:
        p = subprocess.run(["bash", str(SLURM_TOOLS / "start.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    except subprocess.TimeoutExpired:
        _unavailable(request, "tests/slurm/start.sh did not finish in 600 s")
    if p.returncode != 0:
        _unavailable(request, f"tests/slurm/start.sh failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    started_here = "already running" not in p.stderr
    yield env
    if started_here:  # leave a cluster someone else started alone
        subprocess.run(["bash", str(SLURM_TOOLS / "stop.sh")], env=env, capture_output=True, timeout=120)
