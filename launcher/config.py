"""The one typed run config: YAML + dotted ``key=value`` overrides -> ``RunConfig``.

Importable without torch (the launcher and the trainer share it). Every problem in a
config is collected and reported at once, each naming the key as the user typed it,
the value, and the fix. After :func:`load_config` returns, consumers trust the object.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.batch import batch_problems
from launcher.errors import ConfigError  # noqa: F401  (re-exported)
from launcher.slurm import slurm_problems
from launcher.method_config import MethodConfig, method_problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class ModelConfig(_Section):
    # Local Hugging Face folder (from_pretrained) ...
    name_or_path: Optional[str] = None
    # ... or a transformers config dict to build a from-scratch model (e.g. a tiny Llama).
    config: Optional[dict[str, Any]] = None
    # Tokenizer folder; defaults to name_or_path.
    tokenizer: Optional[str] = None
    gradient_checkpointing: bool = False


class DataConfig(_Section):
    train: str
    eval: Optional[str] = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["text", "prompt_response", "chat"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    max_length: int = Field(512, gt=1)
    mask_prompt: bool = True
    packing: bool = False


class TrainConfig(_Section):
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    # When set, the invariant: accumulation is derived from it and the world size.
    global_batch_size: Optional[int] = Field(None, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    epochs: Optional[float] = Field(None, gt=0)
    lr: float = Field(1e-4, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    # adamw: torch AdamW (DeepSpeed CPU Adam under optimizer offload); deepspeed_adamw: FusedAdam /
    # DeepSpeedCPUAdam; the rest are bitsandbytes 8-bit optimizers (see docs/methods.md).
    optimizer: Literal["adamw", "deepspeed_adamw", "adamw8bit", "adam8bit", "paged_adamw8bit", "lion8bit"] = "adamw"
    # Opt-in: a bitsandbytes optimizer with zero.offload_optimizer (its step then runs on the CPU; slow).
    allow_bnb_offload: bool = False
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    eval_max_batches: int = Field(0, ge=0)  # 0 = whole eval split


class PrecisionConfig(_Section):
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


class ZeroConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    # ZeRO-3: params below this many elements stay gathered. Tiny test models need 0.
    param_persistence_threshold: int = Field(100_000, ge=0)
    overlap_comm: bool = False
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    # A user DeepSpeed JSON merged under ours; contradicting an owned key is an error.
    base_config: Optional[str] = None


class DistConfig(_Section):
    nodes: int = Field(1, gt=0)
    procs_per_node: int = Field(1, gt=0)  # GPUs per node (or CPU ranks per node)
    # What the trainer does when the world it wakes up in differs from nodes*procs_per_node.
    on_world_mismatch: Literal["adapt", "error"] = "adapt"


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0)  # 0 = only at the end
    keep_last: int = Field(2, gt=0)
    resume: bool = True
    export: bool = True


class LoggingConfig(_Section):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    # Peak dense TFLOP/s per device for MFU; None = look the GPU up in a table.
    peak_tflops: Optional[float] = Field(None, gt=0)
    progress_bar: bool = True


class SlurmConfig(_Section):
    job_name: str = "finetune"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = Field(60, gt=0)
    cpus_per_task: int = Field(8, gt=0)
    mem_gb: Optional[int] = Field(None, gt=0)
    # GPUs requested per node; None = dist.procs_per_node, 0 = CPU-only (no --gpus-per-node line).
    gpus_per_node: Optional[int] = Field(None, ge=0)
    # Preemption: Slurm sends this signal signal_lead_s before the time limit; the job
    # checkpoints at the next optimizer step and requeues itself up to max_requeues times.
    signal: Literal["USR1", "USR2"] = "USR2"
    signal_lead_s: int = Field(120, gt=0)
    max_requeues: int = Field(3, ge=0)
    # Shell lines run before launch: module loads, venv/conda activation, NCCL variables.
    env_setup: list[str] = []
    # Python on the compute nodes; None = the interpreter running `python -m launcher`.
    python: Optional[str] = None


# Metrics each task logs (as eval/<name>); early_stopping.metric must be one of them, or a
# per-label one: eval/f1/<label> (also precision/, recall/) and, for NER, eval/entity_f1/<TYPE>.
_AVERAGED = [f"{m}_{a}" for a in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1")]
TASK_METRICS: dict[str, list[str]] = {
    "causal_lm": ["eval/loss", "eval/ppl"],
    "sequence_classification": ["eval/loss", "eval/accuracy", *(f"eval/{m}" for m in _AVERAGED)],
    "token_classification": ["eval/loss", "eval/accuracy", *(f"eval/{m}" for m in _AVERAGED),
                             *(f"eval/entity_{m}" for m in _AVERAGED)],
}
PER_LABEL_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": (),
    "sequence_classification": ("eval/precision/", "eval/recall/", "eval/f1/"),
    "token_classification": ("eval/precision/", "eval/recall/", "eval/f1/", "eval/entity_precision/",
                             "eval/entity_recall/", "eval/entity_f1/"),
}


class EarlyStoppingConfig(_Section):
    # The metric that picks the best checkpoint (the export is that step's weights) and that
    # early stopping watches, as logged: eval/loss, eval/accuracy, eval/f1_macro, ...
    metric: str = "eval/loss"
    # max or min; null = min for eval/loss and eval/ppl, max for everything else.
    mode: Optional[Literal["max", "min"]] = None
    # Stop after this many evaluations in a row without improvement; null = never stop early
    # (the best checkpoint is still selected).
    patience: Optional[int] = Field(None, gt=0)
    # An improvement must beat the best value so far by more than this.
    min_delta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _default_mode(self):
        if self.mode is None:
            self.mode = "min" if self.metric in ("eval/loss", "eval/ppl") else "max"
        return self


class TaskConfig(_Section):
    type: Literal["causal_lm", "sequence_classification", "token_classification"] = "causal_lm"
    # sequence_classification: the text is data.text_field; a second text of a pair (premise /
    # hypothesis, question / passage) is text_pair_field; the class is label_field.
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    # token_classification: a list of words and one tag per word, as in CoNLL-2003.
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    # Label names in id order; null = read from the train split (sorted; "O" first for tags).
    # Integer labels in the data index this list.
    labels: Optional[list[str]] = None
    # Loss weight per label: "auto" = inverse frequency in the train split (n / (k * n_label)),
    # a list in the order of `labels`, or null = unweighted.
    class_weights: Optional[Union[Literal["auto"], list[float]]] = None
    early_stopping: Optional[EarlyStoppingConfig] = None

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_shape(cls, v):
        ok = v is None or v == "auto" or (isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v))
        if not ok:
            raise ValueError("must be 'auto', a list of non-negative numbers (one per label, in the order "
                             "of task.labels), or null")
        return v


class RunConfig(_Section):
    run_dir: str
    seed: int = 42
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    precision: PrecisionConfig = PrecisionConfig()
    zero: ZeroConfig = ZeroConfig()
    dist: DistConfig = DistConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    slurm: SlurmConfig = SlurmConfig()
    method: MethodConfig = MethodConfig()
    task: TaskConfig = TaskConfig()

    @property
    def world_size(self) -> int:
        return self.dist.nodes * self.dist.procs_per_node


# --------------------------------------------------------------------------- overrides


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


# --------------------------------------------------------------------------- validation


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


def task_problems(cfg: "RunConfig") -> list[str]:
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
    p += method_problems(cfg)
    p += slurm_problems(cfg)
    p += batch_problems(cfg.train.micro_batch_size, cfg.train.grad_accum,
                        cfg.train.global_batch_size, cfg.world_size)
    return p


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


def read_yaml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; check the path"], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], str(path)) from None
    return data


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None) -> RunConfig:
    """Read YAML, apply ``key=value`` overrides, validate once; relative paths resolve
    against the current directory (as the user typed them)."""
    data = read_yaml(path)
    parsed, problems = parse_overrides(list(overrides or []))
    if problems:
        raise ConfigError(problems, str(path))
    return validate(apply_overrides(data, parsed), source=str(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
