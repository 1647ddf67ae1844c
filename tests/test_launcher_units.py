"""The launcher without a cluster: quoting, the rendered batch script, golden files, validation
messages, the memory estimate, and the CLI (validate / render / submit --dry-run / run --dry-run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TINY_LLAMA, arith_rows, tiny_config, write_jsonl
from launcher.config import ConfigError
from launcher.load import load_config
from launcher.rules import read_yaml, validate
from launcher.memory import count_params, estimate, lora_params, params_from_hf_config
from launcher.plan import GENERATED_KEY, PRESETS, PRESETS_COMMAND, make_plan, model_state, render_presets
from launcher.slurm import ScriptSpec, directive_safe, q, render_script, sbatch_options

HOSTILE = ["sp ace", "q'uote", 'd"quote', "$HOME", "$(touch CANARY)", "`touch CANARY`", "semi; touch CANARY",
           "new\nline", "back\\slash", "tab\tx", "#hash", "%j pct", "-dash", "ünï", "*glob?", "trailing\n"]
EVIL = "e v'i\"l $(touch CANARY) `touch CANARY`; touch CANARY;\n$HOME #x"
# Paths refuse control characters (newline, tab, ...; tests/test_hardening.py); names and values keep them.
EVIL_PATH = EVIL.replace("\n", " ")


def path_text(s: str) -> str:
    return "".join(c if c.isprintable() else " " for c in s)


def cli(*args, cwd=None, check=None):
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp"}
    p = subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd or ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    if check is not None:
        assert p.returncode == check, p.stdout + p.stderr
    return p


def good_config(tmp: Path, name: str = "run", **sections) -> tuple[Path, dict]:
    train = write_jsonl(tmp / "data" / "train.jsonl", arith_rows(16))
    cfg = tiny_config(tmp / name, train, **sections)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


# --------------------------------------------------------------------------- quoting


def test_launcher_imports_without_torch():
    code = ("import sys, launcher.__main__, launcher.plan, launcher.slurm, launcher.memory, launcher.rules, "
            "launcher.execute; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_quoting_helper_round_trips_every_hostile_string(tmp_path):
    for s in HOSTILE + [EVIL]:
        out = subprocess.run(["bash", "-c", f"printf '%s' {q(s)}"], cwd=tmp_path, capture_output=True, text=True)
        assert out.stdout == s, (s, out.stdout)
    assert not list(tmp_path.iterdir()), "a quoted string executed something"


def test_directive_values_are_plain_or_go_to_the_sbatch_command_line(tmp_path):
    assert directive_safe("finetune-8b_v2.1") and directive_safe("/scratch/runs/x/slurm-%j.out")
    for s in HOSTILE:
        assert not directive_safe(s) or s == "-dash"
    cfg = validate(tiny_config(tmp_path / "r", tmp_path / "t.jsonl", slurm={"job_name": EVIL, "partition": "gpu"}))
    plan = make_plan(cfg, "c.yaml", [], tmp_path, "/usr/bin/python3", "/repo")
    script = plan.files[plan.script]
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --nodes=1" in script
    assert "#SBATCH --job-name" not in script and "# --job-name: not representable" in script
    assert f"--job-name={EVIL}" in plan.sbatch  # one argv element, byte for byte
    assert "--partition=gpu" not in plan.sbatch  # already an #SBATCH line


def _script_prefix_value(script: str, var: str, cwd: Path, args: tuple = ()) -> str:
    """Run the rendered script up to its argument handling and print ``var`` (nothing else runs)."""
    head = script.split('OVERRIDES=("$@")')[0]
    p = subprocess.run(["bash", "-c", head + f'\nprintf "%s" "${var}"', "finetune.sh", *args], cwd=cwd,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_hostile_names_and_paths_render_a_script_that_passes_bash_n(tmp_path):
    for i, s in enumerate(HOSTILE + [EVIL]):
        run_dir = f"{tmp_path}/runs/{path_text(s)}"
        cfg = validate(tiny_config(run_dir, f"{tmp_path}/{path_text(s)}/train.jsonl", slurm={
            "job_name": s, "env_setup": ["export NCCL_DEBUG=WARN", "# module load cuda"]}))
        plan = make_plan(cfg, f"{tmp_path}/{s}.yaml", [f"train.lr={s}"], tmp_path, f"/opt/{s}/python", f"/r/{s}")
        script = plan.files[plan.script]
        p = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert p.returncode == 0, (s, p.stderr)
        # the default CONFIG is exactly the rendered config.yaml, and $1 overrides it
        assert _script_prefix_value(script, "CONFIG", tmp_path) == str(plan.config)
        assert _script_prefix_value(script, "CONFIG", tmp_path, (s,)) == s
        assert plan.sbatch[-2:] == [str(plan.script), str(plan.config)]
        assert str(Path(run_dir, "slurm-%j.out")).replace("%j pct", "%%j pct") in "".join(plan.sbatch + [script])
        for line in script.splitlines():
            assert not line.startswith("#SBATCH") or all(directive_safe(v) for v in line.split("=", 1)[1:]), line
    assert not list(tmp_path.glob("**/CANARY"))


def test_job_facts_prints_assignments_that_eval_to_the_exact_values(tmp_path):
    base = tmp_path / EVIL_PATH
    train = write_jsonl(base / "train.jsonl", arith_rows(8))
    cfg = tiny_config(base / "run", train, dist={"procs_per_node": 3}, slurm={"max_requeues": 5})
    cfg_path = base / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    facts = cli("job-facts", cfg_path, cwd=tmp_path, check=0).stdout
    out = subprocess.run(["bash", "-c", 'eval "$1"; printf "%s|%s|%s" "$RUN_DIR" "$PROCS_PER_NODE" "$MAX_REQUEUES"',
                          "x", facts], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out == f"{base / 'run'}|3|5"
    assert not list(tmp_path.glob("**/CANARY"))


# --------------------------------------------------------------------------- golden files


def test_checked_in_presets_and_batch_script_equal_the_renderer():
    stale = [rel for rel, text in render_presets().items()
             if not (ROOT / rel).is_file() or (ROOT / rel).read_text() != text]
    assert not stale, (f"{', '.join(stale)} differ from what the renderer produces; regenerate them with "
                       f"`{PRESETS_COMMAND}` and commit the result")
    assert sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json")) == sorted(PRESETS)
    assert cli("render-presets", "--check", check=0).stdout == ""


def test_every_generated_file_names_its_regenerating_command(tmp_path):
    for rel, text in render_presets().items():
        if rel.endswith(".json"):
            assert next(iter(json.loads(text))) == GENERATED_KEY and json.loads(text)[GENERATED_KEY] == PRESETS_COMMAND
        else:
            assert text.splitlines()[1] == f"# Generated by: {PRESETS_COMMAND}"
    assert PRESETS_COMMAND in (ROOT / "ds_configs" / "README.md").read_text()
    path, _ = good_config(tmp_path)
    cli("render", path, "train.lr=0.01", "--out", tmp_path / "out dir", cwd=tmp_path, check=0)
    out = tmp_path / "out dir"
    command = f"python -m launcher render {path} train.lr=0.01 --out '{out}'"
    assert (out / "config.yaml").read_text().splitlines()[0] == f"# Generated by: {command}"
    assert json.loads((out / "ds_config.json").read_text())[GENERATED_KEY] == command
    assert (out / "finetune.sh").read_text().splitlines()[1] == f"# Generated by: {command}"
    saved = read_yaml(out / "config.yaml")
    assert saved["run_dir"] == str(out) and saved["train"]["lr"] == 0.01


def test_checked_in_script_reads_the_world_from_slurm_not_the_config():
    script = (ROOT / "slurm" / "finetune.sh").read_text()
    assert "DEFAULT_CONFIG=''" in script  # CONFIG is $1
    for needle in ('NNODES=$SLURM_JOB_NUM_NODES', '--node-rank="$SLURM_NODEID"', "SLURM_GPUS_ON_NODE",
                   "scontrol show hostnames \"$SLURM_JOB_NODELIST\"", "PORT=$((20000 + SLURM_JOB_ID % 20000))",
                   "--kill-on-bad-exit=1", '--ntasks="$NNODES" --ntasks-per-node=1', "#SBATCH --signal=B:USR2@120",
                   'scontrol requeue "$SLURM_JOB_ID"', '"$RUN_DIR/DONE"'):
        assert needle in script, needle
    from trainer.dist import slurm_port  # the trainer's rule for the same port

    assert slurm_port("123456") == 20000 + 123456 % 20000


def test_presets_are_accepted_by_plain_deepspeed(tmp_path):
    """Each preset parses as a DeepSpeed config; the non-offload ones initialise an engine."""
    code = """
import json, os, sys, torch, deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
for path in sys.argv[1:]:
    ds = json.load(open(path))
    c = DeepSpeedConfig(ds)
    assert c.train_batch_size == 1 and c.zero_optimization_stage == ds["zero_optimization"]["stage"], path
    if "offload" not in path:
        m = torch.nn.Linear(8, 8)
        engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters()), config=ds)
        loss = engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss); engine.step()
    print("ok", os.path.basename(path))
"""
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29617",
               DS_ACCELERATOR="cpu", HOME=str(Path.home()),
               # the venv's ninja, as tests/run.sh has it: a different ninja rebuilds DeepSpeed's JIT ops
               PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    paths = sorted(str(p) for p in (ROOT / "ds_configs").glob("*.json"))
    p = subprocess.run([sys.executable, "-c", code, *paths], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ok ") == len(PRESETS)


# --------------------------------------------------------------------------- validation


def test_slurm_rules_name_key_value_and_fix(tmp_path):
    cfg = tiny_config(tmp_path / "r", tmp_path / "t.jsonl", dist={"nodes": 2, "procs_per_node": 4},
                      slurm={"time_min": 2, "signal_lead_s": 120, "gpus_per_node": 8, "job_name": " ",
                             "partition": ""})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msgs = e.value.problems
    assert len(msgs) == 4, msgs
    assert any("'slurm.signal_lead_s' = 120 is not shorter than the time limit 'slurm.time_min' = 2 min (120 s)"
               in m and "raise slurm.time_min" in m for m in msgs)
    assert any("'slurm.gpus_per_node' = 8 but 'dist.procs_per_node' = 4" in m and "2 x 8 = 16" in m
               and "not the 8 the batch math plans" in m and "dist.procs_per_node=8" in m for m in msgs)
    assert any("'slurm.job_name' is empty" in m for m in msgs)
    assert any("'slurm.partition' = '' is empty" in m for m in msgs)
    validate(tiny_config(tmp_path / "r", tmp_path / "t.jsonl", slurm={"gpus_per_node": 0}))  # CPU nodes: fine


def test_config_and_disk_problems_are_reported_together(tmp_path):
    path, cfg = good_config(tmp_path)
    cfg["model"]["tokenizer"] = str(tmp_path / "no-tokenizer")
    cfg["data"]["train"] = str(tmp_path / "missing.jsonl")
    cfg["data"]["eval"] = str(tmp_path / "missing-eval.jsonl")
    cfg["train"]["global_batch_size"] = 12  # micro 4 x world 2 = 8 does not divide it
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        load_config(str(path), ["slurm.time_min=1", "slurm.signal_lead_s=90"])
    msgs = e.value.problems
    assert len(msgs) == 5, msgs
    assert any(f"'model.tokenizer' = '{tmp_path / 'no-tokenizer'}' does not exist" in m for m in msgs)
    assert any(f"'data.train' = '{tmp_path / 'missing.jsonl'}' does not exist" in m and "fix the path" in m
               for m in msgs)
    assert any("'data.eval'" in m for m in msgs)
    assert any("'slurm.signal_lead_s' = 90" in m for m in msgs)
    assert any("'train.global_batch_size' = 12 is not divisible" in m for m in msgs)
    # schema errors (unknown keys, bad values) and missing paths come together too
    with pytest.raises(ConfigError) as e:
        load_config(str(path), ["train.lrr=1", "zero.stage=5"])
    msgs = e.value.problems
    assert len(msgs) == 5, msgs
    assert any("unknown key 'train.lrr'" in m for m in msgs) and any("'zero.stage' = 5" in m for m in msgs)
    assert any("'data.train'" in m for m in msgs)


def test_a_run_dir_holding_another_run_or_a_finished_run_is_refused(tmp_path):
    path, _ = good_config(tmp_path)
    cli("render", path, cwd=tmp_path, check=0)
    load_config(str(path), [])  # the same run again: fine (it resumes)
    saved = read_yaml(tmp_path / "run" / "config.yaml")
    del saved["slurm"]  # as written by an older version without that section: defaults do not count
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    load_config(str(path), [])
    load_config(str(path), ["slurm.time_min=600", "slurm.partition=long"])  # resubmitting differently: same run
    with pytest.raises(ConfigError) as e:
        load_config(str(path), ["train.lr=0.5", "seed=1"])
    (msg,) = e.value.problems
    assert "holds a different run's config (differs in: seed, train.lr)" in msg and "choose a new run_dir" in msg
    (tmp_path / "run" / "DONE").write_text("{}")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), [])
    assert "holds a finished run" in e.value.problems[0]
    p = cli("submit", path, "--dry-run", cwd=tmp_path, check=2)
    assert "holds a finished run" in p.stderr


def test_fp16_and_bf16_both_on_through_a_base_json_is_refused(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"fp16": {"enabled": True}}))
    path, _ = good_config(tmp_path, precision={"dtype": "bf16"}, zero={"stage": 2, "base_config": str(base)})
    p = cli("validate", path, cwd=tmp_path, check=2)
    assert "'fp16.enabled' = True" in p.stderr and "set precision.dtype" in p.stderr


# --------------------------------------------------------------------------- memory


def test_memory_follows_deepspeeds_allocations():
    psi, n = 8_030_261_248, 16
    # the ZeRO paper's 2 + 2 + 12 bytes per param, plus the fp32 gradient partition DeepSpeed builds for the step
    expected = {0: 20 * psi, 1: 4 * psi + 16 * psi / n, 2: 2 * psi + 18 * psi / n, 3: 20 * psi / n}
    for stage, total in expected.items():
        assert estimate(psi, psi, n, stage, "bf16").gpu_total == pytest.approx(total)
    # fp32 at stage 0 runs the bare optimizer: 4-byte params and grads, 8 bytes of moments, no master copy
    assert estimate(psi, psi, n, 0, "fp32").gpu_total == pytest.approx(16 * psi)
    # an 8-bit optimizer keeps 2 bytes of moments + the fp32 master: 6 bytes
    assert estimate(psi, psi, n, 0, "bf16", "adamw8bit").gpu_optim == pytest.approx(6 * psi)
    # offload moves optimizer states, fp32 and (ZeRO-3) 16-bit gradients, and with offload_param the params, to CPU
    off = estimate(psi, psi, n, 3, "bf16", offload_optimizer=True, offload_param=True)
    assert off.gpu_total == 0 and off.cpu_per_rank == pytest.approx(20 * psi / n)
    # frozen base (LoRA): grads and optimizer states only for the adapter
    lora = estimate(psi + 10, 10, 1, 0, "bf16")
    assert lora.gpu_total == pytest.approx(2 * (psi + 10) + 2 * 10 + 12 * 10 + 4 * 10)
    qlora = estimate(psi + 10, 10, 1, 0, "bf16", frozen_bits=4)
    assert qlora.gpu_params == pytest.approx(0.5 * psi + 2 * 10)


def test_parameter_counts_match_the_real_model(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    for extra in ({}, {"num_key_value_heads": 2, "tie_word_embeddings": True}, {"attention_bias": True}):
        c = {**TINY_LLAMA, **extra}
        kwargs = {k: v for k, v in c.items() if k != "model_type"}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kwargs))
        real = sum(p.numel() for p in model.parameters())
        assert params_from_hf_config(c) == real, extra
        folder = tmp_path / f"m{len(extra)}"
        model.save_pretrained(str(folder))
        n, source, _ = count_params(str(folder), None)
        assert n == real and "safetensors" in source
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    adapter = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(c, 4, ["q_proj", "v_proj", "down_proj"]) == adapter


def test_llama3_8b_example_estimate(tmp_path):
    cfg = validate(read_yaml(ROOT / "examples" / "cluster-8b-full.yaml"))
    llama3_8b = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    psi = params_from_hf_config(llama3_8b)
    assert psi == 8_030_261_248  # the published size of Llama-3-8B
    est, note = model_state(cfg, psi, llama3_8b)
    n = cfg.world_size
    assert cfg.zero.stage == 3 and cfg.precision.dtype == "bf16" and n == 16 and note == ""
    assert est.gpu_total == pytest.approx(20 * psi / n)  # 2 + 2 + 12 + 4 (fp32 grads at the step) bytes
    big = validate(read_yaml(ROOT / "examples" / "cluster-8b-large.yaml"))
    assert big.world_size == 64 and big.slurm.max_requeues >= 1


# --------------------------------------------------------------------------- CLI


def test_validate_prints_the_plan_summary(tmp_path):
    path, _ = good_config(tmp_path, train={"micro_batch_size": 4, "grad_accum": 3, "max_steps": 5},
                          dist={"nodes": 2, "procs_per_node": 2})
    out = cli("validate", path, "zero.stage=3", cwd=tmp_path, check=0).stdout
    assert f"OK: {path}" in out
    assert "world: 2 node(s) x 2 GPUs per node = world size 4" in out
    assert "micro 4 x accumulation 3 x world 4 = global batch 48 sequences" in out
    assert "up to 2,304 tokens per step (max_length 48)" in out
    psi = params_from_hf_config(TINY_LLAMA)
    per_rank = (4 * psi + 4 * psi + 12 * psi + 4 * psi) / 4  # fp32 ZeRO-3: params, grads, master + Adam, fp32 grads
    assert f"{per_rank / 1024:.2f} KiB per rank/GPU" in out and f"for {psi:,} params" in out


def test_validate_lists_every_problem_and_exits_2(tmp_path):
    path, _ = good_config(tmp_path)
    p = cli("validate", path, "zero.stagee=1", "precision.dtype=fp8", "data.train=nope.jsonl", cwd=tmp_path,
            check=2)
    assert p.stderr.startswith(f"error: 3 problem(s) in {path}:")
    assert "unknown key 'zero.stagee'" in p.stderr and "did you mean 'zero.stage'" in p.stderr
    assert "'precision.dtype' = 'fp8' is not allowed" in p.stderr
    assert "'data.train' = 'nope.jsonl' does not exist" in p.stderr


def test_submit_dry_run_prints_script_and_command_and_writes_nothing(tmp_path):
    path, _ = good_config(tmp_path, slurm={"job_name": "x y"})
    out = cli("submit", path, "--dry-run", cwd=tmp_path, check=0).stdout
    assert "#!/bin/bash" in out and "# --job-name: not representable" in out
    command = out.strip().splitlines()[-1]
    assert command == (f"sbatch --parsable '--job-name=x y' {tmp_path / 'run' / 'finetune.sh'} "
                       f"{tmp_path / 'run' / 'config.yaml'}")
    assert not (tmp_path / "run").exists()


def test_run_dry_run_uses_the_deepspeed_launcher(tmp_path):
    path, _ = good_config(tmp_path, dist={"nodes": 2, "procs_per_node": 3})
    out = cli("run", path, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--dry-run",
              cwd=tmp_path, check=0).stdout.strip()
    assert out.endswith(f"--num_gpus 3 --master_port 29500 --hostfile {tmp_path / 'run' / 'hostfile'} --no_ssh "
                        f"--node_rank 1 --master_addr 10.0.0.1 --module trainer.main --config "
                        f"{tmp_path / 'run' / 'config.yaml'}")
    p = cli("run", path, "--nnodes", "2", "--node-rank", "2", cwd=tmp_path, check=2)
    assert "--node-rank 2 must be in 0..1" in p.stderr
    assert not (tmp_path / "run").exists()


def test_script_render_keeps_env_setup_lines_and_checks_their_syntax(tmp_path):
    spec = ScriptSpec(options=sbatch_options(validate(tiny_config(tmp_path, tmp_path)), None), regenerate="x",
                      python="python3", repo=None, env_setup=["module load cuda/12.4", "source /opt/venv/bin/activate"])
    script = render_script(spec)
    assert "module load cuda/12.4\nsource /opt/venv/bin/activate\n" in script
    path, _ = good_config(tmp_path, slurm={"env_setup": ["if then"]})
    p = cli("validate", path, cwd=tmp_path, check=2)
    assert "'slurm.env_setup[0]' = 'if then' is not a complete shell command" in p.stderr


def test_slurm_tests_skip_without_root_and_fail_when_slurm_is_required(tmp_path):
    """The conftest's rule, run in an inner pytest that believes it is not root."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_needs_slurm.py").write_text("def test_needs(slurm_cluster):\n    pass\n")
    code = ("import os, sys, pytest; os.geteuid = lambda: 1000; "
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', sys.argv[1]]))")
    env = {k: v for k, v in os.environ.items() if k != "FT_REQUIRE_SLURM"}
    skipped = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "no local Slurm cluster: starting slurmctld/slurmd needs root" in skipped.stdout
    failed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path,
                            env={**env, "FT_REQUIRE_SLURM": "1"}, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout
    assert "Slurm is required (FT_REQUIRE_SLURM=1 / --require-slurm) but unavailable" in failed.stdout
