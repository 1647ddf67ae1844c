"""Distributed set-up: rank/world from whichever launcher started us, gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from launcher.execute import free_port


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    device: str  # "cuda:N" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def slurm_port(job_id: str) -> int:
    """Rendezvous port derived from the Slurm job id (the batch script uses the same rule)."""
    return 20000 + int(job_id) % 20000


def fill_env_from_launcher(env: os._Environ | dict) -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* exist, whoever started us.

    torchrun and the deepspeed launcher set them. ``srun python trainer/main.py`` (one task per
    GPU) gives SLURM_* only; a plain ``python trainer/main.py`` gives nothing, where DeepSpeed
    would fall back to mpi4py and die -- we make it a world of one instead.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside an srun step
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        tasks = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
        env["LOCAL_WORLD_SIZE"] = tasks
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
            env["MASTER_ADDR"] = (out.stdout.split() or ["localhost"])[0]
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(local_rank_arg: int | None = None, timeout_min: float | None = None) -> World:
    """Initialise torch.distributed once (idempotent, so tests can run many configs per launch).
    ``timeout_min`` (dist.timeout_min): a collective that waits longer fails instead of hanging;
    None = DeepSpeed's default (30 min)."""
    fill_env_from_launcher(os.environ)
    if local_rank_arg is not None and local_rank_arg >= 0:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")

    import torch
    import deepspeed

    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    fallback = min(world_size, torch.cuda.device_count()) if torch.cuda.is_available() else world_size
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or fallback)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher does not set it
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not torch.distributed.is_initialized():
        timeout = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False, **timeout)
    rank = torch.distributed.get_rank()
    node_rank = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK")
                    or os.environ.get("SLURM_NODEID") or rank // local_world)
    return World(rank, local_rank, torch.distributed.get_world_size(), local_world, node_rank, device)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def local_main_first(world: World):
    """Local rank 0 of each node goes first (e.g. tokenising into the cache); the rest reuse it."""
    import torch.distributed as dist

    if world.local_rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if world.local_rank == 0:
            dist.barrier()


def all_reduce_sums(values: list[float], device: str) -> list[float]:
    """Sum each value over all ranks, in one collective."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_and_read(summed: list, read: list, device: str) -> tuple[list[float], list[float]]:
    """Sum ``summed`` (0-d tensors on the device, or numbers) over all ranks in one collective, and read
    them back with ``read`` (this rank's values; None stays None) in one host sync."""
    import torch
    import torch.distributed as dist

    def as64(v):
        return torch.as_tensor(v, dtype=torch.float64).to(device).reshape(())

    t = torch.stack([as64(v) for v in summed])
    dist.all_reduce(t)
    known = [v for v in read if v is not None]
    values = torch.cat([t, torch.stack([as64(v) for v in known])]).tolist() if known else t.tolist()
    it = iter(values[len(summed):])
    return values[: len(summed)], [None if v is None else next(it) for v in read]


def all_reduce_sum(value: float, device: str) -> float:
    return all_reduce_sums([value], device)[0]


def any_rank(flag: bool, device: str) -> bool:
    return all_reduce_sum(1.0 if flag else 0.0, device) > 0


# Libraries whose versions must agree on every node (a mismatch fails in obscure ways: pickled
# objects, checkpoint formats, collective signatures).
CHECKED_VERSIONS = ("torch", "deepspeed", "transformers")
# Environment a rank reports in world.json: the network block and flight recorder of the batch script.
REPORTED_ENV = ("NCCL_", "TORCH_NCCL_", "TORCH_FR_", "FI_", "RDMAV_")


def world_info(world: World) -> dict:
    """This rank's view, for world.json (what the job really woke up in): where it runs, its GPUs, the
    library versions, the process-group timeout and the NCCL-related environment it sees."""
    import torch
    import torch.distributed as dist

    versions = {name: getattr(sys.modules.get(name) or __import__(name), "__version__", "?")
                for name in CHECKED_VERSIONS}
    try:  # the timeout the process group really got (a private attribute: None if it moves)
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device(world.device))
        timeout_s = backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        timeout_s = None
    return {"rank": world.rank, "local_rank": world.local_rank, "node_rank": world.node_rank,
            "world_size": world.world_size, "host": socket.gethostname(),
            "slurm_nodename": os.environ.get("SLURMD_NODENAME"), "device": world.device,
            "backend": dist.get_backend(), "gpus": torch.cuda.device_count(), "versions": versions,
            "pg_timeout_s": timeout_s,
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(REPORTED_ENV)}}


def node_name(info: dict) -> str:
    return info["slurm_nodename"] or info["host"]


def version_problems(infos: list[dict]) -> list[str]:
    """Ranks whose library versions differ from rank 0's, one problem per node. Pure."""
    ref = infos[0]
    by_node: dict[tuple, list[int]] = {}
    for info in infos[1:]:
        diff = {k: v for k, v in info["versions"].items() if v != ref["versions"].get(k)}
        if diff:
            key = (node_name(info), info["node_rank"], tuple(sorted(diff.items())))
            by_node.setdefault(key, []).append(info["rank"])
    return [f"node {node} (node rank {node_rank}, rank(s) {', '.join(map(str, ranks))}) has "
            + ", ".join(f"{k} {v}" for k, v in diff)
            + f" but rank 0 on node {node_name(ref)} has "
            + ", ".join(f"{k} {ref['versions'][k]}" for k, _ in diff)
            + "; install the same versions on every node (one shared venv or container image)"
            for (node, node_rank, diff), ranks in by_node.items()]


def check_software(world: World) -> list[dict]:
    """Every rank reports host, GPUs and versions; rank 0 prints one line per node. Versions that
    differ across nodes stop every rank with a ConfigError naming the node (exit 2), before any data
    or model is loaded."""
    import torch.distributed as dist

    from launcher.errors import ConfigError

    infos: list = [None] * world.world_size
    dist.all_gather_object(infos, world_info(world))
    if world.is_main:
        nodes: dict[tuple, list[dict]] = {}
        for info in infos:
            nodes.setdefault((info["node_rank"], node_name(info)), []).append(info)
        for (node_rank, name), ranks in sorted(nodes.items()):
            v = ranks[0]["versions"]
            print(f"node {name} (node rank {node_rank}): ranks {','.join(str(i['rank']) for i in ranks)}, "
                  f"host {ranks[0]['host']}, {ranks[0]['gpus']} GPU(s), "
                  + ", ".join(f"{k} {v[k]}" for k in CHECKED_VERSIONS), flush=True)
    problems = version_problems(infos)  # every rank decides the same, so all of them stop
    if problems:
        raise ConfigError(problems, "the nodes of this job")
    return infos
