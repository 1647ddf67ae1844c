"""The one module of the launcher that writes files and starts processes (plan.py decides what)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Optional


class LaunchError(RuntimeError):
    """A command outside our control failed (sbatch, bash); the message says what to do."""


def write_files(files: dict[Path, str], executable: tuple[Path, ...] = ()) -> None:
    """Write each file atomically (a reader never sees half a file), creating folders."""
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        if path in executable:
            tmp.chmod(0o755)
        os.replace(tmp, path)


def write_new_file(path: Path, text: str) -> bool:
    """Write ``path`` only if it does not exist (atomic: a hard link never replaces a file).
    Returns False, writing nothing, when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def read_text(path: Path) -> Optional[str]:
    return path.read_text() if path.is_file() else None


def bash_syntax_problems(script: str) -> list[str]:
    """``bash -n`` on a rendered script (env_setup lines are the user's shell code)."""
    p = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if p.returncode:
        return [f"the rendered batch script is not valid bash ({p.stderr.strip()}); check slurm.env_setup"]
    return []


def submit(argv: list[str], cwd: Path) -> str:
    """Run sbatch --parsable; returns the job id."""
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise LaunchError("sbatch is not on PATH: run this on a Slurm login node (or use "
                          "`python -m launcher run` on this machine)") from None
    if p.returncode:
        raise LaunchError(f"sbatch failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip().split(";")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def exec_command(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with ``argv`` (Ctrl-C and signals reach the launcher directly)."""
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]!r} was not found; install deepspeed (pip install -e .) or activate the "
                          "project's virtual environment") from None


# --------------------------------------------------------------------------- Slurm queries and signals


def slurm_command(argv: list[str], check: bool = False) -> subprocess.CompletedProcess:
    """Run a Slurm client command (squeue, sacct, scontrol, scancel). ``check``: a non-zero exit is a
    LaunchError; otherwise the caller reads the exit status (e.g. squeue on a job Slurm forgot)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]} is not on PATH: run this on a Slurm login node") from None
    if check and p.returncode:
        raise LaunchError(f"{' '.join(argv)} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(line.rstrip("\n") + "\n")


def touch(path: Path) -> None:
    path.touch()


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def link_all(links: dict[Path, str], folder: Optional[Path] = None) -> None:
    """Create symlinks (path -> target). ``folder``: first remove the symlinks already in it (only links)."""
    if folder is not None and folder.is_dir():
        for old in folder.iterdir():
            if old.is_symlink():
                old.unlink()
    for path, target in links.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.symlink_to(target)
