"""What rank 0 reports: TensorBoard scalars, metrics.jsonl, one log line, throughput, MFU, memory."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOPs of one training step, counted from the model's shapes (README "Efficiency").

    Per token of a row of width W (forward + backward):
        4 N + 2 N_t + 12 L A W
    N: weights of every matmul (each Linear / Conv1D: in x out; the LM head counts, the embedding
    lookup does not), N_t: those that train, L: layers, A: attention width (heads x head_dim).
    Forward 2N; backward 2N for the activation gradients and 2N_t for the weight gradients; the
    attention matmuls Q K^T and P V cost 2 A W each per token and layer forward, twice that backward,
    over the full W x W square (what sdpa and eager compute). No FLOPs for norms, softmax,
    activations or the embedding lookup. Tested against torch.utils.flop_counter.FlopCounterMode."""
    matmul_params: int
    trainable_matmul_params: int
    layers: int
    attn_width: int

    def per_token(self, width: int) -> float:
        return 4 * self.matmul_params + 2 * self.trainable_matmul_params + 12 * self.layers * self.attn_width * width

    def step(self, shapes) -> float:
        """FLOPs of micro-batches given as (real tokens, row width) pairs: padding does no useful work."""
        return sum(tokens * self.per_token(width) for tokens, width in shapes)


def flop_model(model) -> FlopModel:
    """Count the matmul weights of a built model (also under ZeRO-3 and 4-bit: from module shapes)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    n = n_t = 0
    for name, mod in model.named_modules():
        if "original_module" in name:  # peft modules_to_save: the frozen original beside the trained copy
            continue
        if isinstance(mod, torch.nn.Linear):
            size = mod.in_features * mod.out_features
        elif isinstance(mod, Conv1D):
            size = mod.nx * mod.nf
        else:
            continue
        n += size
        n_t += size if mod.weight.requires_grad else 0
    c = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    heads = getattr(c, "num_attention_heads", 0) or 0
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else 0)
    return FlopModel(n, n_t, getattr(c, "num_hidden_layers", 0) or 0, heads * head_dim)


def memory_gb(device: str) -> tuple[str, float]:
    import torch

    if device.startswith("cuda"):
        return "train/cuda_max_allocated_gb", torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return "train/rss_gb", psutil.Process().memory_info().rss / 2**30


class PeakBytes:
    """Peak bytes the CPU allocator held above its level at the start of a ``with`` block (the CPU has
    no torch.cuda.max_memory_allocated): torch.profiler's memory events (every allocation and free,
    temporaries inside an op included), summed in time order. Measurement only (it records every op)."""

    def __enter__(self) -> "PeakBytes":
        from torch.profiler import ProfilerActivity, profile

        self.peak = 0
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = sorted((e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        now = 0
        for e in events:
            now += e.nbytes()
            self.peak = max(self.peak, now)


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
