"""The real entry points: the deepspeed launcher, torchrun, plain python (world of one)."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from helpers import ROOT, arith_rows, env_for_ranks, tiny_config, write_jsonl


def write_config(tmp, name, **sections):
    train = write_jsonl(tmp / "train.jsonl", arith_rows(64))
    cfg = tiny_config(tmp / name, train, **sections)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp / name


def run(cmd, tmp):
    env = env_for_ranks()
    env.pop("OMP_NUM_THREADS")  # the trainer must cope without it (deepspeed's launcher does not set it)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_deepspeed_launcher_two_ranks_with_override(tmp_path):
    cfg, run_dir = write_config(tmp_path, "ds", checkpoint={"export": True})
    p = run([str(ROOT / ".venv/bin/deepspeed") if (ROOT / ".venv/bin/deepspeed").exists() else "deepspeed",
             "--num_gpus", "2", "--master_port", "29561", "trainer/main.py", "--config", str(cfg),
             "train.lr=1e-3"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [w["rank"] for w in json.loads((run_dir / "world.json").read_text())] == [0, 1]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 1e-3
    assert (run_dir / "export" / "model.safetensors").exists()
    assert "exported model (from_pretrained)" in p.stdout
    # the same command again: the run is finished, nothing trains
    again = run([sys.executable, "trainer/main.py", "--config", str(cfg), "train.lr=1e-3"], tmp_path)
    assert again.returncode == 0 and "run already finished" in again.stdout


def test_torchrun(tmp_path):
    cfg, run_dir = write_config(tmp_path, "tr")
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "trainer/main.py", "--config", str(cfg)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {w["world_size"] for w in json.loads((run_dir / "world.json").read_text())} == {2}
    assert (run_dir / "DONE").exists()


def test_plain_python_is_a_world_of_one_that_keeps_the_global_batch(tmp_path):
    cfg, run_dir = write_config(tmp_path, "py")  # planned for 2 ranks x micro 4
    p = run([sys.executable, "trainer/main.py", "--config", str(cfg)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mpi4py" not in p.stderr
    assert "keeping global batch 8 by setting grad_accum 1 -> 2" in p.stdout
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 2)


def test_cli_config_errors_exit_2_with_the_message(tmp_path):
    cfg, run_dir = write_config(tmp_path, "bad")
    p = run([sys.executable, "trainer/main.py", "--config", str(cfg), "train.micro_batch_size=0", "zero.stagee=1"],
            tmp_path)
    assert p.returncode == 2
    assert "'train.micro_batch_size' = 0" in p.stderr and "unknown key 'zero.stagee'" in p.stderr
    assert not run_dir.exists()
