"""Disk rules of a run config: paths exist and are the right kind, the run dir can be written and
belongs to this run, the model folder can be read (launcher/rules_model.py), a base DeepSpeed JSON
agrees. launcher/load.py applies them when it loads; the trainer runs :func:`disk_problems` at start.
Importable without torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from launcher import rundir
from launcher.config import RESUBMIT_FREE_KEYS, RunConfig, flatten, to_dict
from launcher.errors import ConfigError
from launcher.rules import path_keys, read_yaml, validate
from launcher.rules_model import liger_problems, model_folder_problems
from launcher.strict import path_text_ok


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _is_save_to_disk(folder: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset, or a DatasetDict)."""
    return ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()) or \
        (folder / "dataset_dict.json").is_file()


def path_problems(data: dict[str, Any]) -> list[str]:
    """Missing or wrong-kind model/tokenizer folders and data files, read from the raw (overridden) config
    dict, so they are reported even when the schema has problems of its own."""
    p = []
    folders = [("model.name_or_path", "a local Hugging Face folder (save_pretrained)"),
               ("model.tokenizer", "a local folder with tokenizer files")]
    for key, what in folders:
        value = _get(data, key)
        if isinstance(value, str) and path_text_ok(value) and not Path(value).is_dir():
            p.append(f"'{key}' = {value!r} " + ("is a file" if Path(value).exists() else "does not exist") +
                     f"; it must be {what} reachable from the compute nodes")
    for key in ("data.train", "data.eval", "zero.base_config"):
        value = _get(data, key)
        if not (isinstance(value, str) and path_text_ok(value)):
            continue
        if not Path(value).exists():
            p.append(f"'{key}' = {value!r} does not exist; fix the path (relative paths are relative to "
                     "the directory you launch from)")
        elif key.startswith("data.") and Path(value).is_dir() and not _is_save_to_disk(Path(value)):
            p.append(f"'{key}' = {value!r} is a folder, but not one written by datasets' save_to_disk (it has no "
                     "dataset_info.json + state.json, or dataset_dict.json); point it at a data file (.jsonl, "
                     ".json, .csv, .parquet) or a save_to_disk folder")
    return p


def resolved_path(path: Union[str, os.PathLike]) -> Path:
    """A path as the filesystem means it: absolute, with '.', '..' and symlinks resolved (relative paths
    against the current directory, i.e. where the user launches). ``./x/`` and ``/abs/x`` compare equal."""
    return Path(os.path.realpath(path))


def same_value(key: str, a: Any, b: Any) -> bool:
    """Two values of one config key mean the same thing (path keys: the same resolved path)."""
    if a == b:
        return True
    return key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str) and resolved_path(a) == resolved_path(b)


_PATH_KEYS = frozenset(path_keys())


def run_dir_path_problems(cfg: RunConfig) -> list[str]:
    """The run dir is a folder we can create or write; a folder that is not a run dir (no config.yaml)
    but holds files named like ours (``render --out slurm``: slurm/finetune.sh) is refused, so a render
    never overwrites a file that is not a run dir's own."""
    key = f"'run_dir' = {cfg.run_dir!r}"
    path = Path(cfg.run_dir).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:
        return [f"{key} cannot be checked ({e.strerror}: {e.filename}); choose a run_dir you can read and write"]
    if existing == path and not path.is_dir():
        return [f"{key} is a file; a run dir is a folder: choose another run_dir"]
    if existing != path and not existing.is_dir():
        return [f"{key} cannot be created: {str(existing)!r} is a file; choose another run_dir"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key} is not writable: you cannot write in {str(existing)!r}; choose a run_dir you can write "
                "(reachable from the compute nodes)"]
    layout = rundir.RunDir(path)
    ours = [f.name for f in (layout.ds_config, layout.script, layout.hostfile, layout.world) if f.exists()]
    if ours and not layout.config.is_file():
        return [f"{key} is not a run dir (it has no {rundir.CONFIG}) but holds {', '.join(ours)}, which would be "
                "overwritten; choose a new (or empty) run_dir"]
    return []


def _where(key: str, value: Any, run_dir: str) -> Any:
    """A path key's identity: its resolved path, or its place inside the run dir (a moved run dir
    takes such files along). Other values are themselves."""
    if key not in _PATH_KEYS or not isinstance(value, str):
        return value
    path, root = resolved_path(value), resolved_path(run_dir)
    return ("RUN_DIR", path.relative_to(root).as_posix()) if path.is_relative_to(root) else str(path)


def run_dir_problems(cfg: RunConfig, allow_done: bool = False) -> list[str]:
    """A run dir belongs to one run: a different config there would mix two runs. The slurm
    section may differ (a resubmission with more time or another partition is the same run), and so
    may ``run_dir`` itself (a run dir copied or moved elsewhere is the same run); the other paths
    count by where they resolve to."""
    run_dir = rundir.RunDir(cfg.run_dir)
    saved = run_dir.config
    p = []
    if saved.is_file():
        try:
            raw = read_yaml(saved)
        except ConfigError as e:
            return [f"run_dir {cfg.run_dir!r} holds an unreadable config.yaml ({e.problems[0]}); "
                    "choose a new run_dir"]
        try:  # compare resolved configs, so keys a newer schema added with defaults do not count
            old = flatten(to_dict(validate(raw, source=str(saved))))
        except ConfigError:
            old = flatten(raw)
        new = flatten(to_dict(cfg))
        old_root = old.get("run_dir") if isinstance(old.get("run_dir"), str) else cfg.run_dir
        old = {k: _where(k, v, old_root) for k, v in old.items()}
        new = {k: _where(k, v, cfg.run_dir) for k, v in new.items()}
        # slurm.* says where and how long a job runs, not what it trains: a resubmission may change it
        # (nor do the RESUBMIT_FREE_KEYS: how the job copes with faults, not what it trains)
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "run_dir"
                      and not k.startswith("slurm.") and k not in RESUBMIT_FREE_KEYS)
        if diff:
            p.append(f"run_dir {cfg.run_dir!r} holds a different run's config (differs in: {', '.join(diff)}); "
                     f"choose a new run_dir, or use the config saved there ({saved}) to resume that run")
    if not allow_done and run_dir.done.exists():
        p.append(f"run_dir {cfg.run_dir!r} holds a finished run ({run_dir.done}); choose a new run_dir "
                 "to train again")
    return p


def ds_config_problems(cfg: RunConfig) -> list[str]:
    """A user base DeepSpeed JSON that contradicts the run config (e.g. fp16 on while dtype is bf16)."""
    from launcher.ds_config import build_ds_config

    if cfg.zero.base_config is None or not Path(cfg.zero.base_config).exists():
        return []  # none, or missing (path_problems says so)
    try:
        build_ds_config(cfg)
    except ConfigError as e:
        return e.problems
    return []


def disk_problems(cfg: RunConfig, allow_done: bool = False, paths: bool = True) -> list[str]:
    """The disk rules of :func:`launcher.load.load_config` for an already validated config (the trainer
    runs them at start, before anything is written). ``paths``: include :func:`path_problems`."""
    run_dir = run_dir_path_problems(cfg)
    return ((path_problems(to_dict(cfg)) if paths else []) + run_dir +
            (run_dir_problems(cfg, allow_done) if not run_dir else []) + ds_config_problems(cfg) +
            model_folder_problems(cfg) + (liger_problems(cfg, disk=True) if cfg.model.config is None else []))
