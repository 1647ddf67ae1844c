"""Rules of the slurm section: times, GPUs and CPU-only nodes, slurm.env_setup, slurm.extra_sbatch and
slurm.container (slurm_problems and cluster_problems are part of the cross-field rules in
launcher/rules.py); and env_setup's bash part (env_setup_shell_problems), which the launcher runs with
``bash -n`` on the plan. Importable without torch.
"""
from __future__ import annotations

import re
from typing import Callable

from launcher.config import RunConfig
from launcher.slurm import SENTINEL, env_setup_probes, env_setup_problems


def slurm_problems(cfg: RunConfig) -> list[str]:
    """Cross-field rules of the slurm section (part of cross_field_problems). Pure."""
    s, d, p = cfg.slurm, cfg.dist, []
    if s.signal_lead_s >= s.time_min * 60:
        p.append(f"'slurm.signal_lead_s' = {s.signal_lead_s} is not shorter than the time limit 'slurm.time_min' = "
                 f"{s.time_min} min ({s.time_min * 60} s), so the job would be told to stop before it trains; "
                 f"raise slurm.time_min or lower slurm.signal_lead_s")
    if s.gpus_per_node and s.gpus_per_node != d.procs_per_node:
        p.append(f"'slurm.gpus_per_node' = {s.gpus_per_node} but 'dist.procs_per_node' = {d.procs_per_node}: the job "
                 f"starts one rank per GPU, a world of {d.nodes} x {s.gpus_per_node} = {d.nodes * s.gpus_per_node}, "
                 f"not the {cfg.world_size} the batch math plans; set dist.procs_per_node={s.gpus_per_node} (or "
                 "leave slurm.gpus_per_node unset; 0 = CPU-only nodes)")
    if s.gpu_mem_gb is not None and s.gpus_per_node == 0:
        p.append(f"'slurm.gpu_mem_gb' = {s.gpu_mem_gb:g} but 'slurm.gpus_per_node' = 0 (CPU-only nodes): there is no "
                 "GPU memory to plan; remove slurm.gpu_mem_gb, or request GPUs")
    if s.gpus_per_node == 0:
        if cfg.precision.dtype == "fp16":
            p.append("'precision.dtype' = 'fp16' cannot run on CPU-only nodes (slurm.gpus_per_node = 0): DeepSpeed "
                     "has no fp16 on a CPU; use precision.dtype=bf16 or fp32, or request GPUs")
        if cfg.method.name == "qlora":
            p.append("'method.name' = 'qlora' cannot run on CPU-only nodes (slurm.gpus_per_node = 0): its 4-bit "
                     "weights need CUDA kernels; use method.name=lora, or request GPUs")
    p += env_setup_problems(s.env_setup)
    if not s.job_name.strip():
        p.append("'slurm.job_name' is empty; give the job a name (e.g. slurm.job_name=finetune)")
    for key in ("partition", "account", "qos", "constraint", "python"):
        value = getattr(s, key)
        if value is not None and not value.strip():
            p.append(f"'slurm.{key}' = {value!r} is empty; remove the key to use the default")
    return p


def env_setup_shell_problems(lines: list[str], parses: Callable[[str], bool]) -> list[str]:
    """The bash part of the slurm.env_setup rule (launcher/slurm.py explains it): ``parses(text)`` is
    ``bash -n`` (the launcher passes launcher/execute.py's); nothing is executed."""
    p = []
    for i, line in enumerate(lines):
        alone, followed = env_setup_probes(line)
        key = f"'slurm.env_setup[{i}]' = {line!r}"
        if not parses(alone):
            p.append(f"{key} is not a complete shell command on its own (bash -n refuses it: an unclosed quote, "
                     "bracket or if/for?); put each whole command on one entry")
        elif parses(followed):
            p.append(f"{key} swallows the line after it (a here-document, a trailing backslash or an open string: "
                     f"a lone {SENTINEL!r} after it still parses), so the launch lines would never run; write "
                     "it as one complete command (e.g. export VAR=value) or move it into a script you source")
    return p


# sbatch options the schema models (the key to use instead); slurm.extra_sbatch may not set them.
MODELLED_SBATCH = {
    "job-name": "slurm.job_name", "nodes": "dist.nodes", "ntasks": "dist.nodes (one task per node)",
    "ntasks-per-node": "dist.procs_per_node (one task per node starts its ranks)", "gpus-per-node":
    "slurm.gpus_per_node", "gpus": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task",
    "mem": "slurm.mem_gb", "time": "slurm.time_min", "partition": "slurm.partition", "account": "slurm.account",
    "qos": "slurm.qos", "constraint": "slurm.constraint", "output": "the run dir (slurm-JOBID.out there)",
    "error": "the run dir (slurm-JOBID.err there)", "signal": "slurm.signal and slurm.signal_lead_s",
    "requeue": "slurm.max_requeues", "no-requeue": "slurm.max_requeues=0", "open-mode": "nothing (append keeps "
    "a requeued job's output in one file)", "exclusive": "slurm.exclusive", "array": "python -m launcher sweep",
    "wrap": "nothing (the batch script is rendered)", "chdir": "nothing (relative paths resolve in the submit "
    "directory; submit from the directory you want)", "parsable": "nothing", "wait": "nothing",
}
_SBATCH_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(=(.+))?", re.S)
_MOUNT = re.compile(r"(/[^,:\s]*):(/[^,:\s]*)(:[a-z+]+)?")


def cluster_problems(cfg: RunConfig) -> list[str]:
    """slurm.extra_sbatch, slurm.container (part of cross_field_problems). Pure."""
    s, p = cfg.slurm, []
    seen = set()
    for item in s.extra_sbatch:
        m = _SBATCH_FLAG.fullmatch(item)
        if m is None or "\n" in item:
            p.append(f"'slurm.extra_sbatch' item {item!r} is not an sbatch option; write it as --flag=value or "
                     "--flag (long form, e.g. --reservation=maint or --mail-type=END)")
            continue
        name = m.group(1)
        if name in MODELLED_SBATCH:
            p.append(f"'slurm.extra_sbatch' item {item!r} sets --{name}, which the config models; use "
                     f"{MODELLED_SBATCH[name]} instead")
        elif name in seen:
            p.append(f"'slurm.extra_sbatch' sets --{name} more than once; keep one")
        seen.add(name)
    c = s.container
    if c is not None:
        if not c.image.strip() or "\n" in c.image:
            p.append(f"'slurm.container.image' = {c.image!r} is empty or holds a newline; give an image "
                     "(e.g. nvcr.io#nvidia/pytorch:24.05-py3) or a squashfs file")
        for mount in c.mounts:
            if not _MOUNT.fullmatch(mount):
                p.append(f"'slurm.container.mounts' item {mount!r} is not SRC:DST[:FLAGS] with absolute paths "
                         "(no commas or spaces: pyxis joins the mounts with commas), e.g. /scratch:/scratch")
        if c.workdir is not None and not c.workdir.startswith("/"):
            p.append(f"'slurm.container.workdir' = {c.workdir!r} must be an absolute path inside the container; "
                     "remove it to use the submit directory")
    return p
