"""Checks that look at the disk before anything is launched: paths exist, the run dir is this run's.

``load_checked`` is the launcher's front door: it reports config problems (launcher/config.py)
and these together, in one ConfigError, so a user sees everything wrong at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launcher.config import (ConfigError, RunConfig, apply_overrides, flatten, parse_overrides, read_yaml,
                             to_dict, validate)

DONE_FILE = "DONE"


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def path_problems(data: dict[str, Any]) -> list[str]:
    """Missing model/tokenizer folders and data files, read from the raw (overridden) config dict,
    so they are reported even when the schema has problems of its own."""
    p = []
    folders = [("model.name_or_path", "a local Hugging Face folder (save_pretrained)"),
               ("model.tokenizer", "a local folder with tokenizer files")]
    for key, what in folders:
        value = _get(data, key)
        if isinstance(value, str) and not Path(value).is_dir():
            p.append(f"'{key}' = {value!r} does not exist (or is not a folder); it must be {what} "
                     "reachable from the compute nodes")
    for key in ("data.train", "data.eval", "zero.base_config"):
        value = _get(data, key)
        if isinstance(value, str) and not Path(value).exists():
            p.append(f"'{key}' = {value!r} does not exist; fix the path (relative paths are relative to "
                     "the directory you launch from)")
    return p


def run_dir_problems(cfg: RunConfig, allow_done: bool = False) -> list[str]:
    """A run dir belongs to one run: a different config there would mix two runs. The slurm
    section may differ (a resubmission with more time or another partition is the same run)."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
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
        # slurm.* says where and how long a job runs, not what it trains: a resubmission may change it
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith("slurm."))
        if diff:
            p.append(f"run_dir {cfg.run_dir!r} holds a different run's config (differs in: {', '.join(diff)}); "
                     f"choose a new run_dir, or use the config saved there ({saved}) to resume that run")
    if not allow_done and (run_dir / DONE_FILE).exists():
        p.append(f"run_dir {cfg.run_dir!r} holds a finished run ({run_dir / DONE_FILE}); choose a new run_dir "
                 "to train again")
    return p


def ds_config_problems(cfg: RunConfig) -> list[str]:
    """A user base DeepSpeed JSON that contradicts the run config (e.g. fp16 on while dtype is bf16)."""
    from launcher.ds_config import build_ds_config

    try:
        build_ds_config(cfg)
    except ConfigError as e:
        return e.problems
    return []


def load_checked(path: str, overrides: list[str], run_dir: Optional[str] = None,
                 allow_done: bool = False) -> RunConfig:
    """YAML + overrides (+ ``--out`` run dir) -> RunConfig, or one ConfigError with every problem."""
    data = read_yaml(path)
    parsed, problems = parse_overrides(list(overrides))
    data = apply_overrides(data, parsed) if isinstance(data, dict) else data
    if run_dir is not None and isinstance(data, dict):
        data["run_dir"] = run_dir  # set directly: a path is not YAML to be parsed
    cfg = None
    try:
        cfg = validate(data, source=path)
    except ConfigError as e:
        problems += e.problems
    if isinstance(data, dict):
        problems += path_problems(data)
    if cfg is not None:
        problems += run_dir_problems(cfg, allow_done)
        if cfg.zero.base_config is not None and Path(cfg.zero.base_config).is_file():
            problems += ds_config_problems(cfg)
    if problems:
        raise ConfigError(problems, path)
    return cfg
