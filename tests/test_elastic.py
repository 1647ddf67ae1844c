"""Resuming on a different world size, and a run dir that moved, on real DeepSpeed ranks (CPU, gloo).

One 2-rank launch runs, for ZeRO-1, ZeRO-2 with optimizer offload (DeepSpeed's CPU Adam) and ZeRO-3
(nothing persistent, so really partitioned), a 4-step run and the same run stopped after step 2 by
the real Stopper; and an 8-bit AdamW run stopped after step 2. Each stopped run dir is then copied
(for 4 ranks) and moved (for 1 rank) elsewhere and resumed from there: one 1-rank launch and one
4-rank launch resume all three stages. Global batch 8 = micro 2 x accum 4 / 2 / 1 x world 1 / 2 / 4.
Weight decay is on, so the optimizer has two parameter groups (the ZeRO-3 universal load gets
those wrong without trainer/checkpoint.py's repair). Steps 3 and 4 of every resumed run equal the
2-rank uninterrupted run's, loss and grad norm. The 8-bit run resumed on 1 rank is refused (exit 2)
before its data is even read.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, arith_rows, env_for_ranks, launch, result, tiny_config, write_jsonl
from launcher.config import to_yaml
from launcher.rules import validate
from launcher.rules_disk import run_dir_problems

Z3 = {"stage": 3, "param_persistence_threshold": 0}
STAGES = {"z1": {"stage": 1}, "z2off": {"stage": 2, "offload_optimizer": True}, "z3": Z3}
STOP, STEPS = 2, 4
# Measured (fp32, 1 and 4 ranks vs 2, steps 3-4): largest relative difference 9e-7 (grad norm, ZeRO-2 + offload).
REL = 1e-5


def conf(tmp: Path, run_dir: str, zero: dict, **train) -> dict:
    return tiny_config(tmp / run_dir, tmp / "train.jsonl", zero=zero, train={
        "micro_batch_size": 2, "global_batch_size": 8, "max_steps": STEPS, "lr": 1e-2, "weight_decay": 0.1,
        **train})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    write_jsonl(tmp / "train.jsonl", arith_rows(256, seed=1))
    first = []
    for name, zero in STAGES.items():
        first += [{"name": f"full-{name}", "config": conf(tmp, f"full-{name}", zero)},
                  {"name": f"cut-{name}", "stop_at": STOP, "config": conf(tmp, f"cut-{name}", zero)}]
    first.append({"name": "cut-8bit", "stop_at": STOP, "config": conf(tmp, "cut-8bit", STAGES["z1"],
                                                                      optimizer="adamw8bit")})
    t0 = time.perf_counter()
    out = {2: launch(first, tmp).stdout}
    wall = {2: time.perf_counter() - t0}
    cut = {name: result(tmp / f"cut-{name}")["result"] for name in [*STAGES, "8bit"]}
    for name in STAGES:  # elsewhere: a copy for 4 ranks; the original moves for 1 rank (its old path is gone)
        shutil.copytree(tmp / f"cut-{name}", tmp / "elsewhere" / f"r4-{name}")
        shutil.move(tmp / f"cut-{name}", tmp / "moved" / f"r1-{name}")
    for n, where in ((1, "moved"), (4, "elsewhere")):
        out[n] = launch([{"name": f"r{n}-{name}", "config": conf(tmp, f"{where}/r{n}-{name}", zero)}
                         for name, zero in STAGES.items()], tmp, nproc=n, timeout=1200).stdout
        wall[n] = time.perf_counter() - t0 - sum(wall.values())
    # the 8-bit run on 1 rank: the real entry point (a world of one), exit code and all
    cfg_file = tmp / "cut-8bit.yaml"
    cfg_file.write_text(yaml.safe_dump(conf(tmp, "cut-8bit", STAGES["z1"], optimizer="adamw8bit")))
    before = snapshot(tmp / "cut-8bit")
    refused = subprocess.run([sys.executable, "trainer/main.py", "--config", str(cfg_file)], cwd=ROOT,
                             env=env_for_ranks(), capture_output=True, text=True, timeout=300)
    print(f"launch wall time by world size: {wall} s")
    return {"tmp": tmp, "out": out, "cut": cut, "refused": refused, "before": before}


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_the_first_halves_really_stopped_at_step_2(runs):
    tmp = runs["tmp"]
    for name in [*STAGES, "8bit"]:
        assert runs["cut"][name]["status"] == "preempted", runs["cut"][name]
    for name in STAGES:
        ckpt = tmp / "moved" / f"r1-{name}" / "checkpoints"
        # the copy carries the first half's record: 2 ranks wrote step 2, plan micro 2 x accum 2 x world 2
        first_half = tmp / "elsewhere" / f"r4-{name}" / "checkpoints" / "step00000002"
        record = json.loads((first_half / "COMPLETE").read_text())
        assert record == {"step": 2, "world_size": 2, "plan": [2, 2, 2], "manifest": True}
        assert (ckpt / "step00000002" / "rng_rank1.pt").exists()
    assert sorted(metrics(tmp / "cut-8bit")) == [1, 2]


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("name", list(STAGES))
def test_a_2_rank_checkpoint_resumes_on_another_world_and_continues_the_run(runs, name, world):
    tmp = runs["tmp"]
    run_dir = tmp / ("moved" if world == 1 else "elsewhere") / f"r{world}-{name}"
    out = result(run_dir)
    assert out["result"]["status"] == "done"
    assert f"resumed from {run_dir / 'checkpoints' / 'step00000002'} at step 2" in runs["out"][world]
    # DeepSpeed loaded the universal form, converted once (COMPLETE last), with the global batch kept
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["checkpoint"] == {"load_universal": True}
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 4 // world)
    conversion = json.loads((run_dir / "checkpoints" / "step00000002" / "universal" / "COMPLETE").read_text())
    assert conversion["written_world"] == 2
    assert {w["world_size"] for w in json.loads((run_dir / "world.json").read_text())} == {world}
    # steps 1-2 come from the 2-rank first half, 3-4 from this world; 3 and 4 equal the uninterrupted run
    full, resumed = metrics(tmp / f"full-{name}"), metrics(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (STOP + 1, STOP + 2):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            a, b = full[step][key], resumed[step][key]
            assert abs(a - b) <= REL * abs(a), f"step {step} {key}: {b} on {world} rank(s) vs {a} on 2 (rel {REL})"
    assert json.loads((run_dir / "checkpoints" / "step00000004" / "COMPLETE").read_text())["world_size"] == world


def test_a_moved_run_dir_resumes_and_records_where_it_is_now(runs):
    tmp = runs["tmp"]
    for name in STAGES:
        assert not (tmp / f"cut-{name}").exists()  # moved away, not copied
        run_dir = tmp / "moved" / f"r1-{name}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] == str(run_dir)


def test_8bit_optimizer_state_on_another_world_is_refused_before_any_work(runs):
    p = runs["refused"]
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for text in ["was written by 2 rank(s) but this job started 1", "'train.optimizer' = 'adamw8bit'",
                 "resume it on 2 rank(s)"]:
        assert text in p.stderr, p.stderr
    assert "data/train:" not in p.stdout  # refused before the data (and the model) were touched
    assert snapshot(runs["tmp"] / "cut-8bit") == runs["before"]  # nothing written


# --------------------------------------------------------------------------- no ranks


def test_every_world_uses_the_same_rows_for_a_step():
    """Step k of a global batch G takes perm[kG:(k+1)G] whatever the world: the ranks' windows
    (trainer/data.py, with the accumulation fit_world picks) together are that slice, in epoch 0
    and across the epoch boundary. So a resumed run's step k+1 reads the rows the old world's
    step k+1 would have read."""
    import torch

    from trainer import data as D

    n, seed, micro, G = 250, 3, 2, 8  # 250 rows: not a multiple of G; 31 steps per epoch
    for step in (0, 5, 30, 31, 40):
        per_world = []
        for world in (1, 2, 4):
            accum = G // (micro * world)
            rows = [i for r in range(world) for w in D.window_indices(n, world, r, seed, micro, accum, step) for i in w]
            assert len(rows) == G == len(set(rows))
            per_world.append(sorted(rows))
        epoch, k = divmod(step, n // G)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert per_world[0] == per_world[1] == per_world[2] == sorted(perm[k * G:(k + 1) * G]), step


def test_the_run_dir_path_is_not_part_of_the_runs_identity(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(4))
    old = tmp_path / "old"
    old.mkdir()
    inside = write_jsonl(old / "eval.jsonl", arith_rows(4))
    saved = validate(tiny_config(old, train, data={"eval": str(inside)}))
    new = tmp_path / "new"
    shutil.copytree(old, new)
    (new / "config.yaml").write_text(to_yaml(saved))  # the config saved there names the old run dir
    moved = tiny_config(new, train, data={"eval": str(new / "eval.jsonl")})  # its eval file moved along
    assert run_dir_problems(validate(moved)) == []
    relative = tiny_config(new, Path("..") / train.relative_to(tmp_path.parent), data={"eval": str(new / "eval.jsonl")})
    with pytest.MonkeyPatch.context() as mp:  # the same train file, spelled relative to the working dir
        mp.chdir(tmp_path)
        assert run_dir_problems(validate(relative)) == []
    other = write_jsonl(tmp_path / "other.jsonl", arith_rows(4))
    (problem,) = run_dir_problems(validate(tiny_config(new, other, data={"eval": str(new / "eval.jsonl")})))
    assert "holds a different run's config (differs in: data.train)" in problem
    (problem,) = run_dir_problems(validate(tiny_config(new, train, data={"eval": str(new / "eval.jsonl")}, seed=8)))
    assert "(differs in: seed)" in problem


def test_load_universal_is_a_table_key_the_trainer_alone_sets(tmp_path):
    from launcher.config import ConfigError
    from launcher.ds_config import LOAD_UNIVERSAL, build_ds_config

    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(4))
    cfg = validate(tiny_config(tmp_path / "run", train))
    assert "checkpoint" not in build_ds_config(cfg)
    assert build_ds_config(cfg, also=(LOAD_UNIVERSAL,))["checkpoint"] == {"load_universal": True}
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"checkpoint": {"load_universal": True}}))
    with pytest.raises(ConfigError) as e:
        build_ds_config(validate(tiny_config(tmp_path / "run", train, zero={"base_config": str(base)})))
    assert "'checkpoint.load_universal' = True" in e.value.problems[0]
    assert "resumes a checkpoint written by a different world size" in e.value.problems[0]


def test_a_checkpoint_from_before_the_world_record_counts_deepspeeds_shards(tmp_path):
    from trainer.checkpoint import written_world

    step = tmp_path / "step00000002"
    step.mkdir()
    (step / "COMPLETE").write_text("2")  # the old record: the step only
    assert written_world(step) is None  # ZeRO-0: no shards, fits any world
    for r in range(4):
        (step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert written_world(step) == 4
    (step / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 2}))
    assert written_world(step) == 2


def test_ranks_without_their_own_rng_file_are_seeded_from_seed_step_and_rank():
    import torch

    from trainer.checkpoint import seed_rng

    draws = {}
    for rank in (0, 1, 0):
        seed_rng(7, 2, rank)
        draws.setdefault(rank, []).append(torch.rand(3).tolist())
    assert draws[0][0] == draws[0][1] != draws[1][0]
