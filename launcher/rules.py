"""Every rule of a run config, and the one loader that applies them.

    load_config(path, overrides)  YAML + dotted key=value overrides -> a validated RunConfig, or one
                                  ConfigError that lists every problem (schema, cross-field, disk)

The launcher (validate, render, submit, run, job-facts) and the trainer load through it. Rules:
the schema (launcher/config.py, pydantic); cross-field rules of the model, data, train and ZeRO
keys, the task, the method and the Slurm section; the batch arithmetic (launcher/batch.py); and
disk rules (model/data paths exist, the run dir belongs to this run, a base DeepSpeed JSON agrees).
Each message names the key as the user typed it, the value and the fix. Importable without torch.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from launcher import rundir
from launcher.batch import batch_problems
from launcher.config import BNB_OPTIMIZERS, PEFT_METHODS, PER_LABEL_METRICS, TASK_METRICS, RunConfig, flatten, to_dict
from launcher.errors import ConfigError


# --------------------------------------------------------------------------- loading


def read_yaml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; check the path"], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], str(path)) from None
    return data


def parse_overrides(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``["train.lr=1e-3", ...]`` -> ({"train.lr": 0.001}, problems). Values are YAML."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not key=value; write it like train.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out, problems


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying). Unknown keys are caught by validation."""
    import copy

    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None, *,
                run_dir: Optional[str] = None, allow_done: bool = False, disk: bool = True) -> RunConfig:
    """YAML + ``key=value`` overrides (+ ``--out`` run dir) -> RunConfig, or one ConfigError with every
    problem. ``disk``: also check paths and the run dir (see :func:`disk_problems`); relative paths
    resolve against the current directory, as the user typed them. ``allow_done``: a finished run
    dir is fine (render, job-facts: the batch script exits 0 there itself)."""
    data = read_yaml(path)
    parsed, problems = parse_overrides(list(overrides or []))
    data = apply_overrides(data, parsed) if isinstance(data, dict) else data
    if run_dir is not None and isinstance(data, dict):
        data["run_dir"] = run_dir  # set directly: a path is not YAML to be parsed
    cfg = None
    try:
        cfg = validate(data, source=str(path))
    except ConfigError as e:
        problems += e.problems
    if disk and isinstance(data, dict):
        problems += path_problems(data)  # from the raw dict: reported even when the schema has problems
        if cfg is not None:
            problems += run_dir_problems(cfg, allow_done) + ds_config_problems(cfg)
            problems += liger_problems(cfg, disk=True) if cfg.model.config is None else []
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


# --------------------------------------------------------------------------- schema


def validate(data: Any, source: str = "config") -> RunConfig:
    """dict -> RunConfig, or ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(data).__name__}"], source)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe_pydantic_error(err) for err in e.errors()], source) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


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


def _describe_pydantic_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    value = err.get("input")
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
    p += batch_problems(cfg.train.micro_batch_size, cfg.train.grad_accum,
                        cfg.train.global_batch_size, cfg.world_size)
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


# Text causal-LM model types liger-kernel 0.8.5 patches (liger_kernel.transformers.monkey_patch
# MODEL_TYPE_TO_APPLY_LIGER_FN, vision-language entries left out). Kept here: the launcher imports no torch.
LIGER_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "falcon_h1", "gemma", "gemma2", "gemma3_text", "glm4", "granite",
                     "llama", "ministral", "mistral", "mixtral", "nemotron", "olmo2", "olmo3", "phi3", "qwen2", "qwen3",
                     "qwen3_moe", "smollm3")


def model_type_of(cfg: RunConfig, disk: bool = False) -> Optional[str]:
    """The model type: from model.config, or (disk) from the model folder's config.json; None if unknown."""
    if cfg.model.config is not None:
        return cfg.model.config.get("model_type")
    if disk and cfg.model.name_or_path is not None:
        try:
            import json

            return json.loads((Path(cfg.model.name_or_path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    return None


def liger_problems(cfg: RunConfig, disk: bool = False) -> list[str]:
    """model.liger on an architecture Liger has no kernels for (the device is checked at trainer start)."""
    kind = model_type_of(cfg, disk)
    if not cfg.model.liger or kind is None or kind in LIGER_MODEL_TYPES:
        return []
    return [f"'model.liger' = true, but Liger has no kernels for model type {kind!r}; supported: "
            f"{', '.join(LIGER_MODEL_TYPES)}; set model.liger=false (the chunked loss, train.loss_chunk_tokens, "
            "still avoids the full logits)"]


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
def slurm_problems(cfg: RunConfig) -> list[str]:
    """Cross-field rules of the slurm section (part of cross_field_problems). Pure."""
    s, d, p = cfg.slurm, cfg.dist, []
    if s.signal_lead_s >= s.time_min * 60:
        p.append(f"'slurm.signal_lead_s' = {s.signal_lead_s} is not shorter than the time limit 'slurm.time_min' = "
                 f"{s.time_min} min ({s.time_min * 60} s), so the job would be told to stop before it trains; "
                 f"raise slurm.time_min or lower slurm.signal_lead_s")
    if s.gpus_per_node and s.gpus_per_node != d.procs_per_node:
        p.append(f"'slurm.gpus_per_node' = {s.gpus_per_node} but 'dist.procs_per_node' = {d.procs_per_node}: the job "
                 f"starts one rank per GPU, a world of {d.nodes} x {s.gpus_per_node} = {d.nodes * s.gpus_per_node}, "
                 f"not the {cfg.world_size} the batch math plans; set dist.procs_per_node={s.gpus_per_node} (or "
                 "leave slurm.gpus_per_node unset; 0 = CPU-only nodes)")
    if not s.job_name.strip():
        p.append("'slurm.job_name' is empty; give the job a name (e.g. slurm.job_name=finetune)")
    for key in ("partition", "account", "qos", "constraint", "python"):
        value = getattr(s, key)
        if value is not None and not value.strip():
            p.append(f"'slurm.{key}' = {value!r} is empty; remove the key to use the default")
    return p


# --------------------------------------------------------------------------- disk


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
    run_dir = rundir.RunDir(cfg.run_dir)
    saved = run_dir.config
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
    if not allow_done and run_dir.done.exists():
        p.append(f"run_dir {cfg.run_dir!r} holds a finished run ({run_dir.done}); choose a new run_dir "
                 "to train again")
    return p


def ds_config_problems(cfg: RunConfig) -> list[str]:
    """A user base DeepSpeed JSON that contradicts the run config (e.g. fp16 on while dtype is bf16)."""
    from launcher.ds_config import build_ds_config

    if cfg.zero.base_config is None or not Path(cfg.zero.base_config).exists():
        return []  # none, or missing (path_problems says so)
    try:
        build_ds_config(cfg)
    except ConfigError as e:
        return e.problems
    return []


def disk_problems(cfg: RunConfig, allow_done: bool = False) -> list[str]:
    """The disk rules of :func:`load_config` for an already validated config (the trainer runs them
    at start, before anything is written)."""
    return (path_problems(to_dict(cfg)) + run_dir_problems(cfg, allow_done) + ds_config_problems(cfg)
            + (liger_problems(cfg, disk=True) if cfg.model.config is None else []))
