"""What rank 0 reports: TensorBoard scalars, metrics.jsonl, one log line, throughput, MFU, memory."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from launcher.rundir import RunDir

# Dense bf16 tensor-core peak TFLOP/s per device, by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0,
    "RTX 4090": 165.2, "RTX 3090": 71.0, "MI300X": 1307.4, "MI250X": 383.0,
}


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(n_params: int, n_trainable: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Forward 2N + backward 2N (activations) + 2N_trainable (weights), plus attention scores
    (12 * layers * hidden * seq for forward+backward). Full fine-tuning gives the usual 6N."""
    return 4 * n_params + 2 * n_trainable + 12 * n_layers * hidden * seq_len


def memory_gb(device: str) -> tuple[str, float]:
    import torch

    if device.startswith("cuda"):
        return "train/cuda_max_allocated_gb", torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return "train/rss_gb", psutil.Process().memory_info().rss / 2**30


class Monitor:
    """Rank 0 writes; other ranks get a Monitor whose methods do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.metrics = None
        if enabled:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard))
            self.metrics = RunDir(run_dir).metrics.open("a")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, v in values.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(tag, v, step)
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.metrics.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_loss_curve(run_dir: Path) -> Optional[Path]:
    """loss_curve.png beside the logs, for people without a TensorBoard server."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train/loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval/loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name, parse_math=False)  # a `$` in a run dir name is text, not TeX
    ax.legend()
    fig.tight_layout()
    out = RunDir(run_dir).loss_curve
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
