"""trainer/dist.py's day-2 checks on two real ranks (gloo, one torchrun launch, ~45 s): every rank
reports its versions and rank 0 refuses mismatched ones with a message naming the node (exit 2, the
run dir untouched); dist.timeout_min really is the process group's timeout."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from helpers import ROOT, arith_rows, env_for_ranks, tiny_config, write_jsonl
from launcher.execute import free_port


def test_mismatched_versions_stop_every_rank_and_the_timeout_reaches_the_process_group(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(16))
    cfg = tiny_config(tmp_path / "run", train, dist={"timeout_min": 0.5})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "day2_worker.py"), str(config), str(tmp_path), str(free_port())],
                       cwd=ROOT, env=env_for_ranks(), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["trainer_exit"] == r1["trainer_exit"] == 2  # both ranks stop; neither trains
    host = json.loads(json.dumps(__import__("socket").gethostname()))
    assert (f"node {host} (node rank 0, rank(s) 1) has transformers 4.0.0-other-node but rank 0 on node {host} "
            "has transformers 5.23.0; install the same versions on every node") in out
    assert f"node {host} (node rank 0): ranks 0,1, host {host}, 0 GPU(s), torch 2.13.0" in out  # the report
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # a fresh group with timeout_min 0.25: the barrier rank 1 skips fails after 15 s instead of hanging
    assert r0["pg_initialized_again"] and "Timed out waiting 15000ms" in r0["barrier"], r0
    assert 14 < r0["barrier_waited_s"] < 120, r0  # measured 15.0 s
