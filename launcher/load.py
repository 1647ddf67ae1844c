"""The one loader of a run config, for the launcher and the trainer.

    load_config(path, overrides)  YAML + dotted key=value overrides -> a validated RunConfig, or one
                                  ConfigError that lists every problem (schema, cross-field, disk)

The launcher (validate, render, submit, run, job-facts) and the trainer load through it. It applies
the config rules (launcher/rules.py, with launcher/rules_model.py and launcher/rules_slurm.py) and the
disk rules (launcher/rules_disk.py). Importable without torch.
"""
from __future__ import annotations

import os
from typing import Optional, Union

from launcher import yamlio
from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.rules import apply_overrides, parse_overrides, validate
from launcher.rules_disk import disk_problems, path_problems


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None, *,
                run_dir: Optional[str] = None, allow_done: bool = False, disk: bool = True) -> RunConfig:
    """YAML + ``key=value`` overrides (+ ``--out`` run dir) -> RunConfig, or one ConfigError with every
    problem. ``disk``: also check paths and the run dir (see :func:`disk_problems`); relative paths
    resolve against the current directory, as the user typed them. ``allow_done``: a finished run
    dir is fine (render, job-facts: the batch script exits 0 there itself)."""
    data, origin = yamlio.load_file(path)
    data = {} if data is None else data
    parsed, problems = parse_overrides(list(overrides or []))
    if isinstance(data, dict):
        data = apply_overrides(data, parsed, problems)
        for key in parsed:  # the value as written is now the override's
            origin = {k: v for k, v in origin.items() if k != key and not k.startswith(key + ".")}
        origin.update({k: (raw, None) for k, raw in _override_text(overrides or []).items()})
    if run_dir is not None and isinstance(data, dict):
        if "run_dir" in parsed:
            problems.append(f"run_dir is given twice: --out {run_dir!r} and the override "
                            f"run_dir={parsed['run_dir']!r}; keep one")
        data["run_dir"] = run_dir  # set directly: a path is not YAML to be parsed
        origin.pop("run_dir", None)
    cfg = None
    path = yamlio.shown_path(path)  # loaded, so it is printable
    try:
        cfg = validate(data, source=str(path), origin=origin)
    except ConfigError as e:
        problems += e.problems
    if disk and isinstance(data, dict):
        problems += path_problems(data)  # from the raw dict: reported even when the schema has problems
        if cfg is not None:
            problems += disk_problems(cfg, allow_done, paths=False)
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def _override_text(items: list[str]) -> dict[str, str]:
    return {k.strip(): raw for k, sep, raw in (i.partition("=") for i in items) if sep}

