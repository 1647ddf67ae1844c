"""RunConfig -> DeepSpeed config dict. Pure: no disk (but for reading a base JSON), no torch,
explicit numbers only.

ONE table, :data:`TABLE`, drives both the rendering and the merge with a user's base JSON
(``zero.base_config``). Each DeepSpeed key in it is either

- **owned**: the run config sets it (``owner`` names the run-config key). A base JSON that gives it a
  different value is an error naming both values and the key to change instead; or
- a **default**: we set it unless the base JSON does, in which case the base's value is used.

Keys the table does not know pass through from the base JSON untouched. ``"auto"`` (the Hugging
Face Trainer's placeholder) counts as "not set". All contradictions are reported in one error.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.batch import BatchPlan, plan_batch
from launcher.config import ConfigError, RunConfig, flatten

Value = Callable[[RunConfig, BatchPlan], Any]


@dataclass(frozen=True)
class Key:
    path: str  # dotted DeepSpeed key
    value: Value  # what we render
    owner: Optional[str] = None  # the run-config key that owns it; None = a default the base JSON may change
    when: Callable[[RunConfig], bool] = lambda c: True  # rendered only when this holds
    note: str = ""  # why it is owned, when the owner alone does not say


def _const(v: Any) -> Value:
    return lambda c, p: v


def _stage(*stages: int) -> Callable[[RunConfig], bool]:
    return lambda c: c.zero.stage in stages


def _bnb_offload(c: RunConfig) -> bool:  # a bitsandbytes optimizer under optimizer offload (opt-in)
    return c.zero.offload_optimizer and c.train.optimizer.endswith("8bit")


_Z = "zero_optimization."
TABLE: tuple[Key, ...] = (
    Key("train_batch_size", lambda c, p: p.global_batch_size,
        "train.global_batch_size / micro_batch_size x grad_accum x world"),
    Key("train_micro_batch_size_per_gpu", lambda c, p: p.micro_batch_size, "train.micro_batch_size"),
    Key("gradient_accumulation_steps", lambda c, p: p.grad_accum, "train.grad_accum"),
    Key("gradient_clipping", lambda c, p: c.train.grad_clip, "train.grad_clip"),
    Key("bf16.enabled", lambda c, p: c.precision.dtype == "bf16", "precision.dtype"),
    # A NaN/Inf gradient norm skips the step (its update is never applied); DeepSpeed's ZeRO-1/2 bf16 path
    # checks only with this on (trainer/faults.py).
    Key("bf16.check_grad_overflow", _const(True), "train.on_nonfinite", when=lambda c: c.precision.dtype == "bf16",
        note="a step with a non-finite gradient norm is never applied, whatever train.on_nonfinite says"),
    Key("fp16.enabled", lambda c, p: c.precision.dtype == "fp16", "precision.dtype"),
    Key("fp16.loss_scale", _const(0)),  # 0 = dynamic loss scaling
    Key("fp16.initial_scale_power", _const(16)),
    Key("fp16.loss_scale_window", _const(1000)),
    Key("fp16.hysteresis", _const(2)),
    Key("fp16.min_loss_scale", _const(1)),
    Key(_Z + "stage", lambda c, p: c.zero.stage, "zero.stage"),
    Key(_Z + "overlap_comm", lambda c, p: c.zero.overlap_comm, "zero.overlap_comm"),
    Key(_Z + "contiguous_gradients", _const(True)),
    Key(_Z + "reduce_bucket_size", lambda c, p: c.zero.reduce_bucket_size, "zero.reduce_bucket_size"),
    Key(_Z + "offload_optimizer.device", lambda c, p: "cpu" if c.zero.offload_optimizer else "none",
        "zero.offload_optimizer", when=_stage(1, 2, 3)),
    Key(_Z + "offload_optimizer.pin_memory", _const(False), when=_stage(1, 2, 3)),
    Key(_Z + "offload_param.device", lambda c, p: "cpu" if c.zero.offload_param else "none",
        "zero.offload_param", when=_stage(3)),
    Key(_Z + "offload_param.pin_memory", _const(False), when=_stage(3)),
    Key(_Z + "stage3_param_persistence_threshold", lambda c, p: c.zero.param_persistence_threshold,
        "zero.param_persistence_threshold", when=_stage(3)),
    Key(_Z + "stage3_prefetch_bucket_size", _const(50_000_000), when=_stage(3)),
    Key(_Z + "stage3_max_live_parameters", _const(1_000_000_000), when=_stage(3)),
    Key(_Z + "stage3_max_reuse_distance", _const(1_000_000_000), when=_stage(3)),
    Key(_Z + "stage3_gather_16bit_weights_on_model_save", _const(True), when=_stage(3)),
    # We always hand DeepSpeed a client optimizer built by the trainer.
    Key("zero_allow_untested_optimizer", _const(True), "train.optimizer",
        note="the trainer hands DeepSpeed its own optimizer"),
    Key("steps_per_print", _const(1_000_000_000)),
    Key("wall_clock_breakdown", _const(False)),
    Key("zero_force_ds_cpu_optimizer", _const(False), "train.allow_bnb_offload (with a bitsandbytes train.optimizer)",
        when=_bnb_offload),
    # Owned but never rendered: the trainer builds the optimizer and the LR schedule itself.
    Key("optimizer", _const(None), "train.optimizer", when=lambda c: False,
        note="the trainer builds the optimizer and scheduler"),
    Key("scheduler", _const(None), "train.scheduler", when=lambda c: False,
        note="the trainer builds the optimizer and scheduler"),
    # Owned, rendered only by the trainer (``also``) when it resumes a checkpoint written by another
    # world size: DeepSpeed then loads the checkpoint's universal form (trainer/elastic.py).
    Key("checkpoint.load_universal", _const(True), "dist.on_world_mismatch", when=lambda c: False,
        note="the trainer sets it when it resumes a checkpoint written by a different world size"),
)
LOAD_UNIVERSAL = "checkpoint.load_universal"
# DeepSpeed key -> the run-config key that owns it.
OWNED: dict[str, str] = {k.path: k.owner for k in TABLE if k.owner}


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[leaf] = value


def _plan(cfg: RunConfig, plan: Optional[BatchPlan]) -> BatchPlan:
    t = cfg.train
    return plan or plan_batch(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.world_size)


def render_ds_config(cfg: RunConfig, plan: Optional[BatchPlan] = None, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` (and the batch plan of the world it runs in): every
    table key whose condition holds, and the table keys named in ``also`` (the trainer's
    start-time keys, e.g. LOAD_UNIVERSAL), in table order."""
    plan = _plan(cfg, plan)
    out: dict[str, Any] = {}
    for key in TABLE:
        if key.when(cfg) or key.path in also:
            _set(out, key.path, key.value(cfg, plan))
    return out


def _owner_of(key: str) -> Optional[Key]:
    """The owned table entry at ``key`` or above it (``optimizer.type`` belongs to ``optimizer``)."""
    return next((k for k in TABLE if k.owner and (key == k.path or key.startswith(k.path + "."))), None)


def merge_base(base: dict[str, Any], cfg: RunConfig, plan: Optional[BatchPlan], source: str,
               also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The rendered config with a user base JSON: base keys we do not own pass through, base values
    replace our defaults, and any owned key the base sets differently is an error (all at once)."""
    rendered = render_ds_config(cfg, plan, also)
    ours = flatten(rendered)
    mismatches = []
    out = copy.deepcopy(rendered)
    for key, value in flatten(base).items():
        if value == "auto":
            continue
        owned = _owner_of(key)
        if owned is not None:
            if key not in ours:
                why = owned.note or "the run config sets it"
                mismatches.append(f"'{key}' = {value!r} in {source}: {why}; remove it from the JSON and use "
                                  f"{owned.owner}")
            elif ours[key] != value:
                mismatches.append(f"'{key}' = {value!r} in {source} contradicts the run config, which gives "
                                  f"{ours[key]!r}; remove it from the JSON or set {owned.owner}")
            continue
        below = [k for k in OWNED if k.startswith(key + ".")]
        if below and not isinstance(value, dict):
            mismatches.append(f"'{key}' = {value!r} in {source} must be a section: the run config sets "
                              f"{below[0]} ({OWNED[below[0]]}); remove it from the JSON")
            continue
        if isinstance(value, dict) and not value:
            continue  # an empty section adds nothing
        _set(out, key, value)  # a default replaced, or a key we do not know
    if mismatches:
        raise ConfigError(mismatches, source)
    return out


def read_base(path_str: str) -> dict[str, Any]:
    """The user's base DeepSpeed JSON: a file holding one JSON object."""
    path = Path(path_str)
    key = f"'zero.base_config' = {path_str!r}"
    if not path.exists():
        raise ConfigError([f"{key} does not exist; fix the path or remove the key"])
    if not path.is_file():
        raise ConfigError([f"{key} is not a file; point it at a DeepSpeed JSON file"])
    try:
        base = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{key} is not UTF-8 text (a binary file?); point it at a DeepSpeed JSON file"]) from None
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested past Python's stack
        raise ConfigError([f"{key} is not valid JSON ({e})"]) from None
    except OSError as e:
        raise ConfigError([f"{key} cannot be read ({e.strerror}); check its permissions"]) from None
    if not isinstance(base, dict):
        raise ConfigError([f"{key} holds a JSON {type(base).__name__}, not an object; a DeepSpeed config is "
                           "one JSON object ({...})"])
    return base


def build_ds_config(cfg: RunConfig, plan: Optional[BatchPlan] = None, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """Rendered config, merged with the user's base JSON when one is configured."""
    if cfg.zero.base_config is None:
        return render_ds_config(cfg, plan, also)
    return merge_base(read_base(cfg.zero.base_config), cfg, plan, cfg.zero.base_config, also)
