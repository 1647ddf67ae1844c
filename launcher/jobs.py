"""Living with a run's Slurm jobs: status, logs, cancel.

    python -m launcher status RUN_DIR|JOBID|SWEEP_DIR [--watch] [--json]
    python -m launcher logs   RUN_DIR [-f]
    python -m launcher cancel RUN_DIR [--checkpoint]

Where the facts come from:
- the job: RUN_DIR/jobs.jsonl (``submit`` and ``sweep`` write "submitted"; the batch script writes
  "start", "restart" and "end" records), so a run dir always knows its current job, even one started
  with a plain ``sbatch slurm/finetune.sh``;
- its state and requeue count: ``squeue --states=all`` (pending, running, and finished jobs while
  slurmctld remembers them: MinJobAge, 300 s by default); then ``sacct`` where the cluster keeps
  accounting; then the last "end" record the batch script wrote (a job killed outright, e.g. by its
  time limit, writes none);
- progress: RUN_DIR/metrics.jsonl (step, loss, tokens/s, wall-clock time; the trainer logs the
  total step count at start), checkpoints/latest, DONE, STOP.

Parsing and formatting are pure functions; Slurm commands go through launcher/execute.py.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from launcher import execute, rundir
from launcher.errors import ConfigError

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT")
SQUEUE_FIELDS = ("State", "RestartCnt", "exit_code", "TimeUsed", "TimeLimit", "NodeList", "Reason")
SQUEUE_KEYS = ("state", "requeues", "exit_code", "elapsed", "time_limit", "nodes", "reason")
SACCT_FIELDS = ("State", "ExitCode", "Elapsed", "NodeList")
# The batch script's last "end" record -> what happened, when Slurm no longer knows the job.
END_EVENTS = {"finished": "COMPLETED", "already_done": "COMPLETED", "requeued": "REQUEUED",
              "cancelled": "CANCELLED (checkpointed first)", "stopped": "COMPLETED (stopped by RUN_DIR/STOP)",
              "failed": "FAILED", "user_error": "FAILED (config or data error)", "requeue_limit": "FAILED "
              "(requeue limit reached)"}
JOB_ID = re.compile(r"\d+(_\d+)?")


# --------------------------------------------------------------------------- reading (pure)


def read_records(run_dir: Path) -> list[dict]:
    """RUN_DIR/jobs.jsonl, oldest first (a torn or foreign line is skipped)."""
    path = rundir.RunDir(run_dir).jobs
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "job" in rec:
            out.append(rec)
    return out


def current_job(records: list[dict]) -> Optional[str]:
    return str(records[-1]["job"]) if records else None


def parse_squeue(out: str) -> Optional[dict]:
    """One line of ``squeue -O State:|,RestartCnt:|,...`` -> dict; None if the job is not listed."""
    line = next((ln for ln in out.splitlines() if ln.strip()), None)
    if line is None:
        return None
    values = line.split("|")
    d = dict(zip(SQUEUE_KEYS, (v.strip() for v in values)))
    d["requeues"] = int(d["requeues"]) if d.get("requeues", "").isdigit() else None
    return d


def parse_sacct(out: str) -> Optional[dict]:
    line = next((ln for ln in out.splitlines() if ln.strip()), None)
    if line is None:
        return None
    state, exit_code, elapsed, nodes = (line.split("|") + [""] * 4)[:4]
    return {"state": state.split()[0] if state else state, "exit_code": exit_code, "elapsed": elapsed,
            "nodes": nodes, "requeues": None}


def read_metrics(run_dir: Path, max_bytes: int = 32 << 20) -> list[dict]:
    """metrics.jsonl rows (the last ``max_bytes`` of a huge file)."""
    path = rundir.RunDir(run_dir).metrics
    if not path.is_file():
        return []
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - max_bytes))
        data = f.read().decode("utf-8", "replace")
    rows = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the first, cut line of a tail, or a line being written
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def progress(rows: list[dict], total_fallback: Optional[int], window: int = 20) -> dict:
    """Last step of the total, recent loss and tokens/s, the step time and ETA, the last evaluation.
    The step time is the median wall-clock time per step between the last ``window`` logged training
    steps (evaluations and checkpoint writes land in the odd long interval, which the median skips)."""
    train = [r for r in rows if "train/loss" in r]
    totals = [r["train/total_steps"] for r in rows if "train/total_steps" in r]
    total = int(totals[-1]) if totals else total_fallback
    out: dict = {"step": None, "total_steps": total, "loss": None, "tokens_per_s": None, "step_time_s": None,
                 "eta_s": None, "eval": None}
    if train:
        last = train[-1]
        out.update(step=int(last["step"]), loss=last["train/loss"], tokens_per_s=last.get("train/tokens_per_s"),
                   lr=last.get("train/lr"))
        recent = train[-(window + 1):]
        per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(recent, recent[1:])
                    if b["step"] > a["step"] and b["time"] >= a["time"]]
        if per_step:
            out["step_time_s"] = statistics.median(per_step)
            if total is not None:
                out["eta_s"] = max(0, total - out["step"]) * out["step_time_s"]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        out["eval"] = {"step": int(evals[-1]["step"]),
                       **{k: v for k, v in evals[-1].items() if k.startswith("eval/")}}
    return out


def checkpoint_info(run_dir: Path) -> Optional[dict]:
    layout = rundir.RunDir(run_dir)
    if not layout.latest.is_file():
        return None
    tag = layout.latest.read_text().strip()
    folder = layout.checkpoints / tag
    digits = re.sub(r"\D", "", tag)
    return {"tag": tag, "step": int(digits) if digits else None, "path": str(folder.resolve()),
            "complete": (folder / rundir.COMPLETE).exists()}


def config_max_steps(run_dir: Path) -> Optional[int]:
    """train.max_steps from RUN_DIR/config.yaml (read as plain YAML: status never validates)."""
    import yaml

    path = rundir.RunDir(run_dir).config
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        return int(data["train"]["max_steps"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# --------------------------------------------------------------------------- the status of one run


def job_state(job: str, records: list[dict]) -> dict:
    """The job's state and requeue count: squeue, then sacct, then the batch script's records."""
    note = None
    try:
        p = execute.slurm_command(["squeue", "-h", "-r", "--states=all", "-j", job,
                                   "-O", ",".join(f"{f}:|" for f in SQUEUE_FIELDS)])
        found = parse_squeue(p.stdout) if p.returncode == 0 else None
        if found:
            return {**found, "source": "squeue"}
        p = execute.slurm_command(["sacct", "-j", job, "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS)])
        found = parse_sacct(p.stdout) if p.returncode == 0 else None
        if found:
            return {**found, "source": "sacct"}
        note = ("Slurm no longer remembers the job (slurmctld forgets finished jobs after MinJobAge)"
                + ("; no accounting (sacct: " + p.stderr.strip() + ")" if p.returncode else ""))
    except execute.LaunchError as e:
        note = str(e)
    mine = [r for r in records if str(r.get("job")) == job]
    state = None
    if mine and mine[-1].get("event") == "end":  # the batch script's last word on this job
        kind = (mine[-1].get("detail") or "").split(" ", 1)
        state = END_EVENTS.get(kind[0], "ENDED") + (f", {kind[1]}" if len(kind) > 1 else "")
    requeues = max((int(r.get("restart", 0)) for r in mine), default=None)
    return {"state": state or "UNKNOWN", "requeues": requeues, "source": "run dir" if state else None,
            "note": note + (f"; the state is the batch script's last record in {rundir.JOBS}" if state else
                            "; the batch script recorded no end (killed outright, e.g. at its time limit?)")}


def status(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    layout = rundir.RunDir(run_dir)
    records = read_records(run_dir)
    job = current_job(records)
    out: dict = {"run_dir": str(run_dir.resolve()), "job": job}
    if job is not None:
        out.update(job_state(job, records))
        mine = [r for r in records if str(r.get("job")) == job]
        out["in_job_restarts"] = sum(1 for r in mine if r.get("event") == "restart")
        out["ended_as"] = mine[-1].get("detail") if mine and mine[-1].get("event") == "end" else None
        log, _ = log_files(run_dir, job)
        out["log"] = str(log.resolve()) if log else None
    out.update(progress(read_metrics(run_dir), config_max_steps(run_dir)))
    out["checkpoint"] = checkpoint_info(run_dir)
    done = None
    if layout.done.is_file():
        try:
            done = json.loads(layout.done.read_text() or "{}")
        except json.JSONDecodeError:
            done = {}
    out["done"] = done
    out["stop"] = layout.stop.exists()
    if done is not None:
        out["eta_s"] = 0.0
    return out


def format_status(d: dict) -> str:
    lines = [f"run dir:    {d['run_dir']}"]
    if d.get("job") is None:
        lines.append(f"job:        none recorded in {rundir.JOBS} (not submitted through Slurm?)")
    else:
        where = f" on {d['nodes']}" if d.get("nodes") and d.get("state") == "RUNNING" else ""
        reason = f" ({d['reason']})" if d.get("reason") not in (None, "", "None") else ""
        took = f" for {d['elapsed']}" if d.get("elapsed") else ""
        limit = f" (limit {d['time_limit']})" if d.get("time_limit") else ""
        exit_code = f", exit code {d['exit_code']}" if d.get("state") in FINAL and d.get("exit_code") else ""
        src = f"  [{d['source']}]" if d.get("source") else ""
        said = (f" (batch script: {d['ended_as']})" if d.get("ended_as") and d.get("source") != "run dir"
                and d.get("state") in FINAL else "")
        lines.append(f"job:        {d['job']} {d['state']}{reason}{where}{took}{limit}{exit_code}{said}{src}")
        lines.append(f"restarts:   requeued {d['requeues'] if d.get('requeues') is not None else '?'} time(s); "
                     f"{d.get('in_job_restarts', 0)} in-job restart(s) (dist.max_restarts)")
        if d.get("note"):
            lines.append(f"note:       {d['note']}")
    step, total = d.get("step"), d.get("total_steps")
    if step is None:
        lines.append("progress:   no training step logged yet")
    else:
        pct = f" ({100 * step / total:.0f} %)" if total else ""
        tps = f"; {d['tokens_per_s']:,.0f} tokens/s" if d.get("tokens_per_s") is not None else ""
        running = d.get("job") is None or d.get("state") == "RUNNING"
        st = (f"; {d['step_time_s']:.3g} s/step (median of the last steps); ETA {duration(d['eta_s'])}"
              if d.get("step_time_s") is not None and d.get("done") is None and running else "")
        lines.append(f"progress:   step {step}/{total if total is not None else '?'}{pct}; loss {d['loss']:.4f}{tps}{st}")
    ev = d.get("eval")
    if ev:
        metrics = [f"{k} {v:.4g}" for k, v in ev.items() if k != "step" and isinstance(v, (int, float))
                   and k.count("/") == 1][:8]
        lines.append(f"eval:       step {ev['step']}: " + ", ".join(metrics))
    ck = d.get("checkpoint")
    lines.append(f"checkpoint: {ck['tag']} ({ck['path']})" if ck else "checkpoint: none yet")
    if d.get("done") is not None:
        best = d["done"].get("best_step")
        lines.append(f"finished:   DONE (last step {d['done'].get('last_step', '?')}"
                     + (f", best step {best} by {d['done'].get('best_metric')}" if best is not None else "") + ")")
    elif d.get("stop") and d.get("state") == "RUNNING":
        lines.append("stop:       STOP is set: the ranks checkpoint at their next step and exit")
    elif d.get("stop"):
        lines.append("stop:       stopped by STOP (or a signal); submit the same config again to resume")
    if d.get("log"):
        lines.append(f"log:        {d['log']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- resolving the target


def resolve(target: str) -> Path:
    """A run dir, a sweep dir, or a job id whose output goes into a run dir."""
    path = Path(target)
    if path.is_dir():
        return path
    if not JOB_ID.fullmatch(target):
        raise ConfigError([f"{target!r} is neither a run dir nor a Slurm job id; give the run dir "
                           "(the config's run_dir) or the number sbatch printed"], "the command line")
    p = execute.slurm_command(["scontrol", "show", "job", "-o", target])
    m = re.search(r"\bStdOut=(.*?)(?: Power=| \w+=|\n|$)", p.stdout) if p.returncode == 0 else None
    if m is None:
        raise ConfigError([f"Slurm does not know job {target} (it forgets finished jobs after MinJobAge, and "
                           "this cluster's accounting is off or does not keep paths); give the run dir instead"],
                          "the command line")
    folder = Path(m.group(1)).parent.resolve()
    key = _job_key(p.stdout, target)
    if str(key) not in {str(r["job"]) for r in read_records(folder)}:
        raise ConfigError([f"job {target} writes its output to {folder}, which is not its run dir (a plain "
                           "`sbatch slurm/finetune.sh` writes to the submit directory); give the run dir instead"],
                          "the command line")
    return folder


def _job_key(scontrol_out: str, job: str) -> str:
    array = re.search(r"\bArrayJobId=(\d+) ArrayTaskId=(\d+)", scontrol_out)
    return f"{array.group(1)}_{array.group(2)}" if array else job


def log_files(run_dir: Path, job: str) -> tuple[Optional[Path], Optional[Path]]:
    """The job's stdout/stderr: in the run dir (submit, sweep) or where scontrol says (plain sbatch)."""
    out, err = rundir.RunDir(run_dir).slurm_logs(job)
    if out.exists():
        return out, err
    try:
        p = execute.slurm_command(["scontrol", "show", "job", "-o", job])
    except execute.LaunchError:
        return None, None
    paths = {k: re.search(rf"\b{k}=(.*?)(?: \w+=|\n|$)", p.stdout) for k in ("StdOut", "StdErr")}
    if p.returncode or paths["StdOut"] is None:
        return None, None
    return Path(paths["StdOut"].group(1)), Path(paths["StdErr"].group(1)) if paths["StdErr"] else None


# --------------------------------------------------------------------------- commands


def sweep_points(sweep_dir: Path) -> Optional[list[dict]]:
    path = Path(sweep_dir) / rundir.SWEEP_INDEX
    if not path.is_file():
        return None
    return json.loads(path.read_text())["points"]


def sweep_status(sweep_dir: Path) -> dict:
    points = sweep_points(sweep_dir) or []
    return {"sweep_dir": str(Path(sweep_dir).resolve()),
            "points": [{"task": p["task"], "name": p["name"], **status(Path(p["run_dir"]))} for p in points]}


def format_sweep(d: dict) -> str:
    w = max([5] + [len(p["name"]) for p in d["points"]])
    lines = [f"sweep dir: {d['sweep_dir']}", f"{'task':>4}  {'point':<{w}} {'job':<10} {'state':<12} "
             f"{'step':>11}  {'loss':>8}  {'eval/loss':>9}  {'ETA':>10}"]
    for p in d["points"]:
        ev = (p.get("eval") or {}).get("eval/loss")
        step = f"{p['step'] if p.get('step') is not None else '-'}/{p.get('total_steps') or '?'}"
        loss = "-" if p.get("loss") is None else format(p["loss"], ".4f")
        eta = duration(p.get("eta_s")) if p.get("step_time_s") and p.get("state") == "RUNNING" else "-"
        lines.append(f"{p['task']:>4}  {p['name']:<{w}} {p.get('job') or '-':<10} {p.get('state') or '-':<12} "
                     f"{step:>11}  {loss:>8}  {'-' if ev is None else format(ev, '.4f'):>9}  {eta:>10}")
    return "\n".join(lines)


def show_status(target: str, watch: bool, as_json: bool, interval_s: float, stream=sys.stdout) -> int:
    folder = resolve(target)
    is_sweep = (folder / rundir.SWEEP_INDEX).is_file()
    while True:
        d = sweep_status(folder) if is_sweep else status(folder)
        if as_json:
            stream.write(json.dumps(d) + "\n")
        else:
            if watch and stream.isatty():
                stream.write("\033[H\033[2J")
            stream.write((format_sweep(d) if is_sweep else format_status(d)) + "\n")
            if watch:
                stream.write(f"(every {interval_s:g} s until the job ends; Ctrl-C stops watching)\n")
        stream.flush()
        runs = d["points"] if is_sweep else [d]
        if not watch or all(r.get("job") is None or _ended(r) for r in runs):
            return 0
        time.sleep(interval_s)


def _ended(d: dict) -> bool:
    state = (str(d.get("state") or "").split() or [""])[0].rstrip(",")
    return state in FINAL or d.get("source") == "run dir" or state == "UNKNOWN"


def follow_logs(run_dir: Path, follow: bool, poll_s: float = 0.5, out=None, err=None) -> int:
    """Print the current job's stdout (to stdout) and stderr (to stderr); with ``follow``, keep
    printing until the job ends, moving on to a newer job of the same run if one starts."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    records = read_records(run_dir)
    job = current_job(records)
    if job is None:
        raise ConfigError([f"{run_dir} has no Slurm job recorded in {rundir.JOBS}; was it submitted with "
                           "`python -m launcher submit` (or started by the batch script)?"], "the command line")
    offsets: dict[Path, int] = {}

    def copy_new() -> tuple[tuple, bool]:
        paths, grew = log_files(run_dir, job), False
        for path, stream in zip(paths, (out, err)):
            if path is None or not path.is_file():
                continue
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
            if data:
                stream.write(data)
                stream.flush()
                offsets[path] = offsets.get(path, 0) + len(data)
                grew = True
        return paths, grew

    last_check = 0.0
    while True:
        paths, grew = copy_new()
        if not follow:
            if paths[0] is None or not paths[0].is_file():
                print(f"(job {job} has written no output yet)", file=sys.stderr)
            return 0
        if not grew and time.monotonic() - last_check > 2:
            last_check = time.monotonic()
            newer = current_job(read_records(run_dir))
            if newer != job:
                job, offsets = newer, {}
                out.write(f"\n--- job {job} ---\n".encode())
                continue
            if _ended(job_state(job, read_records(run_dir))):
                copy_new()  # what the job wrote between the last read and its end
                return 0
        time.sleep(poll_s)


def cancel(run_dir: Path, with_checkpoint: bool, timeout_s: float = 900, poll_s: float = 1.0,
           grace_s: float = 60.0) -> int:
    """scancel the run's job. ``with_checkpoint``: send the preemption signal (the batch shell drops
    STOP; every rank checkpoints at its next step and exits), wait for that checkpoint, and let the
    job end without requeueing (RUN_DIR/CANCEL tells the batch script so); scancel what is left."""
    import yaml

    layout = rundir.RunDir(run_dir)
    records = read_records(run_dir)
    job = current_job(records)
    if job is None:
        raise ConfigError([f"{run_dir} has no Slurm job recorded in {rundir.JOBS}"], "the command line")
    state = job_state(job, records)
    if _ended(state) or state["state"] == "REQUEUED" or layout.done.exists():
        print(f"job {job} is not running ({state['state']}{', the run finished: DONE' if layout.done.exists() else ''})"
              "; nothing to cancel")
        return 0
    if not with_checkpoint or state["state"] != "RUNNING":
        execute.slurm_command(["scancel", job], check=True)
        why = "" if not with_checkpoint else f" (it was {state['state']}: nothing to checkpoint)"
        print(f"cancelled job {job}{why}")
        return 0
    saved_cfg = yaml.safe_load(layout.config.read_text()) if layout.config.is_file() else None
    signal = ((saved_cfg or {}).get("slurm") or {}).get("signal") or "USR2"  # the run's preemption signal
    before = checkpoint_info(run_dir)
    t0 = time.monotonic()
    # The batch script traps the signal, then records its start; wait for that (a start within ~1 s).
    while not [r for r in read_records(run_dir) if str(r["job"]) == job and r.get("event") == "start"
               and int(r.get("restart", 0)) == (state.get("requeues") or 0)]:
        if time.monotonic() - t0 > 120:
            break
        time.sleep(poll_s)
    execute.touch(layout.cancel)
    execute.slurm_command(["scancel", f"--signal={signal}", "--batch", job], check=True)
    print(f"sent SIG{signal} to job {job}: every rank checkpoints at its next optimizer step", flush=True)
    while time.monotonic() - t0 < timeout_s:
        ck = checkpoint_info(run_dir)
        if ck and ck["complete"] and (before is None or ck["tag"] != before["tag"]):
            break
        st = job_state(job, read_records(run_dir))
        if _ended(st) or st["state"] not in ("RUNNING", "COMPLETING"):
            break
        if not layout.stop.exists():  # a batch script rendered before STOP held the attempt's key: its
            # STOP is cleared by ranks that start after the signal; put it back with this attempt's key
            execute.write_files({layout.stop: rundir.stop_key(job, state.get("requeues") or 0) + "\n"})
        time.sleep(poll_s)
    # The ranks exit right after the checkpoint and the batch script ends the job without a requeue;
    # give it a minute to do so (and record it), then scancel whatever is left.
    t_saved = time.monotonic()
    while not _ended(job_state(job, read_records(run_dir))) and time.monotonic() - t_saved < grace_s:
        time.sleep(poll_s)
    if not _ended(job_state(job, read_records(run_dir))):
        execute.slurm_command(["scancel", job], check=False)
        execute.remove(layout.cancel)  # the batch script, cancelled, could not
    if layout.done.exists():
        execute.remove(layout.cancel)
        print(f"the run finished (DONE) before the stop request took effect; job {job} was not cancelled")
        return 0
    latest = checkpoint_info(run_dir)  # the stop checkpoint may come a step after a periodic one
    if latest is not None and latest["complete"] and (before is None or latest["tag"] != before["tag"]):
        print(f"checkpointed: {latest['tag']} ({latest['path']}); job {job} ended without requeueing.\n"
              f"  resume: submit the same config again (same run_dir); it continues from {latest['tag']}")
        return 0
    print(f"no new checkpoint was written (job {job}: {job_state(job, read_records(run_dir))['state']}); the "
          f"job is cancelled. The latest checkpoint is {latest['tag'] if latest else 'none'}", file=sys.stderr)
    return 1
