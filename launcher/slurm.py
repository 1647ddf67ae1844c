"""The Slurm batch script, rendered from the run config. Pure: strings in, a string out.

Shell safety is one helper, :func:`q` (``shlex.quote``): every value that comes from the user and
lands in shell code goes through it. ``#SBATCH`` lines are not shell (sbatch parses them itself and
expands nothing), so a value is written there only when it is plainly safe (:func:`directive_safe`);
any other value (a job name with a quote, a run dir with a newline) goes on the sbatch command line
instead, as one argv element, where no parser can split it.

The script derives the world from Slurm at run time (``SLURM_JOB_NUM_NODES``, ``SLURM_NODEID``,
``SLURM_GPUS_ON_NODE``), so ``sbatch --nodes=4 finetune.sh CONFIG`` works with any script.
"""
from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from typing import Optional

from launcher import rundir
from launcher.config import ContainerConfig, RunConfig

_DIRECTIVE_SAFE = re.compile(r"[A-Za-z0-9._/:@+=,%-]+")


def q(value: object) -> str:
    """The one shell-quoting helper: any string -> one shell word that means exactly that string."""
    return shlex.quote(str(value))


def comment(text: str) -> str:
    """Text for one comment line, in a shell script or YAML: every character that is not printable (a
    newline, U+2028, U+0085, a control character: YAML reads some as line breaks and refuses others)
    becomes a backslash escape, so the comment stays one line and the file still parses."""
    return "".join(c if c.isprintable() and c != "\\" else
                   "\\\\" if c == "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


# --------------------------------------------------------------------------- slurm.env_setup
#
# The rule: each entry is one line of complete shell commands that hands control back to the script,
# so the launch lines after slurm.env_setup run. Refused: a line break or control character in an entry
# (give each command its own entry); an entry that is not complete on its own (an unclosed quote, `if`
# without `fi`: `bash -n` of the entry alone fails); an entry that swallows the next line (a here-document
# `<<EOF`, a trailing backslash: a lone `}` after it is no longer a syntax error, see
# :func:`env_setup_probes`); and an unconditional `exit` or `exec COMMAND` (`cmd || exit 1` and
# `exec >log 2>&1` are fine).

_REDIRECT = re.compile(r"[0-9]*(?:<|>|<<<|>>|&>|&>>|>&|<&|<>|>\|)")


def _words_at_command_start(line: str) -> list[list[str]]:
    """The words of each command that runs unconditionally (not after ||, &&, |, or inside if/while)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|(){}<>!")
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = list(lex)
    commands, current, start = [], [], True
    for tok in tokens:
        if tok in (";", "&", ";;", "&&", "||", "|", "(", ")", "{", "}"):
            if current and start:
                commands.append(current)
            current, start = [], tok in (";", "&", "{")
            continue
        current.append(tok)
    if current and start:
        commands.append(current)
    return commands


def _ends_script(words: list[str]) -> Optional[str]:
    while words and words[0] == "!":
        words = words[1:]
    if not words:
        return None
    if words[0] == "exit":
        return "`exit` ends the batch script"
    if words[0] == "exec":
        rest, i = words[1:], 0
        while i < len(rest):
            fd = rest[i].isdigit() and i + 1 < len(rest) and _REDIRECT.fullmatch(rest[i + 1])
            if fd or _REDIRECT.fullmatch(rest[i]):
                i += 1 if fd else 2  # an fd number before its operator; an operator and its target
                continue
            return "`exec COMMAND` replaces the batch shell with that command"
    return None


def env_setup_problems(lines: list[str]) -> list[str]:
    """The static part of the env_setup rule (the bash part: :func:`env_setup_probes`). Pure."""
    p = []
    for i, line in enumerate(lines):
        key = f"'slurm.env_setup[{i}]' = {line!r}"
        bad = next((c for c in line if c != "\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
        if bad is not None:
            p.append(f"{key} holds U+{ord(bad):04X} (a line break or control character); give each command its own "
                     "list entry")
            continue
        try:
            why = next(filter(None, map(_ends_script, _words_at_command_start(line))), None)
        except ValueError:  # shlex: an unclosed quote; bash -n reports it
            continue
        if why:
            p.append(f"{key}: {why}, so the launch lines after slurm.env_setup would never run; remove it "
                     "(a guard such as `module load cuda || exit 1` is fine)")
    return p


SENTINEL = "}"  # a syntax error where a command is read; fine inside a here-document, a string or as an argument


def env_setup_probes(line: str) -> tuple[str, str]:
    """Two texts for `bash -n`: the entry alone must parse, and the entry followed by a lone ``}`` must
    NOT parse. If it does, the entry swallowed the line after it (a here-document, a trailing backslash,
    an open string), as it would swallow the launch lines of the batch script."""
    return f"{line}\n", f"{line}\n{SENTINEL}\n"


def directive_safe(value: str) -> bool:
    """True when ``#SBATCH --opt=value`` carries ``value`` unchanged (no spaces, quotes, #, newlines)."""
    return bool(_DIRECTIVE_SAFE.fullmatch(value))


def slurm_filename(path: str) -> str:
    """A literal path as a Slurm filename pattern (``%`` starts a substitution there)."""
    return path.replace("%", "%%")


def sbatch_options(cfg: RunConfig, out_dir: Optional[str], array: bool = False) -> list[tuple[str, str]]:
    """(option, value) pairs for the batch script; ``out_dir`` None = the submit directory. ``array``:
    ``out_dir`` is a sweep's tasks folder, where ``<task index>`` links to that task's run dir."""
    s, d = cfg.slurm, cfg.dist
    gpus = d.procs_per_node if s.gpus_per_node is None else s.gpus_per_node
    opts = [("job-name", s.job_name), ("nodes", str(d.nodes)), ("ntasks-per-node", "1")]
    if gpus > 0:
        opts.append(("gpus-per-node", str(gpus)))
    opts.append(("cpus-per-task", str(s.cpus_per_task)))
    if s.mem_gb is not None:
        opts.append(("mem", f"{s.mem_gb}G"))
    opts.append(("time", str(s.time_min)))
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value is not None:
            opts.append((key, value))
    if s.exclusive:
        opts.append(("exclusive", ""))
    opts += [extra_option(item) for item in s.extra_sbatch]
    prefix = "" if out_dir is None else slurm_filename(out_dir.rstrip("/") + "/")
    out, err = (rundir.SLURM_OUT, rundir.SLURM_ERR) if not array else (f"%a/{rundir.SLURM_ARRAY_OUT}",
                                                                         f"%a/{rundir.SLURM_ARRAY_ERR}")
    opts += [("output", prefix + out), ("error", prefix + err),
             ("signal", f"B:{s.signal}@{s.signal_lead_s}"), ("requeue", ""), ("open-mode", "append")]
    return opts


def extra_option(item: str) -> tuple[str, str]:
    """``--flag=value`` -> ("flag", "value"); ``--flag`` -> ("flag", "") (validated in launcher/rules_slurm.py)."""
    name, _, value = item[2:].partition("=")
    return name, value


def _option(name: str, value: str) -> str:
    return f"--{name}" if value == "" else f"--{name}={value}"


def sbatch_argv(options: list[tuple[str, str]], script: str, script_args: list[str]) -> list[str]:
    """The sbatch command: options that cannot be ``#SBATCH`` lines, then the script and its args."""
    extra = [_option(k, v) for k, v in options if not directive_safe(v) and v != ""]
    return ["sbatch", "--parsable", *extra, script, *script_args]


@dataclass(frozen=True)
class ScriptSpec:
    options: list[tuple[str, str]]
    regenerate: str  # the command that writes this file again (the header names it)
    python: str  # interpreter on the compute nodes
    repo: Optional[str]  # folder holding `trainer/` and `launcher/`; None = the submit directory
    config: Optional[str] = None  # CONFIG when the script is started without arguments
    env_setup: list[str] = field(default_factory=list)
    network: str = "auto"  # dist.network: the NCCL environment block
    flight_recorder: bool = False  # dist.flight_recorder
    container: Optional[ContainerConfig] = None  # slurm.container: pyxis flags on srun
    array_configs: Optional[list[str]] = None  # a sweep: task i of the job array runs array_configs[i]


def script_spec(cfg: RunConfig, options: list[tuple[str, str]], regenerate: str, python: str, repo: Optional[str],
                config: Optional[str] = None, array_configs: Optional[list[str]] = None) -> ScriptSpec:
    """The batch script's inputs from a run config. In a container the Python is the image's (python3)."""
    s = cfg.slurm
    return ScriptSpec(options=options, regenerate=regenerate,
                      python=s.python or ("python3" if s.container is not None else python), repo=repo,
                      config=config, env_setup=list(s.env_setup), network=cfg.dist.network,
                      flight_recorder=cfg.dist.flight_recorder, container=s.container, array_configs=array_configs)


def render_script(spec: ScriptSpec) -> str:
    """The batch script. Every user value is either a safe ``#SBATCH`` value or ``q()``-quoted."""
    directives = []
    for name, value in spec.options:
        if value == "" or directive_safe(value):
            directives.append(f"#SBATCH {_option(name, value)}")
        else:
            directives.append(f"# --{name}: not representable in an #SBATCH line; "
                              "`python -m launcher submit` passes it on the sbatch command line")
    repo = '"$SLURM_SUBMIT_DIR"' if spec.repo is None else q(spec.repo)
    env_setup = "\n".join(spec.env_setup) if spec.env_setup else "# (slurm.env_setup is empty)"
    if spec.array_configs is not None:
        default_config = ("# A sweep (python -m launcher sweep): array task i runs CONFIGS[i].\n"
                          f"CONFIGS=({' '.join(map(q, spec.array_configs))})\n"
                          "DEFAULT_CONFIG=${CONFIGS[${SLURM_ARRAY_TASK_ID:-0}]:-}")
    else:
        default_config = "DEFAULT_CONFIG=" + (q(spec.config) if spec.config is not None else "''")
    container = container_flags(spec.container)
    if container:
        facts = ("# job-facts runs in the container too: the image holds the Python and the launcher.\n"
                 f'facts=$(srun --nodes=1 --ntasks=1 {" ".join(container)} "$PYTHON" -m launcher job-facts '
                 '"$CONFIG" "${OVERRIDES[@]}") || exit 2')
        srun_container = " ".join(container) + " \\\n  "
    else:
        facts = 'facts=$("$PYTHON" -m launcher job-facts "$CONFIG" "${OVERRIDES[@]}") || exit 2'
        srun_container = ""
    recorder = _FLIGHT_RECORDER.format(dir=rundir.FLIGHT_RECORDER) if spec.flight_recorder else ""
    return _TEMPLATE.format(regenerate=comment(spec.regenerate), directives="\n".join(directives),
                            default_config=default_config, network=network_block(spec.network),
                            env_setup=env_setup, repo=repo, python=q(spec.python), facts=facts,
                            flight_recorder=recorder, srun_container=srun_container, done=rundir.DONE,
                            stop=rundir.STOP, stop_key_env=rundir.STOP_KEY_ENV, cancel=rundir.CANCEL, jobs=rundir.JOBS, no_retry=rundir.NO_RETRY,
                            checkpoints=rundir.CHECKPOINTS)


def container_flags(c: Optional[ContainerConfig]) -> list[str]:
    """pyxis's srun flags, each one shell word. The named container (one per job) is imported once and
    shared by the job-facts step and the training step."""
    if c is None:
        return []
    flags = [q(f"--container-image={c.image}")]
    if c.mounts:
        flags.append(q(f"--container-mounts={','.join(c.mounts)}"))
    flags.append(q(f"--container-workdir={c.workdir}") if c.workdir else '--container-workdir="$SLURM_SUBMIT_DIR"')
    flags.append('--container-name="finetune-$SLURM_JOB_ID"')
    return flags


# dist.network -> the NCCL variables the batch script exports. Each is `${VAR:-value}`: the submitting
# shell's environment wins, and slurm.env_setup (rendered after this block) overrides any of them.
_COMMON = [
    ("NCCL_SOCKET_IFNAME", "^lo,docker", "bootstrap and out-of-band TCP on any interface except loopback and "
     "docker bridges (name yours, e.g. =eth0 or ib0, in slurm.env_setup)"),
    ("NCCL_DEBUG", "WARN", "NCCL prints warnings and errors (INFO also shows the transport it chose)"),
]
NETWORKS: dict[str, list[tuple[str, str, str]]] = {
    "infiniband": [
        ("NCCL_IB_DISABLE", "0", "use InfiniBand / RoCE verbs between nodes (NCCL's IB transport)"),
        *_COMMON,
        ("NCCL_IB_TIMEOUT", "22", "IB retransmission timeout 4.096 us x 2^22 (~17 s): rides out short fabric "
         "hiccups instead of failing the collective"),
    ],
    "ethernet": [
        ("NCCL_IB_DISABLE", "1", "no InfiniBand / RoCE: TCP sockets between nodes"),
        *_COMMON,
        ("NCCL_SOCKET_NTHREADS", "4", "CPU threads per connection that move socket data (1-16)"),
        ("NCCL_NSOCKS_PERTHREAD", "4", "sockets per thread (threads x sockets <= 64): parallel TCP streams "
         "fill 25-100 GbE links"),
    ],
    "efa": [
        ("FI_PROVIDER", "efa", "libfabric uses the AWS Elastic Fabric Adapter"),
        ("FI_EFA_USE_DEVICE_RDMA", "1", "GPUDirect RDMA over EFA (p4d, p5 and later; set 0 on instances without it)"),
        ("RDMAV_FORK_SAFE", "1", "fork() after memory registration (data-loader workers) stays safe"),
        ("NCCL_NET", "AWS Libfabric", "use the aws-ofi-nccl plugin; fail at start if it is missing instead of "
         "falling back to slow TCP"),
        *_COMMON,
    ],
}


def network_block(network: str) -> str:
    head = f"# ---- network (dist.network={network}) ----"
    if network == "auto":
        return head + "\n# NCCL picks the transport itself (InfiniBand when it finds it, else TCP sockets); nothing is set."
    lines = [head + ": slurm.env_setup below (or your shell) overrides any line"]
    for name, value, why in NETWORKS[network]:
        lines.append(f"# {why}")
        lines.append(f'export {name}="${{{name}:-{value}}}"')
    return "\n".join(lines)


_FLIGHT_RECORDER = """
# NCCL flight recorder (dist.flight_recorder): every rank keeps its last collectives in memory and, when
# a collective times out (dist.timeout_min) or NCCL fails, dumps them to RUN_DIR/{dir}/rank_<N>;
# find the rank that fell behind with: torchfrtrace RUN_DIR/{dir}
# (older torch releases read TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE instead.)
export TORCH_FR_BUFFER_SIZE="${{TORCH_FR_BUFFER_SIZE:-20000}}"         # collectives kept per rank
export TORCH_NCCL_DUMP_ON_TIMEOUT="${{TORCH_NCCL_DUMP_ON_TIMEOUT:-1}}"  # dump them on a timeout or NCCL error
export TORCH_FR_DUMP_TEMP_FILE="$RUN_DIR/{dir}/rank_"                # one file per rank: rank_<N>
mkdir -p "$RUN_DIR/{dir}"
"""


def shell_assignments(values: dict[str, object]) -> str:
    """``NAME=value`` lines that bash can ``eval`` safely (what ``launcher job-facts`` prints)."""
    for name in values:
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), name
    return "".join(f"{name}={q(value)}\n" for name, value in values.items())


# Braces for str.format are doubled where bash needs them.
_TEMPLATE = """\
#!/bin/bash
# Generated by: {regenerate}
# Do not edit: change the run config (or the renderer in launcher/slurm.py) and run that command again.
#
#   sbatch [--nodes=N --gpus-per-node=G ...] finetune.sh [CONFIG] [key=value ...]
#
# One srun task per node starts that node's ranks with torchrun (static rendezvous on the first
# node, port 20000 + job id % 20000). The world is read from Slurm at run time: nodes from
# SLURM_JOB_NUM_NODES, ranks per node from SLURM_GPUS_ON_NODE (or dist.procs_per_node on CPU nodes).
# Preemption: the signal below (or `scancel --signal=USR2 --batch JOBID`) reaches this shell, which
# drops RUN_DIR/STOP; every rank checkpoints at the next optimizer step and exits; the job then
# requeues itself while SLURM_RESTART_COUNT < slurm.max_requeues and resumes from `latest`.
# A rank that fails (not a config or data error, exit 2) restarts every rank from `latest`, up to
# dist.max_restarts times within the job.
{directives}
set -uo pipefail

{default_config}
CONFIG=${{1:-$DEFAULT_CONFIG}}
[ $# -gt 0 ] && shift
OVERRIDES=("$@")
if [ -z "$CONFIG" ] || [ -z "${{SLURM_JOB_ID:-}}" ]; then
  echo "usage: sbatch finetune.sh CONFIG [key=value ...]   (it must run under sbatch)" >&2
  exit 2
fi

{network}
# ---- environment (slurm.env_setup) ----
{env_setup}
# ---- end of environment ----
export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}
PYTHON={python}

# RUN_DIR, PROCS_PER_NODE, MAX_REQUEUES, MAX_RESTARTS from the validated config, each value shell-quoted.
{facts}
eval "$facts"
{flight_recorder}
# This job in RUN_DIR/{jobs} (an array task is ARRAYJOB_TASK): `python -m launcher status|logs|cancel`.
JOB_KEY=${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID:-}}}}
JOB_KEY=${{JOB_KEY:-$SLURM_JOB_ID}}
attempt=0
record() {{
  printf '{{"job": "%s", "event": "%s", "restart": %d, "attempt": %d, "time": %d, "detail": "%s"}}\\n' \\
    "$JOB_KEY" "$1" "${{SLURM_RESTART_COUNT:-0}}" "$attempt" "$(date +%s)" "${{2:-}}${{3:+ $3}}" >> "$RUN_DIR/{jobs}"
}}
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/{cancel}"

# Preemption, trapped before the start is recorded (`launcher cancel --checkpoint` signals once it sees
# the start). STOP holds this attempt's key: ranks still starting keep it (an earlier attempt's STOP
# they remove), so a signal that comes before the first step is not lost.
export {stop_key_env}="$JOB_KEY.${{SLURM_RESTART_COUNT:-0}}"
stop_requested=0
interrupted=0
request_stop() {{
  stop_requested=1
  interrupted=1
  echo "[finetune] SIG$1 received: every rank checkpoints at its next optimizer step"
  printf '%s\\n' "${stop_key_env}" > "$RUN_DIR/{stop}.$$" && mv -f "$RUN_DIR/{stop}.$$" "$RUN_DIR/{stop}"
}}
trap 'request_stop USR1' USR1
trap 'request_stop USR2' USR2
record start "$SLURM_JOB_NODELIST"

echo "[finetune] job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST; run dir: $RUN_DIR"
if [ -e "$RUN_DIR/{done}" ]; then
  echo "[finetune] the run already finished ($RUN_DIR/{done}); nothing to do"
  record end already_done
  exit 0
fi

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((20000 + SLURM_JOB_ID % 20000))
NNODES=$SLURM_JOB_NUM_NODES
if [ "${{SLURM_GPUS_ON_NODE:-0}}" -gt 0 ]; then
  NPROC=$SLURM_GPUS_ON_NODE
else
  NPROC=$PROCS_PER_NODE
  threads=$(( ${{SLURM_CPUS_PER_TASK:-$NPROC}} / NPROC ))
  export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}}
fi
echo "[finetune] $NNODES node(s) x $NPROC rank(s); rendezvous $HEAD_NODE:$PORT"

# trainer.node is torchrun that also writes NO_RETRY when a rank exits with a code a retry cannot cure
# (2 config or data, 3 non-finite steps, 5 checkpoint write): the job ends with it, never restarted.
NO_RETRY="$RUN_DIR/{no_retry}.$JOB_KEY"
rm -f "$NO_RETRY"
final=0
while :; do
  # bash runs traps only between commands, so srun runs in the background and we wait for it.
  srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    ${{SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}} \\
    {srun_container}bash -c 'exec "$0" -m trainer.node --no-retry-file "$1" --node-rank="$SLURM_NODEID" "${{@:2}}"' \\
    "$PYTHON" "$NO_RETRY" \\
    --nnodes="$NNODES" --nproc-per-node="$NPROC" --master-addr="$HEAD_NODE" --master-port="$PORT" \\
    -m trainer.main --config "$CONFIG" "${{OVERRIDES[@]}}" &
  srun_pid=$!
  while :; do
    interrupted=0
    wait "$srun_pid"
    rc=$?
    [ "$interrupted" = 1 ] || break  # a trapped signal ended `wait` early: srun is still running
  done
  if [ -e "$NO_RETRY" ]; then
    final=$(sed -n 's/.* exited \\([0-9]*\\) (.*/\\1/p' "$NO_RETRY" | head -n 1)
    final=${{final:-1}}
    cat "$NO_RETRY" >&2
    rm -f "$NO_RETRY"
    break
  fi
  if [ "$rc" -eq 0 ] || [ "$stop_requested" = 1 ] || [ -e "$RUN_DIR/{done}" ] || [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    break
  fi
  attempt=$((attempt + 1))
  echo "[finetune] the ranks failed (exit $rc); restarting them from the latest checkpoint" \\
       "(in-job restart $attempt of at most $MAX_RESTARTS, dist.max_restarts)" >&2
  record restart "exit $rc"
done

if [ -e "$RUN_DIR/{done}" ]; then
  echo "[finetune] finished: $RUN_DIR"
  record end finished
  exit 0
fi
if [ "$final" = 2 ]; then
  echo "[finetune] a rank stopped on a problem with the config or data (exit 2; see above): not retried" >&2
  record end user_error
  exit 2
fi
if [ "$final" != 0 ]; then
  echo "[finetune] a rank stopped with exit $final (see above), which a restart cannot cure: not retried;" \\
       "complete checkpoints stay in $RUN_DIR/{checkpoints}" >&2
  record end failed "exit $final, not retried"
  exit "$final"
fi
if [ "$rc" -ne 0 ]; then
  echo "[finetune] training failed (exit $rc, after $attempt in-job restart(s)); complete checkpoints stay in" \\
       "$RUN_DIR/{checkpoints}" >&2
  record end failed "exit $rc"
  exit "$rc"
fi
if [ "$stop_requested" = 1 ]; then
  if [ -e "$RUN_DIR/{cancel}" ]; then
    rm -f "$RUN_DIR/{cancel}"
    echo "[finetune] checkpointed; cancelled (launcher cancel --checkpoint): not requeueing"
    record end cancelled
    exit 0
  fi
  restarts=${{SLURM_RESTART_COUNT:-0}}
  if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
    echo "[finetune] checkpointed; requeueing (restart $((restarts + 1)) of at most $MAX_REQUEUES)"
    record end requeued
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[finetune] scontrol requeue failed; submit the job again to resume" >&2
    exit 1
  fi
  echo "[finetune] checkpointed, but the job was requeued $restarts time(s) already" \\
       "(slurm.max_requeues=$MAX_REQUEUES); submit it again to resume" >&2
  record end requeue_limit
  exit 1
fi
echo "[finetune] stopped by $RUN_DIR/{stop} before the end; submit the job again to resume"
record end stopped
exit 0
"""
