"""Partial fine-tuning, gradual unfreezing and layer-wise LR decay as plain functions of names.

A model is cut into *units* by depth from the top:

    depth 0        the head: every parameter after the last transformer block
                   (final norm, lm_head / classifier / pooler)
    depth 1..L     block L-1 (the top block) .. block 0
    depth L+1      the embeddings: every parameter before the first block

Layer-wise LR decay gives a unit ``lr x decay^depth``. Gradual unfreezing trains unit ``d`` from
optimizer step ``d x every`` on (the head from the start, then one more block per ``every``
steps, top down). DeepSpeed fixes the optimizer's parameter set at ``deepspeed.initialize``, so a
not-yet-unfrozen unit is *in* the optimizer with an LR multiplier of exactly 0: its weights do not
move (Adam's update and decoupled weight decay are both scaled by the LR), while its gradients are
still computed and its Adam moments warm up. Units that never train (outside the freeze
selection) have ``requires_grad=False`` and get no optimizer state at all.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

HEAD, EMBEDDINGS = "head", "embeddings"


class FreezeError(ValueError):
    pass


def find_blocks(model) -> tuple[str, int]:
    """(qualified name of the ModuleList holding the transformer blocks, number of blocks): the
    ModuleList with the most parameters (model.layers, encoder.layer, transformer.h, ...)."""
    import torch

    best, best_n, n_blocks = None, -1, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(getattr(p, "ds_numel", 0) or p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n, n_blocks = name, n, len(mod)
    if best is None:
        raise FreezeError(f"{type(model).__name__} has no list of transformer blocks (nn.ModuleList); "
                          "use method.freeze.trainable_patterns to choose trainable parameters by name")
    return best, n_blocks


def depths(names: list[str], blocks: str, n_blocks: int) -> dict[str, int]:
    """Depth from the top of every parameter name (in model order). Pure."""
    prefix = blocks + "."
    out: dict[str, int] = {}
    seen_block = False
    for name in names:
        if name.startswith(prefix):
            seen_block = True
            out[name] = n_blocks - int(name[len(prefix):].split(".")[0])
        else:
            out[name] = 0 if seen_block else n_blocks + 1
    return out


def unit_name(depth: int, n_blocks: int) -> str:
    if depth == 0:
        return HEAD
    if depth == n_blocks + 1:
        return EMBEDDINGS
    return f"block{n_blocks - depth}"


def select_trainable(names: list[str], depth: dict[str, int], n_blocks: int,
                     train_last_k_blocks: Optional[int] = None, trainable_patterns: Iterable[str] = (),
                     head_only: bool = False, freeze_embeddings: bool = False) -> set[str]:
    """Names that train under the freeze selection (all of them when nothing is chosen). Pure."""
    patterns = list(trainable_patterns)
    if train_last_k_blocks is not None:
        if train_last_k_blocks > n_blocks:
            raise FreezeError(f"'method.freeze.train_last_k_blocks' = {train_last_k_blocks} but the model has "
                              f"{n_blocks} blocks; use at most {n_blocks} (or method.freeze.freeze_embeddings)")
        return {n for n in names if depth[n] <= train_last_k_blocks}
    if patterns:
        out: set[str] = set()
        for pat in patterns:
            hits = {n for n in names if re.search(pat, n)}
            if not hits:
                raise FreezeError(f"'method.freeze.trainable_patterns' entry {pat!r} matches no parameter; names "
                                  f"look like {', '.join(names[:3] + names[-3:])} (regex, re.search)")
            out |= hits
        return out
    if head_only:
        return {n for n in names if depth[n] == 0}
    if freeze_embeddings:
        return {n for n in names if depth[n] != n_blocks + 1}
    return set(names)


def unfrozen(depth: int, step: int, every: int) -> bool:
    """Gradual unfreezing: is a unit at this depth trained at optimizer step ``step`` (0-based)?"""
    return every == 0 or depth <= step // every


def lr_multiplier(depth: int, step: int, decay: float, every: int) -> float:
    """Per-group LR multiplier on train.lr (before the schedule's own factor)."""
    return decay ** depth if unfrozen(depth, step, every) else 0.0


def layer_groups(named_params: list, trainable: set[str], depth: dict[str, int], n_blocks: int,
                 lr: float, decay: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups, one per (unit, decay/no-decay), top unit first, each with its
    base LR ``lr x decay^depth`` and a ``depth`` that the scheduler uses for unfreezing."""
    by_key: dict[tuple[int, bool], list] = {}
    for name, p in named_params:
        if name in trainable:
            matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
            by_key.setdefault((depth[name], matrix), []).append(p)
    groups = []
    for (d, matrix), params in sorted(by_key.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        groups.append({"params": params, "name": unit_name(d, n_blocks), "depth": d,
                       "lr": lr * decay ** d, "weight_decay": weight_decay if matrix else 0.0})
    return groups
