"""RunConfig -> DeepSpeed config dict. Pure: no disk, no torch, explicit numbers only.

``OWNED`` maps each DeepSpeed key we set to the run-config field that owns it. A user base
JSON (``zero.base_config``) may add keys we do not own; if it contradicts an owned key, that
is one error listing every mismatch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from launcher.batch import BatchPlan, plan_batch
from launcher.config import ConfigError, RunConfig, flatten

# DeepSpeed key path -> the run-config key that owns it (what the user should change instead).
OWNED: dict[str, str] = {
    "train_batch_size": "train.global_batch_size / micro_batch_size x grad_accum x world",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "precision.dtype",
    "fp16.enabled": "precision.dtype",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.offload_optimizer.device": "zero.offload_optimizer",
    "zero_optimization.offload_param.device": "zero.offload_param",
    "zero_optimization.stage3_param_persistence_threshold": "zero.param_persistence_threshold",
    "zero_optimization.overlap_comm": "zero.overlap_comm",
    "zero_optimization.reduce_bucket_size": "zero.reduce_bucket_size",
    "optimizer": "train.optimizer (the trainer builds the optimizer)",
    "scheduler": "train.scheduler (the trainer builds the scheduler)",
    "zero_force_ds_cpu_optimizer": "train.allow_bnb_offload (with a bitsandbytes train.optimizer)",
}


def render_ds_config(cfg: RunConfig, plan: Optional[BatchPlan] = None) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` (and the batch plan of the world it runs in)."""
    t, z = cfg.train, cfg.zero
    plan = plan or plan_batch(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.world_size)
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu" if z.offload_optimizer else "none", "pin_memory": False}
    if z.stage == 3:
        zero.update({
            "offload_param": {"device": "cpu" if z.offload_param else "none", "pin_memory": False},
            "stage3_param_persistence_threshold": z.param_persistence_threshold,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    dtype = cfg.precision.dtype
    out: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # We always hand DeepSpeed a client optimizer built by the trainer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if z.offload_optimizer and t.optimizer.endswith("8bit"):  # bnb under offload (allowed by opt-in only)
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def _deep_merge(base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in ours.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_base(base: dict[str, Any], rendered: dict[str, Any], source: str) -> dict[str, Any]:
    """Merge a user DeepSpeed JSON under ours; any owned key it sets differently is an error."""
    flat_base, flat_ours = flatten(base), flatten(rendered)
    mismatches = []
    for key, value in sorted(flat_base.items()):
        owner = next((OWNED[o] for o in OWNED if key == o or key.startswith(o + ".")), None)
        if owner is None or value == "auto":
            continue
        if key.startswith(("optimizer", "scheduler")):
            mismatches.append(f"'{key}' = {value!r} in {source}: the trainer builds the optimizer and "
                              f"scheduler; remove it and use {owner}")
        elif key in flat_ours and flat_ours[key] != value:
            mismatches.append(f"'{key}' = {value!r} in {source} contradicts the run config, which gives "
                              f"{flat_ours[key]!r}; remove it from the JSON or set {owner}")
    if mismatches:
        raise ConfigError(mismatches, source)
    base = {k: v for k, v in base.items() if k not in ("optimizer", "scheduler")}
    return _deep_merge(base, rendered)


def build_ds_config(cfg: RunConfig, plan: Optional[BatchPlan] = None) -> dict[str, Any]:
    """Rendered config, merged with the user's base JSON when one is configured."""
    rendered = render_ds_config(cfg, plan)
    if cfg.zero.base_config is None:
        return rendered
    path = Path(cfg.zero.base_config)
    try:
        base = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"'zero.base_config' = {str(path)!r} does not exist; fix the path or remove the key"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"'zero.base_config' = {str(path)!r} is not valid JSON ({e})"]) from None
    return merge_base(base, rendered, str(path))
