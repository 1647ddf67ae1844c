"""``python -m launcher``: validate, render, submit (sbatch) or run (deepspeed) a fine-tuning run.

    python -m launcher validate CONFIG [key=value ...]
    python -m launcher render   CONFIG [key=value ...] [--out RUN_DIR]
    python -m launcher submit   CONFIG [key=value ...] [--out RUN_DIR] [--dry-run]
    python -m launcher run      CONFIG [key=value ...] [--nnodes N --node-rank I --master-addr HOST]
    python -m launcher plan     CONFIG [key=value ...] --gpus-per-node G --gpu-mem-gb M [--nodes N]
                                [--cpu-mem-gb C] [--model-config CONFIG.json] [--apply OUT.yaml]
    python -m launcher render-presets [--check]     (ds_configs/*.json, slurm/finetune.sh)
    python -m launcher job-facts CONFIG [key=value ...]   (used by the batch script)
    python -m launcher status RUN_DIR|JOBID|SWEEP_DIR [--watch] [--json]
    python -m launcher logs   RUN_DIR [-f]
    python -m launcher cancel RUN_DIR [--checkpoint]
    python -m launcher sweep  CONFIG key=v1,v2 [key=value ...] [--max-parallel K] [--out SWEEP_DIR] [--dry-run]
    python -m launcher compare RUN_DIR... | SWEEP_DIR [--out DIR] [--metric eval/NAME ...]

Exit codes: 0 = OK, 2 = a problem with the config (every problem is listed), 1 = a command failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from launcher import rundir
from launcher.config import ConfigError, RunConfig
from launcher.errors import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("config", help="run config YAML")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
        return s

    with_config("validate", "check a config; print every problem, or a summary of the plan")
    r = with_config("render", "write RUN_DIR/{config.yaml,ds_config.json,finetune.sh}")
    r.add_argument("--out", help="run dir to write (sets run_dir)")
    s = with_config("submit", "validate, render and sbatch")
    s.add_argument("--out", help="run dir (sets run_dir)")
    s.add_argument("--dry-run", action="store_true", help="print the batch script and the sbatch command only")
    run = with_config("run", "run on this machine through the deepspeed launcher")
    run.add_argument("--out", help="run dir (sets run_dir)")
    run.add_argument("--nnodes", type=int, default=1, help="nodes in all, when starting each node by hand")
    run.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    run.add_argument("--master-addr", default=None, help="address of node 0 (needed when --nnodes > 1)")
    run.add_argument("--master-port", type=int, default=None, help="port on node 0 (default: a free one, "
                     "or 29500 with --nnodes > 1)")
    run.add_argument("--dry-run", action="store_true", help="print the command only")
    pl = with_config("plan", "predict the peak GPU and CPU memory; refuse a layout that does not fit and list "
                     "the layouts that do")
    pl.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (one rank each)")
    pl.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GiB, e.g. 80")
    pl.add_argument("--nodes", type=int, default=None, help="nodes (default: dist.nodes)")
    pl.add_argument("--cpu-mem-gb", type=float, default=None, help="CPU memory per node in GiB (default: slurm.mem_gb)")
    pl.add_argument("--model-config", default=None, help="the model's Hugging Face config.json (or its folder), when "
                    "model.name_or_path is not readable here")
    pl.add_argument("--apply", metavar="OUT.yaml", default=None, help="write CONFIG with the fastest layout that fits "
                    "to this new file (never overwrites)")
    pl.add_argument("--top", type=int, default=8, help="how many fitting layouts to list (default 8)")
    pr = sub.add_parser("render-presets", help="regenerate ds_configs/*.json and slurm/finetune.sh")
    pr.add_argument("--check", action="store_true", help="only report files that differ (exit 1)")
    with_config("job-facts", "print RUN_DIR, PROCS_PER_NODE, MAX_REQUEUES, MAX_RESTARTS as shell assignments")
    st = sub.add_parser("status", help="a run's job state, requeues, step, loss, tokens/s, ETA, eval, checkpoint")
    st.add_argument("target", help="run dir, sweep dir, or Slurm job id")
    st.add_argument("--watch", action="store_true", help="refresh until the job ends")
    st.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (--watch)")
    st.add_argument("--json", action="store_true", help="one JSON object (per refresh) for scripts")
    lg = sub.add_parser("logs", help="print the current job's output; -f follows it")
    lg.add_argument("run_dir")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    ca = sub.add_parser("cancel", help="scancel the run's job; --checkpoint checkpoints first, no requeue")
    ca.add_argument("run_dir")
    ca.add_argument("--checkpoint", action="store_true",
                    help="send the preemption signal, wait for the checkpoint, then end without requeueing")
    ca.add_argument("--timeout-s", type=float, default=900.0, help="how long to wait for the checkpoint")
    sw = with_config("sweep", "validate every point, then submit ONE sbatch --array job (a run dir per point)")
    sw.add_argument("--max-parallel", type=int, default=None, help="at most K tasks run at once (--array=...%%K)")
    sw.add_argument("--out", help="sweep dir (default: the config's run_dir)")
    sw.add_argument("--dry-run", action="store_true", help="print the points, the array script and sbatch only")
    co = sub.add_parser("compare", help="table of final/best eval metrics, one PNG of the loss curves, "
                        "one TensorBoard logdir")
    co.add_argument("targets", nargs="+", help="run dirs, or a sweep dir")
    co.add_argument("--out", help="where compare_loss.png and tb_compare/ go (default: the sweep dir or the "
                    "runs' common parent)")
    co.add_argument("--metric", action="append", default=[], help="another eval metric column (repeatable)")
    return p


def _load(args, allow_done: bool = False) -> RunConfig:
    from launcher.load import load_config

    return load_config(args.config, args.overrides, run_dir=getattr(args, "out", None), allow_done=allow_done)


def _plan(args, cfg: RunConfig):
    from launcher.plan import make_plan

    return make_plan(cfg, args.config, args.overrides, Path.cwd(), sys.executable, str(REPO))


def _script_problems(plan) -> list[str]:
    from launcher import execute
    from launcher.rules_slurm import env_setup_shell_problems

    env = env_setup_shell_problems(plan.cfg.slurm.env_setup, lambda text: not execute.bash_syntax_problems(text))
    return env or execute.bash_syntax_problems(plan.files[plan.script])


def cmd_validate(args) -> int:
    from launcher.memory import count_params
    from launcher.plan import summary

    cfg = _load(args, allow_done=True)
    problems = _script_problems(_plan(args, cfg))
    if problems:
        raise ConfigError(problems, args.config)
    n, source, hf = count_params(cfg.model.name_or_path, cfg.model.config)
    memory: list[str] = []
    if cfg.slurm.gpu_mem_gb is not None:  # the memory planner, on the GPUs the job asks for
        from launcher import planner

        s = cfg.slurm
        hw = planner.Hardware(cfg.dist.nodes, cfg.dist.procs_per_node, s.gpu_mem_gb, s.mem_gb,
                              gpu_key="slurm.gpu_mem_gb", cpu_key="slurm.mem_gb")
        memory, problems, _ = planner.report(cfg, planner.ModelInfo(n, source, hf), hw)
        if problems:
            print("\n".join(memory))
            raise ConfigError(problems, args.config)
    print(f"OK: {args.config}")
    for line in summary(cfg, n, source, hf) + memory:
        print(f"  {line}")
    return 0


def _model_info(cfg: RunConfig, model_config: Optional[str]):
    """The parameter count and the HF config: from --model-config, or the model section."""
    import json

    from launcher.memory import count_params, params_from_hf_config
    from launcher.planner import ModelInfo

    if model_config is None:
        return ModelInfo(*count_params(cfg.model.name_or_path, cfg.model.config))
    path = Path(model_config)
    path = path / "config.json" if path.is_dir() else path
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"--model-config {model_config!r} is not a readable Hugging Face config.json ({e}); "
                           "point it at the model's config.json"], "the command line") from None
    if not isinstance(hf, dict):
        raise ConfigError([f"--model-config {model_config!r} holds no JSON object"], "the command line")
    n = params_from_hf_config(hf)
    return ModelInfo(n, f"{path}, Llama-style formula" if n else f"{path}: architecture not counted", hf)


def cmd_plan(args) -> int:
    import yaml

    from launcher import execute, planner
    from launcher.load import load_config
    from launcher.rules import apply_overrides, parse_overrides, read_yaml, validate

    out = Path(args.apply) if args.apply else None
    if out is not None and out.exists():
        raise ConfigError([f"--apply {args.apply!r} already exists; plan never overwrites a file: give a new name"],
                          "the command line")
    cfg = load_config(args.config, args.overrides, disk=False)  # the model and data may live on the cluster only
    hw = planner.Hardware(args.nodes if args.nodes is not None else cfg.dist.nodes, args.gpus_per_node,
                          args.gpu_mem_gb, args.cpu_mem_gb if args.cpu_mem_gb is not None else cfg.slurm.mem_gb,
                          cpu_key="--cpu-mem-gb" if args.cpu_mem_gb is not None else "slurm.mem_gb")
    if hw.problems():
        raise ConfigError(hw.problems(), "the command line")
    lines, problems, options = planner.report(cfg, _model_info(cfg, args.model_config), hw, args.top,
                                              alternatives=out is not None)
    print("\n".join([f"plan: {args.config}", *lines]))
    if out is None or not options:
        if problems:
            raise ConfigError(problems, args.config)
        return 0
    best = options[0]
    data = apply_overrides(read_yaml(args.config), {**parse_overrides(args.overrides)[0], **best.overrides})
    validate(data, source=str(out))  # what we write must load as it planned
    flags = [(f"--{k.replace('_', '-')}", v) for k, v in vars(args).items()
             if k in ("gpus_per_node", "gpu_mem_gb", "nodes", "cpu_mem_gb", "model_config", "apply") and v is not None]
    regenerate = _shell_line(["python", "-m", "launcher", "plan", args.config, *args.overrides,
                              *(f"{x:g}" if isinstance(x, float) else str(x) for kv in flags for x in kv)])
    text = (f"# Generated by: {regenerate}\n# {args.config} with the fastest layout that fits: {best.text}\n"
            + yaml.safe_dump(data, sort_keys=False))
    if not execute.write_new_file(out, text):
        raise ConfigError([f"--apply {args.apply!r} already exists; plan never overwrites a file"], "the command line")
    print(f"wrote {out}: {args.config} with {best.text} (GPU peak {planner.human(best.plan.gpu_peak)})")
    return 0


def cmd_render(args) -> int:
    from launcher import execute

    cfg = _load(args, allow_done=True)
    plan = _plan(args, cfg)
    problems = _script_problems(plan)
    if problems:
        raise ConfigError(problems, args.config)
    execute.write_files(plan.files, executable=(plan.script,))
    for path in plan.files:
        print(f"wrote {path}")
    return 0


def _shell_line(argv: list[str]) -> str:
    from launcher.slurm import q

    return " ".join(q(a) for a in argv)


def cmd_submit(args) -> int:
    from launcher import execute

    cfg = _load(args)
    plan = _plan(args, cfg)
    problems = _script_problems(plan)
    if problems:
        raise ConfigError(problems, args.config)
    if args.dry_run:
        print(f"# --dry-run: nothing written, nothing submitted. Would write: "
              f"{', '.join(str(p) for p in plan.files)}\n# {plan.script}:")
        print(plan.files[plan.script])
        print(f"# sbatch command (run from {Path.cwd()}):\n{_shell_line(plan.sbatch)}")
        return 0
    execute.write_files(plan.files, executable=(plan.script,))
    job = execute.submit(plan.sbatch, Path.cwd())
    d = cfg.dist
    layout = rundir.RunDir(plan.run_dir)
    execute.append_line(layout.jobs, json.dumps({"job": job, "event": "submitted", "time": int(time.time())}))
    out, err = layout.slurm_logs(job)
    print(f"submitted job {job}: {d.nodes} node(s) x {d.procs_per_node} rank(s); run dir {plan.run_dir}\n"
          f"  stdout:      {out}\n"
          f"  stderr:      {err}\n"
          f"  status:      python -m launcher status {_shell_line([str(plan.run_dir)])}   (--watch; "
          f"logs: python -m launcher logs ... -f)\n"
          f"  TensorBoard: tensorboard --logdir {_shell_line([str(layout.tensorboard)])}\n"
          f"  checkpoint + requeue now: scancel --signal={cfg.slurm.signal} --batch {job}")
    return 0


def cmd_run(args) -> int:
    from launcher import execute
    from launcher.plan import deepspeed_argv, render_hostfile

    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError([f"--node-rank {args.node_rank} must be in 0..{args.nnodes - 1} (--nnodes {args.nnodes})"],
                          "the command line")
    if args.nnodes > 1 and not args.master_addr:
        raise ConfigError(["--nnodes > 1 needs --master-addr (the address of node 0, reachable from every node)"],
                          "the command line")
    cfg = _load(args)
    plan = _plan(args, cfg)
    problems = _script_problems(plan)
    if problems:
        raise ConfigError(problems, args.config)
    port = args.master_port or (execute.free_port() if args.nnodes == 1 else 29500)
    deepspeed = Path(sys.executable).with_name("deepspeed")
    argv = deepspeed_argv(plan, str(deepspeed) if deepspeed.exists() else "deepspeed", port, args.nnodes,
                          args.node_rank, args.master_addr)
    if args.dry_run:
        print(_shell_line(argv))
        return 0
    files = dict(plan.files)
    if args.nnodes > 1:
        files[plan.hostfile] = render_hostfile(args.nnodes, cfg.dist.procs_per_node, _shell_line(
            ["python", "-m", "launcher", "run", args.config, *args.overrides,
             *(["--out", args.out] if args.out else []), "--nnodes", str(args.nnodes),
             "--node-rank", str(args.node_rank), "--master-addr", args.master_addr]))
    execute.write_files(files, executable=(plan.script,))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    print(f"running: {_shell_line(argv)}", flush=True)
    execute.exec_command(argv, env)
    return 1  # not reached


def cmd_render_presets(args) -> int:
    from launcher import execute
    from launcher.plan import render_presets

    files = {REPO / rel: text for rel, text in render_presets().items()}
    stale = [p for p, text in files.items() if execute.read_text(p) != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(REPO)}")
        return 1 if stale else 0
    execute.write_files(files, executable=(REPO / "slurm" / rundir.SCRIPT,))
    for p in files:
        print(f"{'wrote' if p in stale else 'unchanged'} {p.relative_to(REPO)}")
    return 0


def cmd_job_facts(args) -> int:
    from launcher.slurm import shell_assignments

    cfg = _load(args, allow_done=True)
    sys.stdout.write(shell_assignments({"RUN_DIR": cfg.run_dir, "PROCS_PER_NODE": cfg.dist.procs_per_node,
                                        "MAX_REQUEUES": cfg.slurm.max_requeues,
                                        "MAX_RESTARTS": cfg.dist.max_restarts}))
    return 0


def cmd_status(args) -> int:
    from launcher import jobs

    try:
        return jobs.show_status(args.target, args.watch, args.json, args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_logs(args) -> int:
    from launcher import jobs

    try:
        return jobs.follow_logs(Path(args.run_dir), args.follow)
    except KeyboardInterrupt:
        return 0


def cmd_cancel(args) -> int:
    from launcher import jobs

    return jobs.cancel(Path(args.run_dir), args.checkpoint, args.timeout_s)


def cmd_sweep(args) -> int:
    from launcher import execute, sweep

    plan = sweep.make_sweep(args.config, args.overrides, args.out, args.max_parallel, Path.cwd(), sys.executable,
                            str(REPO))
    problems = execute.bash_syntax_problems(plan.files[plan.script])
    if problems:
        raise ConfigError(problems, args.config)
    points = "\n".join(f"  task {p['task']}: {p['name']}  ({', '.join(f'{k}={v}' for k, v in p['overrides'].items())})"
                       for p in plan.points)
    if args.dry_run:
        print(f"# --dry-run: nothing written, nothing submitted. {len(plan.points)} point(s), all valid:\n{points}\n"
              f"# {plan.script}:\n{plan.files[plan.script]}\n# sbatch command (run from {Path.cwd()}):\n"
              f"{_shell_line(plan.sbatch)}")
        return 0
    execute.write_files(plan.files, executable=tuple(p for p in plan.files if p.name == rundir.SCRIPT))
    execute.link_all(plan.links, plan.sweep_dir / rundir.SWEEP_TASKS)
    job = execute.submit(plan.sbatch, Path.cwd())
    execute.write_files({plan.sweep_dir / rundir.SWEEP_INDEX: sweep.index_with_job(plan.index, job)})
    for p in plan.points:
        execute.append_line(rundir.RunDir(p["run_dir"]).jobs, json.dumps(
            {"job": f"{job}_{p['task']}", "event": "submitted", "time": int(time.time()), "sweep": job}))
    limit = f", at most {args.max_parallel} at a time" if args.max_parallel else ""
    where = _shell_line([str(plan.sweep_dir)])
    print(f"submitted job array {job}: {len(plan.points)} task(s){limit}; sweep dir {plan.sweep_dir}\n{points}\n"
          f"  index:   {plan.sweep_dir / rundir.SWEEP_INDEX}\n"
          f"  status:  python -m launcher status {where}\n"
          f"  compare: python -m launcher compare {where}\n"
          f"  preempt one task: scancel --signal=USR2 --batch {job}_TASK")
    return 0


def cmd_compare(args) -> int:
    from launcher import execute, sweep

    runs = sweep.expand(args.targets)
    summaries = [sweep.summarise(d) for _, d, _ in runs]
    print(sweep.compare_table(runs, summaries, args.metric))
    out = Path(args.out) if args.out else sweep.default_out(args.targets)
    png = out / rundir.COMPARE_PNG
    execute.write_bytes(png, sweep.loss_png(runs, summaries))
    links = sweep.tensorboard_links(runs, out)
    execute.link_all(links, out / rundir.COMPARE_TB)
    print(f"loss curves: {png}\nTensorBoard: tensorboard --logdir {_shell_line([str(out / rundir.COMPARE_TB)])}"
          f"   ({len(links)} run(s) linked)")
    return 0


COMMANDS = {"validate": cmd_validate, "plan": cmd_plan, "render": cmd_render, "submit": cmd_submit, "run": cmd_run,
            "render-presets": cmd_render_presets, "job-facts": cmd_job_facts, "status": cmd_status,
            "logs": cmd_logs, "cancel": cmd_cancel, "sweep": cmd_sweep, "compare": cmd_compare}


def main(argv: Optional[list[str]] = None) -> int:
    from launcher.execute import LaunchError

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # writing the run dir failed after the checks (a full disk, a race)
        print(f"error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
