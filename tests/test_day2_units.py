"""Day-2 features without a cluster: the container / exclusive / extra_sbatch / network / flight-recorder
rendering (golden), what the rendered network block really exports under bash, their validation
messages, sweep planning (axes, names, one bad point submits nothing, the array script picks its
config), the status arithmetic, the version check, and compare's table / PNG / TensorBoard links.

The golden file tests/golden/cluster-container.sh is examples/cluster-container.yaml rendered with
fixed paths; regenerate it with ``FT_UPDATE_GOLDEN=1 pytest tests/test_day2_units.py -k golden``.
The real-Slurm side of these features is tests/test_day2_cluster.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, arith_rows, tiny_config, write_jsonl
from launcher import jobs, sweep
from launcher.config import ConfigError
from launcher.load import load_config
from launcher.plan import make_plan
from launcher.rules import read_yaml, validate
from launcher.slurm import NETWORKS, network_block

GOLDEN = ROOT / "tests" / "golden" / "cluster-container.sh"


def cli(*args, cwd=None):
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def container_plan():
    cfg = validate(read_yaml(ROOT / "examples" / "cluster-container.yaml"), source="cluster-container.yaml")
    return make_plan(cfg, "examples/cluster-container.yaml", [], Path("/scratch/me"), "/opt/venv/bin/python",
                     "/opt/ds-slurm-finetune")


# --------------------------------------------------------------------------- rendering (golden)


def test_container_exclusive_extra_sbatch_network_and_restarts_render_as_the_golden_script():
    plan = container_plan()
    script = plan.files[plan.script]
    if os.environ.get("FT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), ("the rendered script differs from tests/golden/cluster-container.sh; "
                                          "if the change is intended: FT_UPDATE_GOLDEN=1 pytest "
                                          "tests/test_day2_units.py -k golden")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # pyxis flags on the training srun and on the job-facts step (the image holds Python and the launcher)
    flags = ("'--container-image=nvcr.io#nvidia/pytorch:24.05-py3' --container-mounts=/scratch:/scratch "
             '--container-workdir="$SLURM_SUBMIT_DIR" --container-name="finetune-$SLURM_JOB_ID"')
    assert script.count(flags) == 2
    assert f'facts=$(srun --nodes=1 --ntasks=1 {flags} "$PYTHON" -m launcher job-facts' in script
    assert "PYTHON=python3" in script  # the image's Python, not the login node's venv
    assert "#SBATCH --exclusive" in script and "#SBATCH --reservation=llm-finetune" in script
    assert "#SBATCH --mail-type=END,FAIL" in script
    # the network block comes before env_setup, so env_setup's lines win
    assert script.index('export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"') < script.index("export NCCL_IB_HCA=")
    assert 'export TORCH_FR_DUMP_TEMP_FILE="$RUN_DIR/flight_recorder/rank_"' in script
    assert script.index('eval "$facts"') < script.index("TORCH_FR_DUMP_TEMP_FILE")  # RUN_DIR is known there
    assert "MAX_RESTARTS" in script and "-m trainer.node --no-retry-file" in script


def test_extra_sbatch_values_that_are_not_directive_safe_go_on_the_sbatch_command_line(tmp_path):
    cfg = validate(tiny_config(tmp_path / "r", tmp_path / "t.jsonl", slurm={
        "extra_sbatch": ["--comment=two words; $(touch CANARY)", "--hint=nomultithread", "--spread-job"]}))
    plan = make_plan(cfg, "c.yaml", [], tmp_path, "/usr/bin/python3", "/repo")
    script = plan.files[plan.script]
    assert "#SBATCH --hint=nomultithread" in script and "#SBATCH --spread-job" in script
    assert "--comment=two words; $(touch CANARY)" in plan.sbatch  # one argv element
    assert "# --comment: not representable in an #SBATCH line" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not list(tmp_path.glob("**/CANARY"))


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_each_network_block_exports_its_variables_and_env_setup_or_the_shell_overrides_them(network):
    block = network_block(network)
    names = [name for name, _, _ in NETWORKS[network]]
    for name, value, why in NETWORKS[network]:  # every variable is explained by the comment above it
        i = block.index(f'export {name}="${{{name}:-{value}}}"')
        assert block[:i].rstrip().splitlines()[-1] == f"# {why}"
    first = names[0]
    env_setup = f"export {names[-1]}=from-env-setup"
    code = f"{block}\n{env_setup}\n" + "".join(f'printf "%s=%s\\n" {n} "${n}"\n' for n in names)
    env = {"PATH": "/usr/bin:/bin", first: "from-the-shell"}
    out = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines())
    expected = {name: value for name, value, _ in NETWORKS[network]}
    expected.update({first: "from-the-shell", names[-1]: "from-env-setup"})
    assert got == expected
    assert "export" not in network_block("auto")


# --------------------------------------------------------------------------- validation


def test_extra_sbatch_and_container_problems_are_reported_together_with_the_key_and_the_fix(tmp_path):
    cfg = tiny_config(tmp_path / "r", tmp_path / "t.jsonl", slurm={
        "extra_sbatch": ["--time=10", "-p gpu", "--reservation=a", "--reservation=b", "--array=0-3"],
        "container": {"image": " ", "mounts": ["/a,b:/c", "rel:/x"], "workdir": "work"}})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msgs = e.value.problems
    assert len(msgs) == 8, msgs
    assert any("'--time=10' sets --time, which the config models; use slurm.time_min instead" in m for m in msgs)
    assert any("item '-p gpu' is not an sbatch option; write it as --flag=value or --flag" in m for m in msgs)
    assert any("sets --reservation more than once" in m for m in msgs)
    assert any("--array" in m and "python -m launcher sweep" in m for m in msgs)
    assert any("'slurm.container.image' = ' ' is empty" in m for m in msgs)
    assert sum("'slurm.container.mounts' item" in m and "SRC:DST[:FLAGS]" in m for m in msgs) == 2
    assert any("'slurm.container.workdir' = 'work' must be an absolute path" in m for m in msgs)
    write_jsonl(tmp_path / "t.jsonl", arith_rows(4))
    p = cli("validate", _write(tmp_path / "c.yaml", cfg), cwd=tmp_path)
    assert p.returncode == 2 and "8 problem(s)" in p.stderr + p.stdout


def test_a_run_may_be_resubmitted_with_other_restart_network_timeout_and_recorder_settings(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", arith_rows(8))
    cfg = tiny_config(tmp_path / "run", train)
    path = _write(tmp_path / "c.yaml", cfg)
    assert cli("render", path, cwd=tmp_path).returncode == 0
    same_run = ["dist.max_restarts=3", "dist.network=efa", "dist.timeout_min=5", "dist.flight_recorder=true"]
    load_config(path, same_run)  # how the job runs, not what it trains: the same run
    with pytest.raises(ConfigError, match=r"holds a different run's config \(differs in: train.lr\)"):
        load_config(path, ["train.lr=0.5"])


# --------------------------------------------------------------------------- sweeps


def test_sweep_axes_split_at_top_level_commas_and_name_points_from_their_values():
    assert sweep.split_values("1e-5,3e-5") == ["1e-5", "3e-5"]
    assert sweep.split_values("[q_proj,v_proj],[q_proj]") == ["[q_proj,v_proj]", "[q_proj]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    fixed, axes, problems = sweep.parse_sweep_args(["train.lr=1e-5,3e-5", "method.lora.r=8,16", "seed=1",
                                                    "method.lora.target_modules=[q_proj,v_proj]"])
    assert problems == [] and fixed == ["seed=1", "method.lora.target_modules=[q_proj,v_proj]"]
    assert [(a.key, a.values) for a in axes] == [("train.lr", ["1e-5", "3e-5"]), ("method.lora.r", ["8", "16"])]
    assert sweep.point_names(axes, [("1e-5", "8"), ("3e-5", "16")]) == ["lr-1e-5_r-8", "lr-3e-5_r-16"]
    two_lrs = [sweep.Axis("train.lr", ["1", "2"]), sweep.Axis("other.lr", ["x y", "x_y"])]
    assert sweep.point_names(two_lrs, [("1", "x y"), ("1", "x_y")]) == [
        "train.lr-1_other.lr-x_y-1", "train.lr-1_other.lr-x_y-2"]
    _, _, problems = sweep.parse_sweep_args(["train.lr=1,1", "run_dir=a,b", "seed=1,", "x"])
    assert len(problems) == 4, problems
    assert sweep.parse_sweep_args(["seed=1"])[2] == [
        "nothing to sweep: give at least one key with several values, e.g. train.lr=1e-5,3e-5"]


def sweep_config(tmp: Path, **sections) -> Path:
    train = write_jsonl(tmp / "data" / "train.jsonl", arith_rows(16))
    cfg = tiny_config(tmp / "sw", train, dist={"nodes": 1, "procs_per_node": 1},
                      slurm={"gpus_per_node": 0, "cpus_per_task": 1}, **sections)
    return _write(tmp / "sweep.yaml", cfg)


def test_a_sweep_plans_one_array_job_with_a_run_dir_per_point(tmp_path):
    path = sweep_config(tmp_path)
    plan = sweep.make_sweep(str(path), ["train.lr=0.001,0.002", "train.grad_clip=0.5,1.0", "seed=3"], None, 2,
                            tmp_path, "/usr/bin/python3", str(ROOT))
    names = [p["name"] for p in plan.points]
    assert names == ["lr-0.001_grad_clip-0.5", "lr-0.001_grad_clip-1.0", "lr-0.002_grad_clip-0.5",
                     "lr-0.002_grad_clip-1.0"]
    script = plan.files[plan.script]
    assert plan.sbatch[:2] == ["sbatch", "--parsable"] and plan.sbatch[-1] == str(plan.script)
    assert "#SBATCH --array=0-3%2" in script
    assert f"#SBATCH --output={tmp_path}/sw/tasks/%a/slurm-%A_%a.out" in script
    assert plan.links[tmp_path / "sw" / "tasks" / "2"] == "../lr-0.002_grad_clip-0.5"
    for p in plan.points:  # each point: its own validated config with its values
        saved = yaml.safe_load(plan.files[Path(p["run_dir"]) / "config.yaml"])
        assert (saved["train"]["lr"], saved["train"]["grad_clip"], saved["seed"]) == (
            float(p["overrides"]["train.lr"]), float(p["overrides"]["train.grad_clip"]), 3)
    # bash picks task i's config from SLURM_ARRAY_TASK_ID (the script up to its argument handling)
    head = script.split('OVERRIDES=("$@")')[0]
    for task in range(4):
        out = subprocess.run(["bash", "-c", head + '\nprintf "%s" "$CONFIG"'], capture_output=True, text=True,
                             env={"SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "7", "PATH": "/usr/bin:/bin"})
        assert out.stdout == f"{plan.points[task]['run_dir']}/config.yaml"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_one_bad_point_submits_nothing_and_names_that_point(tmp_path):
    path = sweep_config(tmp_path)
    p = cli("sweep", path, "train.lr=0.001,-1", "train.grad_clip=0.5,1.0", cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "1 problem(s)" in p.stderr  # the two bad points share the problem: listed once, naming both
    assert "points lr--1_grad_clip-0.5, lr--1_grad_clip-1.0: 'train.lr' = -1" in p.stderr
    assert not (tmp_path / "sw").exists() and "submitted" not in p.stdout
    # a problem every point shares is listed once
    p = cli("sweep", path, "train.lr=0.001,0.002", "data.eval=nope.jsonl", cwd=tmp_path)
    assert p.returncode == 2 and "1 problem(s)" in p.stderr and "every point: 'data.eval' = 'nope.jsonl'" in p.stderr
    # keys that change the batch script cannot vary inside one job array
    with pytest.raises(ConfigError, match="one job array runs one script.*slurm.time_min"):
        sweep.make_sweep(str(path), ["slurm.time_min=10,20"], None, None, tmp_path, "/usr/bin/python3", str(ROOT))
    assert not (tmp_path / "sw").exists()


def test_sweep_dry_run_prints_the_points_and_the_array_command_and_writes_nothing(tmp_path):
    path = sweep_config(tmp_path)
    p = cli("sweep", path, "train.lr=0.001,0.002", "--max-parallel", "1", "--dry-run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "2 point(s), all valid" in p.stdout and "task 1: lr-0.002" in p.stdout
    assert "--array=0-1%1" in p.stdout and not (tmp_path / "sw").exists()


# --------------------------------------------------------------------------- status arithmetic


def test_progress_takes_the_median_step_time_of_recent_steps_and_the_logged_total():
    rows = [{"step": 0, "time": 0.0, "train/total_steps": 100}]
    t = 100.0
    for step in range(1, 31):
        t += 30.0 if step == 20 else 2.0  # an evaluation makes one interval long
        rows.append({"step": step, "time": t, "train/loss": 5.0 - step * 0.1, "train/tokens_per_s": 1000.0 + step})
    rows.append({"step": 20, "time": t, "eval/loss": 3.1, "eval/ppl": 22.2})
    p = jobs.progress(rows, total_fallback=None)
    assert (p["step"], p["total_steps"], p["tokens_per_s"]) == (30, 100, 1030.0)
    assert p["step_time_s"] == 2.0 and p["eta_s"] == 70 * 2.0  # the 30 s interval does not count (median)
    assert p["eval"] == {"step": 20, "eval/loss": 3.1, "eval/ppl": 22.2}
    assert jobs.progress(rows[1:5], total_fallback=40)["total_steps"] == 40  # from config.yaml


def test_squeue_and_sacct_lines_parse():
    assert jobs.parse_squeue("RUNNING|1|0|1:02|10:00|node[1-2]|None|\n") == {
        "state": "RUNNING", "requeues": 1, "exit_code": "0", "elapsed": "1:02", "time_limit": "10:00",
        "nodes": "node[1-2]", "reason": "None"}
    assert jobs.parse_squeue("") is None
    assert jobs.parse_sacct("CANCELLED by 0|0:15|00:01:02|node1\n")["state"] == "CANCELLED"


def test_version_check_names_the_node_that_differs():
    from trainer.dist import version_problems

    base = {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.23.0"}
    infos = [{"rank": r, "node_rank": r // 2, "host": f"h{r // 2}", "slurm_nodename": f"node{r // 2 + 1}",
              "versions": dict(base)} for r in range(6)]
    assert version_problems(infos) == []
    for r in (4, 5):
        infos[r]["versions"]["transformers"] = "4.57.0"
    assert version_problems(infos) == [
        "node node3 (node rank 2, rank(s) 4, 5) has transformers 4.57.0 but rank 0 on node node1 has transformers "
        "5.23.0; install the same versions on every node (one shared venv or container image)"]


# --------------------------------------------------------------------------- compare


def test_compare_tables_best_or_final_metrics_overlays_curves_and_links_tensorboard(tmp_path):
    runs = {}
    for name, scale, done in (("a", 1.0, {"last_step": 4, "eval/loss": 0.9}), ("b", 0.5, {
            "last_step": 4, "best_step": 2, "best_metric": "eval/loss", "eval/loss": 0.4}), ("c", 2.0, None)):
        d = tmp_path / name
        (d / "tb").mkdir(parents=True)
        rows = [{"step": s, "time": s, "train/loss": scale * (5 - s)} for s in range(1, 5)]
        rows += [{"step": 2, "time": 2, "eval/loss": scale},  # a restarted attempt logs steps 3 and 4 again
                 {"step": 3, "time": 5, "train/loss": 99.0}, {"step": 4, "time": 6, "train/loss": scale}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if done:
            (d / "DONE").write_text(json.dumps(done))
        runs[name] = d
    p = cli("compare", *runs.values(), "--out", tmp_path / "cmp", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["run", "steps", "train/loss", "eval/loss", "from"]
    assert lines[1].split() == ["a", "4/?", "1.0000", "0.9000", "final@4"]
    assert lines[2].split() == ["b", "4/?", "0.5000", "0.4000", "best@2"]
    assert lines[3].split()[:4] == ["c", "4/?", "2.0000", "2.0000"] and "last eval@2 (running)" in lines[3]
    assert "best by eval/loss (lower is better): b (0.4000)" in p.stdout
    png = (tmp_path / "cmp" / "compare_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    links = sorted((tmp_path / "cmp" / "tb_compare").iterdir())
    assert [x.name for x in links] == ["a", "b", "c"] and all(x.is_symlink() for x in links)
    assert [x.resolve() for x in links] == [runs[n].resolve() / "tb" for n in "abc"]
    # the last value of a step logged twice (a restarted attempt) is the curve's
    assert dict(sweep.summarise(runs["a"])["curve"])[3] == 99.0


def _write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path
