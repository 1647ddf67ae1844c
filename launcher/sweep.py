"""Sweeps as ONE Slurm job array, and comparing finished (or running) runs.

    python -m launcher sweep CONFIG train.lr=1e-5,3e-5 method.lora.r=8,16 [key=value ...]
                             [--max-parallel K] [--out SWEEP_DIR] [--dry-run]
    python -m launcher compare RUN_DIR... | SWEEP_DIR [--out DIR] [--metric eval/NAME ...]

A ``key=v1,v2`` argument is an axis (commas inside [...], {...} or quotes do not split: a list value
stays one value); a ``key=value`` argument without a top-level comma is fixed for every point. The
points are the cross product of the axes. Each point is validated exactly like ``submit`` (the one
loader, disk checks included) before anything is written: one bad point submits nothing. The sweep
dir (``--out``, or the config's run_dir) gets one run dir per point, named from its values
(``lr-1e-05_r-16``), ``sweep.json`` (the index), ``finetune.sh`` (the array's batch script: task i
runs point i's config) and ``tasks/<i>`` links to the run dirs, where Slurm writes each task's output.
Requeue and preemption work per task: a task requeues itself (its own SLURM_JOB_ID) and resumes its
own run dir.

Pure planning here; launcher/execute.py writes and submits.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher import rundir
from launcher.errors import ConfigError

_SAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass(frozen=True)
class Axis:
    key: str
    values: list[str]  # raw override text, parsed like any command-line override


def split_values(raw: str) -> list[str]:
    """Split at commas that are not inside brackets, braces or quotes."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def parse_sweep_args(items: list[str]) -> tuple[list[str], list[Axis], list[str]]:
    """-> (fixed overrides, axes, problems)."""
    fixed, axes, problems = [], [], []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{item!r} is not key=value or key=v1,v2,...; e.g. train.lr=1e-5,3e-5")
            continue
        values = split_values(raw)
        if len(values) == 1:
            fixed.append(f"{key}={raw}")
            continue
        if key == "run_dir":
            problems.append("run_dir cannot be swept: every point gets its own run dir inside the sweep dir")
        elif any(a.key == key for a in axes):
            problems.append(f"{key!r} is swept twice; give its values once: {key}=v1,v2,...")
        elif "" in (v.strip() for v in values):
            problems.append(f"{item!r} has an empty value; remove the extra comma")
        elif len(set(values)) != len(values):
            problems.append(f"{item!r} lists a value twice; each point must differ")
        else:
            axes.append(Axis(key, values))
    if not axes and not problems:
        problems.append("nothing to sweep: give at least one key with several values, e.g. train.lr=1e-5,3e-5")
    return fixed, axes, problems


def point_names(axes: list[Axis], combos: list[tuple[str, ...]]) -> list[str]:
    """A run-dir name per point from its values: the key's last part unless two axes share it."""
    last = [a.key.rsplit(".", 1)[-1] for a in axes]
    short = [lk if last.count(lk) == 1 else a.key for lk, a in zip(last, axes)]
    names = ["_".join(f"{k}-{_SAFE.sub('_', v).strip('_')[:40] or 'x'}" for k, v in zip(short, combo))
             for combo in combos]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}-{seen[n]}")
    return out


@dataclass(frozen=True)
class SweepPlan:
    sweep_dir: Path  # absolute
    points: list[dict]  # {"task", "name", "run_dir" (absolute), "overrides": {key: raw value}}
    files: dict[Path, str]
    links: dict[Path, str]  # tasks/<i> -> ../<name>
    script: Path
    sbatch: list[str]
    index: dict  # sweep.json without the job id


def sweep_command(config_path: str, items: list[str], sweep_dir: str, max_parallel: Optional[int]) -> str:
    from launcher.slurm import q

    return " ".join(["python -m launcher sweep", q(config_path), *map(q, items), "--out", q(sweep_dir)]
                    + (["--max-parallel", str(max_parallel)] if max_parallel else []))


def make_sweep(config_path: str, items: list[str], out: Optional[str], max_parallel: Optional[int], cwd: Path,
               python: str, repo: str) -> SweepPlan:
    """Validate every point, then everything the sweep would write and the one sbatch --array command."""
    from launcher.plan import make_plan
    from launcher.rules import apply_overrides, parse_overrides, read_yaml
    from launcher.slurm import render_script, sbatch_argv, sbatch_options, script_spec

    fixed, axes, problems = parse_sweep_args(items)
    if max_parallel is not None and max_parallel < 1:
        problems.append(f"--max-parallel {max_parallel} must be at least 1 (or left out: no limit)")
    if problems:
        raise ConfigError(problems, "the sweep")
    if out is None:
        raw = read_yaml(config_path)
        parsed, bad = parse_overrides(fixed)
        base = apply_overrides(raw, parsed) if isinstance(raw, dict) and not bad else {}
        out = base.get("run_dir") if isinstance(base.get("run_dir"), str) else None
        if out is None:
            raise ConfigError(["the config has no run_dir to hold the sweep; set run_dir or pass --out SWEEP_DIR"],
                              config_path)
    sweep_dir = Path(cwd, out)
    if rundir.RunDir(sweep_dir).config.exists():
        raise ConfigError([f"the sweep dir {out!r} holds a run ({rundir.CONFIG}); choose another --out (each point "
                           "gets its own run dir inside the sweep dir)"], "the sweep")
    combos = list(itertools.product(*(a.values for a in axes)))
    names = point_names(axes, combos)
    cfgs, plans, per_point = [], [], []
    for combo, name in zip(combos, names):
        overrides = [*fixed, *(f"{a.key}={v}" for a, v in zip(axes, combo))]
        try:
            from launcher.load import load_config

            cfg = load_config(config_path, overrides, run_dir=str(Path(out, name)))
        except ConfigError as e:
            per_point.append((name, e.problems))
            continue
        cfgs.append(cfg)
        plans.append(make_plan(cfg, config_path, overrides, cwd, python, repo))
    if per_point:
        raise ConfigError(_point_problems(per_point, len(combos)), f"the sweep of {config_path}")

    regenerate = sweep_command(config_path, items, out, max_parallel)
    tasks = sweep_dir / rundir.SWEEP_TASKS
    configs = [str(p.config) for p in plans]
    array = ("array", f"0-{len(plans) - 1}" + (f"%{max_parallel}" if max_parallel else ""))

    def array_script(cfg) -> tuple[list, str]:
        options = sbatch_options(cfg, str(tasks), array=True) + [array]
        return options, render_script(script_spec(cfg, options, regenerate, python, repo, array_configs=configs))

    options, script_text = array_script(cfgs[0])
    differ = [(i, names[i]) for i, cfg in enumerate(cfgs[1:], 1) if array_script(cfg)[1] != script_text]
    if differ:
        slurm_axes = [a.key for a in axes if a.key.startswith(("slurm.", "dist."))]
        raise ConfigError([f"point {i} ({name}) needs a different batch script than point 0 ({names[0]}): one job "
                           f"array runs one script with one set of sbatch options, so {', '.join(slurm_axes) or 'these keys'}"
                           " cannot vary within a sweep; sweep them as separate `submit`s" for i, name in differ],
                          "the sweep")
    points = [{"task": i, "name": name, "run_dir": str(p.run_dir),
               "overrides": dict(zip([a.key for a in axes], combo))}
              for i, (name, combo, p) in enumerate(zip(names, combos, plans))]
    files = {path: text for p in plans for path, text in p.files.items()}
    script = sweep_dir / rundir.SCRIPT
    files[script] = script_text
    index = {rundir.GENERATED_KEY: regenerate, "config": str(Path(cwd, config_path)), "fixed": fixed,
             "axes": {a.key: a.values for a in axes}, "max_parallel": max_parallel, "job": None, "points": points}
    links = {tasks / str(i): os.path.join("..", name) for i, name in enumerate(names)}
    return SweepPlan(sweep_dir, points, files, links, script, sbatch_argv(options, str(script), []), index)


def _point_problems(per_point: list[tuple[str, list[str]]], n_points: int) -> list[str]:
    """Problems every failing point shares are listed once; the rest name their point."""
    common = set(per_point[0][1]).intersection(*(set(p) for _, p in per_point[1:]))
    everywhere = len(per_point) == n_points
    out = [f"{'every point' if everywhere else 'points ' + ', '.join(n for n, _ in per_point)}: {m}"
           for m in per_point[0][1] if m in common]
    out += [f"point {name}: {m}" for name, problems in per_point for m in problems if m not in common]
    return out


def index_with_job(index: dict, job: str) -> str:
    return json.dumps({**index, "job": job}, indent=2) + "\n"


# --------------------------------------------------------------------------- compare


def expand(targets: list[str]) -> list[tuple[str, Path, dict]]:
    """RUN_DIR or SWEEP_DIR arguments -> (name, run dir, swept values) per run."""
    runs = []
    for t in targets:
        index = Path(t) / rundir.SWEEP_INDEX
        if index.is_file():
            for p in json.loads(index.read_text())["points"]:
                runs.append((p["name"], Path(p["run_dir"]), p["overrides"]))
        elif Path(t).is_dir():
            runs.append((Path(t).resolve().name, Path(t), {}))
        else:
            raise ConfigError([f"{t!r} is not a run dir or a sweep dir"], "the command line")
    names = [n for n, _, _ in runs]
    return [(n if names.count(n) == 1 else f"{n}-{i}", d, v) for i, (n, d, v) in enumerate(runs)]


HEADLINE = ("eval/loss", "eval/ppl", "eval/accuracy", "eval/f1_macro", "eval/entity_f1_micro")


def summarise(run_dir: Path) -> dict:
    """Final or best eval metrics (DONE: the exported step's), else the last evaluation so far."""
    from launcher.jobs import config_max_steps, progress, read_metrics

    rows = read_metrics(run_dir)
    prog = progress(rows, config_max_steps(run_dir))
    done_path = rundir.RunDir(run_dir).done
    done = json.loads(done_path.read_text() or "{}") if done_path.is_file() else None
    if done is not None:
        metrics = {k: v for k, v in done.items() if k.startswith("eval/")}
        best = done.get("best_step")
        source = f"best@{best}" if best is not None else f"final@{done.get('last_step')}"
    elif prog["eval"]:
        metrics = {k: v for k, v in prog["eval"].items() if k.startswith("eval/")}
        source = f"last eval@{prog['eval']['step']} (running)"
    else:
        metrics, source = {}, "no eval yet"
    train = {}
    for r in rows:  # a restarted attempt logs some steps again: the last value of each step counts
        if "train/loss" in r:
            train[int(r["step"])] = r["train/loss"]
    evals = {int(r["step"]): r["eval/loss"] for r in rows if "eval/loss" in r}
    return {"step": prog["step"], "total_steps": prog["total_steps"], "train_loss": prog["loss"], "done": done is not None,
            "metrics": metrics, "source": source, "curve": sorted(train.items()), "eval_curve": sorted(evals.items())}


def compare_table(runs: list[tuple[str, Path, dict]], summaries: list[dict], extra: list[str]) -> str:
    keys = list(dict.fromkeys(k for _, _, v in runs for k in v))
    present = {k for s in summaries for k in s["metrics"]}
    metrics = [m for m in HEADLINE if m in present] + [m for m in extra if m not in HEADLINE]
    head = ["run", *keys, "steps", "train/loss", *metrics, "from"]
    rows = []
    for (name, _, values), s in zip(runs, summaries):
        rows.append([name, *(str(values.get(k, "")) for k in keys),
                     f"{s['step'] if s['step'] is not None else '-'}/{s['total_steps'] or '?'}",
                     _num(s["train_loss"]), *(_num(s["metrics"].get(m)) for m in metrics), s["source"]])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    if metrics:
        m = metrics[0]
        scored = [(s["metrics"][m], name) for (name, _, _), s in zip(runs, summaries) if m in s["metrics"]]
        if scored:
            lower = m in ("eval/loss", "eval/ppl")
            value, name = (min if lower else max)(scored)
            lines.append(f"best by {m} ({'lower' if lower else 'higher'} is better): {name} ({value:.4f})")
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def loss_png(runs: list[tuple[str, Path, dict]], summaries: list[dict]) -> bytes:
    """One PNG: every run's train/loss (solid) and eval/loss (dashed, same colour) overlaid."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, _, _), s in zip(runs, summaries):
        if not s["curve"]:
            continue
        (line,) = ax.plot(*zip(*s["curve"]), label=name)
        if s["eval_curve"]:
            ax.plot(*zip(*s["eval_curve"]), "--o", color=line.get_color(), markersize=3, label=f"{name} (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"train/loss (solid) and eval/loss (dashed) of {len(runs)} runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def tensorboard_links(runs: list[tuple[str, Path, dict]], out_dir: Path) -> dict[Path, str]:
    """OUT/tb_compare/<run> -> <run>/tb (relative links: the sweep dir can move as a whole)."""
    folder = out_dir / rundir.COMPARE_TB
    return {folder / name: os.path.relpath(Path(d).resolve() / rundir.TENSORBOARD, folder.resolve())
            for name, d, _ in runs if (Path(d) / rundir.TENSORBOARD).is_dir()}


def default_out(targets: list[str]) -> Path:
    if len(targets) == 1 and (Path(targets[0]) / rundir.SWEEP_INDEX).is_file():
        return Path(targets[0])
    return Path(os.path.commonpath([str(Path(t).resolve()) for t in targets]))
