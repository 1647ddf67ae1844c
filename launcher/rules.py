"""The rules of a run config that need nothing but the config: reading the YAML and the overrides,
the schema, and the cross-field rules.

    validate(data, source, origin)  dict -> a validated RunConfig, or one ConfigError that lists every
                                    schema and cross-field problem

Rules: the YAML itself (launcher/yamlio.py: one key per mapping, YAML 1.2 scalars); the schema
(launcher/config.py, with strict types by field type from launcher/strict.py); cross-field rules of the
model, data, train and ZeRO keys, the task, the method and efficiency settings (here); of a model config's
shape, LoRA targets and Liger (launcher/rules_model.py); of the Slurm section (launcher/rules_slurm.py);
and the batch arithmetic (launcher/batch.py). The disk rules (paths exist and are the right kind, the run
dir can be written and belongs to this run, the model folder can be read, a base DeepSpeed JSON agrees)
live in launcher/rules_disk.py, and the one loader that applies all of them (YAML + overrides -> a
validated RunConfig) in launcher/load.py.
Each message names the key as the user typed it, the value and the fix. Importable without torch.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Optional, Union, get_args

from pydantic import BaseModel, ValidationError

from launcher import yamlio
from launcher.batch import batch_problems
from launcher.config import BNB_OPTIMIZERS, PEFT_METHODS, PER_LABEL_METRICS, TASK_METRICS, RunConfig
from launcher.errors import ConfigError
from launcher.rules_model import hf_config_problems, liger_problems, lora_target_problems
from launcher.rules_slurm import cluster_problems, slurm_problems
from launcher.strict import PathText

# dotted key -> (the scalar as the user wrote it, its line in the YAML file; None = a key=value override)
Origin = dict[str, tuple[str, Optional[int]]]

# --------------------------------------------------------------------------- loading


def read_yaml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A YAML file -> its data (launcher/yamlio.py's strict rules); ConfigError with every problem."""
    data, _ = yamlio.load_file(path)
    return {} if data is None else data


# characters YAML reads as line breaks: in a key=value override they would be folded into spaces
_OVERRIDE_BREAKS = "\n\r\x85\u2028\u2029"


def parse_overrides(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``["train.lr=1e-3", ...]`` -> ({"train.lr": 0.001}, problems). Values are YAML (launcher/yamlio.py)."""
    out: dict[str, Any] = {}
    raw_of: dict[str, str] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value; write it like train.lr=1e-4")
            continue
        if any(not part or part != part.strip() for part in key.split(".")):
            problems.append(f"override {item!r}: the key {key!r} has an empty part (two dots, a dot at either end, "
                            "or spaces); write it like train.lr=1e-4")
            continue
        if key in raw_of:
            problems.append(f"override '{key}' is given twice ({key}={raw_of[key]!r} and {key}={raw!r}); keep one")
            continue
        raw_of[key] = raw
        breaks = sorted({f"U+{ord(c):04X}" for c in raw if c in _OVERRIDE_BREAKS})
        if breaks:
            problems.append(f"override {item!r}: the value holds a line break ({', '.join(breaks)}), which YAML would "
                            f"fold into a space; write it as an escape in a double-quoted YAML string, e.g. "
                            f"{key}=\"a\\nb\"")
            continue
        try:
            out[key] = yamlio.load_value(raw)
        except ConfigError as e:
            problems += [f"override {item!r}: {p}" for p in e.problems]
    for key in out:
        below = [k for k in out if k.startswith(key + ".")]
        if below:
            problems.append(f"overrides set both '{key}' and '{below[0]}' (inside it); the order would decide which "
                            "wins: give one")
    return out, problems


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], problems: Optional[list[str]] = None
                    ) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying). Unknown keys are caught by validation; a key below a
    value that is not a section (``train.lr=1`` when the YAML says ``train: 5``) is a problem."""
    import copy

    found: list[str] = []
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                above = ".".join(parts[:i + 1])
                found.append(f"override {dotted}=...: '{above}' is {node[part]!r} in the config, not a section, so it "
                             f"has no key '{parts[i + 1]}'; fix '{above}' in the YAML file or set {above}=...")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    if problems is None and found:
        raise ConfigError(found)
    (problems if problems is not None else []).extend(found)
    return data

# --------------------------------------------------------------------------- schema


def validate(data: Any, source: str = "config", origin: Optional[Origin] = None) -> RunConfig:
    """dict -> RunConfig, or ConfigError listing every problem. ``origin``: where scalars were written
    (see :data:`Origin`), so that a wrong type is shown as the user wrote it."""
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections (run_dir:, model:, data:, ...), got "
                           f"{_kind(data)}"], source)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe_pydantic_error(err, origin or {}) for err in e.errors()], source) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    t = cfg.train
    if t.global_batch_size is not None:  # the invariant: accumulation is derived (and written nowhere)
        t.grad_accum = t.global_batch_size // (t.micro_batch_size * cfg.world_size)
    return cfg


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__)


def path_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every path field (typed PathStr in launcher/config.py)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if _has_meta(ann, PathText) or any(isinstance(m, PathText) for m in field.metadata):
            keys.append(prefix + name)
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                keys += path_keys(cand, f"{prefix}{name}.")
    return keys


def _has_meta(ann: Any, kind: type) -> bool:
    if any(isinstance(m, kind) for m in getattr(ann, "__metadata__", ())):
        return True
    return any(_has_meta(a, kind) for a in get_args(ann))


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            break
    return model


def _as_written(key: str, value: Any, origin: Origin) -> str:
    raw, line = origin.get(key, (None, None))
    if not raw or not raw.isprintable():
        shown = repr(value)
        return shown if len(shown) <= 80 else shown[:60] + " ... " + shown[-15:]
    return f"{raw} (line {line})" if line else f"{raw} (the {key}= override)"


def _describe_pydantic_error(err: dict[str, Any], origin: Optional[Origin] = None) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    value = err.get("input")
    if kind == "strict_type":
        shown = _as_written(key, value, origin or {})
        return f"'{key}' = {shown}: {err['msg']}; fix it in the YAML file or with {key}=..."
    if kind == "extra_forbidden":
        parent = _section_model(loc[:-1])
        valid = sorted(parent.model_fields)
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'? " if near else ""
        where = ".".join(map(str, loc[:-1])) or "the top level"
        return f"unknown key '{key}' (value {value!r}); {hint}valid keys under {where}: {', '.join(valid)}"
    if kind == "missing":
        return f"missing required key '{key}'; add it to the YAML file or pass {key}=..."
    if kind == "literal_error":
        choices = err.get("ctx", {}).get("expected", "")
        return f"'{key}' = {value!r} is not allowed; choose one of {choices}"
    return f"'{key}' = {value!r}: {err['msg']}; fix the value in the YAML file or with {key}=..."


# --------------------------------------------------------------------------- cross-field rules


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Rules that involve more than one field. Pure; device-independent."""
    p: list[str] = []
    if cfg.model.name_or_path is None and cfg.model.config is None:
        p.append("model: neither 'model.name_or_path' nor 'model.config' is set; give a local "
                 "Hugging Face folder or a config dict for a from-scratch model")
    if cfg.model.name_or_path is not None and cfg.model.config is not None:
        p.append("both 'model.name_or_path' and 'model.config' are set; the folder would be loaded and the config "
                 "dict silently ignored: keep one")
    if cfg.model.config is not None:
        shape = hf_config_problems(cfg.model.config, "model.config")
        p += shape or lora_target_problems(cfg, cfg.model.config, "model.config")
    if cfg.model.name_or_path is None and cfg.model.tokenizer is None:
        p.append("'model.tokenizer' is not set and there is no 'model.name_or_path' to take it "
                 "from; point model.tokenizer at a tokenizer folder")
    if (cfg.train.max_steps is None) == (cfg.train.epochs is None):
        p.append(f"set exactly one of 'train.max_steps' ({cfg.train.max_steps}) and "
                 f"'train.epochs' ({cfg.train.epochs})")
    if cfg.zero.offload_optimizer and cfg.zero.stage == 0:
        p.append("'zero.offload_optimizer' = true needs zero.stage 1, 2 or 3 (it is 0); "
                 "set zero.stage=2 or zero.offload_optimizer=false")
    if cfg.zero.offload_param and cfg.zero.stage != 3:
        p.append(f"'zero.offload_param' = true needs zero.stage=3 (it is {cfg.zero.stage}); "
                 "set zero.stage=3 or zero.offload_param=false")
    if cfg.data.eval is not None and cfg.data.eval_fraction > 0:
        p.append(f"both 'data.eval' ({cfg.data.eval!r}) and 'data.eval_fraction' "
                 f"({cfg.data.eval_fraction}) are set; keep one")
    if cfg.train.warmup_steps and cfg.train.max_steps and cfg.train.warmup_steps > cfg.train.max_steps:
        p.append(f"'train.warmup_steps' = {cfg.train.warmup_steps} exceeds 'train.max_steps' = "
                 f"{cfg.train.max_steps}; lower the warmup")
    p += task_problems(cfg)
    p += efficiency_problems(cfg)
    p += method_problems(cfg)
    p += slurm_problems(cfg)
    t = cfg.train
    batch = batch_problems(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.world_size)
    p += batch
    p += cluster_problems(cfg)
    if t.global_batch_size is not None and "grad_accum" in t.model_fields_set and not batch:
        derived = t.global_batch_size // (t.micro_batch_size * cfg.world_size)
        if t.grad_accum != derived:
            p.append(f"'train.grad_accum' = {t.grad_accum} contradicts 'train.global_batch_size' = "
                     f"{t.global_batch_size}: with micro_batch_size {t.micro_batch_size} x world {cfg.world_size} the "
                     f"accumulation is {derived}; remove train.grad_accum (it is derived from the global batch) or "
                     f"set it to {derived}")
    return p


def task_problems(cfg: RunConfig) -> list[str]:
    """Cross-field rules of the task section (part of cross_field_problems)."""
    t, d, p = cfg.task, cfg.data, []
    if t.type == "causal_lm":
        for key, value in (("labels", t.labels), ("class_weights", t.class_weights),
                           ("text_pair_field", t.text_pair_field)):
            if value is not None:
                p.append(f"'task.{key}' = {value!r} applies to classification, but task.type is 'causal_lm'; "
                         f"set task.type=sequence_classification (or token_classification) or remove task.{key}")
    else:
        if d.format != "text":
            p.append(f"'data.format' = {d.format!r} is for causal_lm; task.type={t.type!r} reads "
                     "data.text_field and the task.*_field columns, so remove data.format")
        if d.packing:
            p.append(f"'data.packing' = true cannot be used with task.type={t.type!r} (every row is one "
                     "example); set data.packing=false")
    if t.type == "token_classification" and t.text_pair_field is not None:
        p.append(f"'task.text_pair_field' = {t.text_pair_field!r}: text pairs are for sequence_classification, "
                 "not token_classification; remove it")
    if t.labels is not None:
        dupes = sorted({x for x in t.labels if t.labels.count(x) > 1})
        if dupes:
            p.append(f"'task.labels' lists {dupes} more than once; each label name must be unique")
        if len(t.labels) < 2:
            p.append(f"'task.labels' = {t.labels!r} needs at least two labels")
    if isinstance(t.class_weights, list):
        if t.labels is None:
            p.append(f"'task.class_weights' = {t.class_weights!r} is a list, which needs 'task.labels' to fix the "
                     "order of the labels; set task.labels, or use task.class_weights=auto")
        elif len(t.class_weights) != len(t.labels):
            p.append(f"'task.class_weights' has {len(t.class_weights)} weights but 'task.labels' has "
                     f"{len(t.labels)} labels; give one weight per label")
    es = t.early_stopping
    if es is not None:
        if d.eval is None and d.eval_fraction == 0:
            p.append("'task.early_stopping' needs an eval split; set data.eval or data.eval_fraction")
        if cfg.train.eval_every == 0:
            p.append("'task.early_stopping' needs evaluations during training; set train.eval_every "
                     "(optimizer steps between evaluations)")
        known = TASK_METRICS[t.type]
        if es.metric not in known and not es.metric.startswith(PER_LABEL_METRICS[t.type]):
            per_label = ", ".join(f"{x}<label>" for x in PER_LABEL_METRICS[t.type])
            p.append(f"'task.early_stopping.metric' = {es.metric!r} is not a metric of task.type={t.type!r}; "
                     f"choose one of {', '.join(known)}" + (f", or a per-label one: {per_label}" if per_label else ""))
    return p


def efficiency_problems(cfg: RunConfig) -> list[str]:
    """Rules of packing, length grouping, the attention backend and Liger (part of cross_field_problems). Pure."""
    m, d, p = cfg.model, cfg.data, []
    if d.packing and d.group_by_length:
        p.append("'data.group_by_length' = true has nothing to do with data.packing=true (packed rows are already "
                 "full); remove data.group_by_length")
    if d.packing and cfg.method.name in ("prefix", "prompt"):
        p.append(f"'data.packing' = true cannot work with method.name={cfg.method.name!r}: peft feeds virtual tokens "
                 "(and drops position ids), so documents in a row would attend to each other; set data.packing=false")
    if m.attn_implementation == "flash_attention_2" and cfg.precision.dtype == "fp32":
        p.append("'model.attn_implementation' = 'flash_attention_2' needs precision.dtype bf16 or fp16 (flash-attention "
                 "has no fp32 kernels); set precision.dtype=bf16, or model.attn_implementation=sdpa")
    if m.liger and cfg.task.type != "causal_lm":
        p.append(f"'model.liger' = true applies to task.type=causal_lm (its fused loss is next-token cross-entropy), "
                 f"not {cfg.task.type!r}; set model.liger=false")
    return p + liger_problems(cfg)


def method_problems(cfg: RunConfig) -> list[str]:
    """Refused method / optimizer / ZeRO combinations (part of cross_field_problems). Pure."""
    m, z, t, p = cfg.method, cfg.zero, cfg.train, []
    name = m.name
    is_peft = name in PEFT_METHODS
    if is_peft and cfg.model.name_or_path is None:
        p.append(f"'method.name' = {name!r} trains an adapter on a pretrained base, but 'model.name_or_path' is "
                 "not set (a from-scratch model.config has no saved base to reload the adapter onto); set "
                 "model.name_or_path to a local Hugging Face folder, or use method.name=full")
    if name == "qlora" and z.stage == 3:
        p.append("'method.name' = 'qlora' cannot run under zero.stage=3: 4-bit quantized weights cannot be "
                 "partitioned by ZeRO-3's initialisation; use zero.stage=2 (or 0/1), or method.name=lora")
    lo = m.lora
    if lo.use_dora and name not in ("lora", "qlora"):
        p.append(f"'method.lora.use_dora' = true applies to method.name lora or qlora, not {name!r}; remove it")
    if lo.use_rslora and name not in ("lora", "qlora"):
        p.append(f"'method.lora.use_rslora' = true applies to method.name lora or qlora, not {name!r}; remove it")
    if lo.use_dora and name in ("lora", "qlora") and z.stage == 3:
        p.append("'method.lora.use_dora' = true cannot run under zero.stage=3: DoRA reads the whole base weight "
                 "(its column norm) outside the layer's forward, where ZeRO-3 has it partitioned (measured: "
                 "'size of tensor a (0) must match'); use zero.stage=2, or method.lora.use_dora=false")
    if name == "adalora" and m.adalora.target_r > lo.r:
        p.append(f"'method.adalora.target_r' = {m.adalora.target_r} exceeds the starting rank 'method.lora.r' = "
                 f"{lo.r}; AdaLoRA only prunes ranks, so lower target_r or raise method.lora.r")
    if name == "adalora" and m.adalora.warmup_fraction + m.adalora.final_fraction >= 1:
        p.append(f"'method.adalora.warmup_fraction' ({m.adalora.warmup_fraction}) + 'method.adalora.final_fraction' "
                 f"({m.adalora.final_fraction}) must be below 1 to leave steps where the rank budget shrinks; "
                 "lower one of them")
    if m.modules_to_save and not is_peft:
        p.append(f"'method.modules_to_save' = {m.modules_to_save!r} applies to peft methods (an adapter saves "
                 "them); with method.name=full use method.freeze to choose what trains")
    if m.merge_adapter and not is_peft:
        p.append("'method.merge_adapter' = true applies to peft methods; method.name=full already exports "
                 "the whole model (checkpoint.export)")
    if m.merge_adapter and name in ("prefix", "prompt"):
        p.append(f"'method.merge_adapter' = true cannot work with method.name={name!r}: virtual tokens are "
                 "extra inputs, not a change to the base weights, so there is nothing to merge; remove it "
                 "and load run_dir/adapter with PeftModel.from_pretrained")
    if name == "prefix" and cfg.model.gradient_checkpointing:
        p.append("'method.name' = 'prefix' cannot run with model.gradient_checkpointing=true: the prefix is "
                 "passed as a key/value cache, which checkpointed layers do not take (peft: 'PREFIX_TUNING does "
                 "not work with gradient checkpointing'); set model.gradient_checkpointing=false, or use "
                 "method.name=prompt or lora")
    if m.merge_adapter and not cfg.checkpoint.export:
        p.append("'method.merge_adapter' = true needs checkpoint.export=true (the merge is part of the export)")
    f = m.freeze
    chosen = [k for k, v in (("train_last_k_blocks", f.train_last_k_blocks), ("trainable_patterns", f.trainable_patterns),
                             ("head_only", f.head_only), ("freeze_embeddings", f.freeze_embeddings)) if v]
    if chosen and is_peft:
        p.append(f"'method.freeze.{chosen[0]}' applies to method.name=full; {name!r} freezes the base itself "
                 "(use method.modules_to_save to train extra modules in full)")
    if len(chosen) > 1:
        p.append(f"method.freeze sets {', '.join('method.freeze.' + c for c in chosen)}; choose one of them")
    if m.unfreeze_every_steps and is_peft:
        p.append(f"'method.unfreeze_every_steps' = {m.unfreeze_every_steps} applies to method.name=full, not "
                 f"{name!r}; remove it")
    if m.unfreeze_every_steps and f.head_only:
        p.append("'method.unfreeze_every_steps' has nothing to unfreeze with method.freeze.head_only=true (only "
                 "the head ever trains); use method.freeze.train_last_k_blocks to bound what unfreezes")
    if m.layer_lr_decay != 1.0 and is_peft:
        p.append(f"'method.layer_lr_decay' = {m.layer_lr_decay} applies to method.name=full, not {name!r}; "
                 "remove it")
    if t.optimizer in BNB_OPTIMIZERS and z.offload_optimizer and not t.allow_bnb_offload:
        p.append(f"'train.optimizer' = {t.optimizer!r} with zero.offload_optimizer=true runs the bitsandbytes step "
                 "on the CPU (slow; DeepSpeed refuses it unless zero_force_ds_cpu_optimizer is false); use "
                 "train.optimizer=adamw (DeepSpeed's CPU Adam) with offload, or set train.allow_bnb_offload=true "
                 "to accept the slow pairing")
    return p
