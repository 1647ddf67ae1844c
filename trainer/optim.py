"""Optimizer parameter groups and the LR schedule (a pure function of the step)."""
from __future__ import annotations

import math
from typing import Optional

from launcher.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier on the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, t: TrainConfig, offload: bool, groups: Optional[list[dict]] = None):
    """The client optimizer handed to deepspeed.initialize, over ``groups`` (default: the
    decay / no-decay split of every trainable parameter).

    adamw: torch AdamW, or DeepSpeed's CPU Adam when the optimizer state lives on the CPU
    (ZeRO-Offload; DeepSpeed refuses other optimizers there). deepspeed_adamw: FusedAdam
    (CPU Adam under offload). The 8-bit ones are bitsandbytes' (state: 2 bytes/param for Adam,
    1 for Lion, vs 8 in 32-bit); under offload they run on the CPU (train.allow_bnb_offload).
    """
    groups = groups if groups is not None else param_groups(model, t.weight_decay)
    name = t.optimizer
    if name.endswith("8bit"):
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "adam8bit": bnb.optim.Adam8bit,
               "paged_adamw8bit": bnb.optim.PagedAdamW8bit, "lion8bit": bnb.optim.Lion8bit}[name]
        extra = {} if name == "lion8bit" else {"eps": t.eps}
        return cls(groups, lr=t.lr, betas=t.betas, **extra)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, adamw_mode=True)
    if name == "deepspeed_adamw":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, adam_w_mode=True)
    import torch

    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def build_scheduler(optimizer, t: TrainConfig, total_steps: int, unfreeze_every_steps: int = 0):
    """One LR multiplier per parameter group, a pure function of the step: the warmup/decay
    schedule times the group's gradual-unfreezing gate (0 until its unit unfreezes). Each
    group's own base LR (layer-wise decay) is what the multiplier scales."""
    import torch

    from trainer.layerwise import unfrozen

    def group_factor(depth: Optional[int]):
        def factor(s: int) -> float:
            gate = 1.0 if depth is None or unfrozen(depth, s, unfreeze_every_steps) else 0.0
            return gate * lr_factor(s, t.warmup_steps, total_steps, t.scheduler, t.min_lr_ratio)
        return factor

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [group_factor(g.get("depth")) for g in optimizer.param_groups])


def group_lrs(optimizer) -> dict[str, float]:
    """train/lr/<group name> for every parameter group (the LR the coming step uses)."""
    return {f"train/lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}


class GradNorm:
    """The global gradient norm before clipping, for the log (a 0-d tensor or a float; None when
    unknown). DeepSpeed reports it (engine.get_global_grad_norm) on every path but its plain fp32
    ZeRO-0 one, which clips with the norm and drops it; there it is computed here from the
    all-reduced gradients just before the optimizer step (the engine all-reduces them in the last
    backward of the window)."""

    def __init__(self, engine):
        self.engine = engine
        self.own = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
        self.value = None

    def before_step(self) -> None:
        if self.own:
            import torch

            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self.value = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def after_step(self):
        return self.value if self.own else self.engine.get_global_grad_norm()
