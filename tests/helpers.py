"""Shared test helpers: tiny models, data files, configs, and multi-rank launches."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "examples" / "tiny-tokenizer"
TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 64, "tie_word_embeddings": False}


def env_for_ranks() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def save_tiny_pretrained(folder: Path, **config: Any) -> dict[str, Any]:
    """A tiny Llama (seed 0) + the tiny tokenizer saved as a from_pretrained folder; returns the
    model section that loads it. Keyword arguments override TINY_LLAMA's config."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(TINY_LLAMA, **config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.save_pretrained(str(folder))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, Path(folder) / f.name)
    return {"name_or_path": str(folder), "tokenizer": None, "config": None}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/response rows of varied length (so micro-batches hold different token counts)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pad = " please" * rng.randint(0, 4)
        rows.append({"prompt": f"What is {a} plus {b}{pad}?", "response": f" {a} plus {b} is {a + b}."})
    return rows


def tiny_config(run_dir: Path, train_file: Path, **sections: Any) -> dict[str, Any]:
    """A run config dict for the tiny Llama; keyword sections are merged in (dotted keys allowed)."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir), "seed": 7,
        "model": {"tokenizer": str(TOKENIZER), "config": dict(TINY_LLAMA)},
        "data": {"train": str(train_file), "format": "prompt_response", "max_length": 48},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 6, "lr": 5e-3, "warmup_steps": 0,
                  "scheduler": "constant", "grad_clip": 1.0},
        "zero": {"stage": 2},
        "dist": {"nodes": 1, "procs_per_node": 2},
        "checkpoint": {"every_steps": 0, "export": False},
        "logging": {"every_steps": 100, "progress_bar": False, "peak_tflops": 1.0},
    }
    for key, value in sections.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = {**node[parts[-1]], **value}
        else:
            node[parts[-1]] = value
    if "global_batch_size" in cfg["train"] and "grad_accum" not in sections.get("train", {}):
        del cfg["train"]["grad_accum"]  # derived from the global batch (giving both is refused)
    return copy.deepcopy(cfg)


def launch(scenarios: list[dict], tmp: Path, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run scenarios in one torchrun launch; returns the process (stdout+stderr in .stdout)."""
    spec = tmp / f"spec-{len(list(tmp.glob('spec-*.json')))}.json"
    spec.write_text(json.dumps({"scenarios": scenarios}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "dist_worker.py"), str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_ranks(), capture_output=True, text=True, timeout=timeout)
    proc.stdout = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc


def result(run_dir: Path) -> dict:
    out = json.loads((Path(run_dir) / "worker_result.json").read_text())
    assert "error" not in out, out.get("traceback", out.get("error"))
    return out


def error_of(run_dir: Path) -> Optional[str]:
    return json.loads((Path(run_dir) / "worker_result.json").read_text()).get("error")


def results(run_dir: Path) -> list[dict]:
    """Every scenario run in ``run_dir``, in order (a stopped run, then its resume)."""
    lines = (Path(run_dir) / "worker_results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one logged scalar from metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[tag]) for r in rows if r.get(tag) is not None]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return curve(run_dir, "train/loss")


def assert_stopped_then_resumed(run_dir: Path, output: str, step: int) -> None:
    """The first run in ``run_dir`` really stopped (status preempted) after ``step``, and the next
    one printed that it resumed from that step's checkpoint (a broken stop would finish the first
    run and make the "resume" an already-done no-op)."""
    runs = results(run_dir)
    assert len(runs) >= 2, runs
    first, second = runs[0].get("result", runs[0]), runs[1].get("result", runs[1])
    assert first["status"] == "preempted", first
    assert second["status"] == "done", second
    assert f"resumed from {Path(run_dir) / 'checkpoints' / f'step{step:08d}'} at step {step}" in output


def assert_curves_close(a: list, b: list, rel: float = 1e-4) -> None:
    assert [s for s, _ in a] == [s for s, _ in b], (a, b)
    for (s, x), (_, y) in zip(a, b):
        assert abs(x - y) <= rel * max(abs(x), abs(y)), f"step {s}: {x} vs {y} (rel tol {rel})\n{a}\n{b}"
