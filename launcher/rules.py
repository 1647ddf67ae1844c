"""Every rule of a run config, and the one loader that applies them.

    load_config(path, overrides)  YAML + dotted key=value overrides -> a validated RunConfig, or one
                                  ConfigError that lists every problem (schema, cross-field, disk)

The launcher (validate, render, submit, run, job-facts) and the trainer load through it. Rules: the
YAML itself (launcher/yamlio.py: one key per mapping, YAML 1.2 scalars); the schema (launcher/config.py,
with strict types by field type from launcher/strict.py); cross-field rules of the model, data, train
and ZeRO keys, the task, the method and the Slurm section; the batch arithmetic (launcher/batch.py); and
disk rules (paths exist and are the right kind, the run dir can be written and belongs to this run, the
model folder can be read, a base DeepSpeed JSON agrees).
Each message names the key as the user typed it, the value and the fix. Importable without torch.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args

from pydantic import BaseModel, ValidationError

from launcher import rundir, yamlio
from launcher.batch import batch_problems
from launcher.config import (BNB_OPTIMIZERS, PEFT_METHODS, PER_LABEL_METRICS, RESUBMIT_FREE_KEYS, TASK_METRICS,
                             RunConfig, flatten, to_dict)
from launcher.errors import ConfigError
from launcher.memory import HF_CONFIG, LLAMA_LIKE, read_model_folder
from launcher.slurm import SENTINEL, env_setup_probes, env_setup_problems
from launcher.strict import PathText, path_text_ok

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


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None, *,
                run_dir: Optional[str] = None, allow_done: bool = False, disk: bool = True) -> RunConfig:
    """YAML + ``key=value`` overrides (+ ``--out`` run dir) -> RunConfig, or one ConfigError with every
    problem. ``disk``: also check paths and the run dir (see :func:`disk_problems`); relative paths
    resolve against the current directory, as the user typed them. ``allow_done``: a finished run
    dir is fine (render, job-facts: the batch script exits 0 there itself)."""
    data, origin = yamlio.load_file(path)
    data = {} if data is None else data
    parsed, problems = parse_overrides(list(overrides or []))
    if isinstance(data, dict):
        data = apply_overrides(data, parsed, problems)
        for key in parsed:  # the value as written is now the override's
            origin = {k: v for k, v in origin.items() if k != key and not k.startswith(key + ".")}
        origin.update({k: (raw, None) for k, raw in _override_text(overrides or []).items()})
    if run_dir is not None and isinstance(data, dict):
        if "run_dir" in parsed:
            problems.append(f"run_dir is given twice: --out {run_dir!r} and the override "
                            f"run_dir={parsed['run_dir']!r}; keep one")
        data["run_dir"] = run_dir  # set directly: a path is not YAML to be parsed
        origin.pop("run_dir", None)
    cfg = None
    path = yamlio.shown_path(path)  # loaded, so it is printable
    try:
        cfg = validate(data, source=str(path), origin=origin)
    except ConfigError as e:
        problems += e.problems
    if disk and isinstance(data, dict):
        problems += path_problems(data)  # from the raw dict: reported even when the schema has problems
        if cfg is not None:
            problems += disk_problems(cfg, allow_done, paths=False)
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def _override_text(items: list[str]) -> dict[str, str]:
    return {k.strip(): raw for k, sep, raw in (i.partition("=") for i in items) if sep}


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


# Integer sizes of Hugging Face model configs: when given, each is a positive whole number.
HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head",
            "n_positions", "n_inner", "d_model", "num_layers", "num_heads", "d_ff", "d_kv")


def hf_config_problems(c: dict[str, Any], where: str) -> list[str]:
    """Shapes a Hugging Face config cannot build (or our parameter count would divide by). ``where`` is
    "model.config" or the folder's config.json path, as the user knows it."""
    def k(key: str) -> str:
        return f"'{where}.{key}'" if where == "model.config" else f"'{key}' in {where}"

    p = []
    model_type = c.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        p.append(f"{k('model_type')} = {model_type!r}: a model config needs a model_type (e.g. llama) to pick the "
                 "architecture; see examples/tiny-sft.yaml")
    for key in HF_SIZES:
        value = c.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            p.append(f"{k(key)} = {value!r} must be a positive whole number")
    if p:
        return p
    h, heads, kv = c.get("hidden_size"), c.get("num_attention_heads"), c.get("num_key_value_heads")
    if h and heads and c.get("head_dim") is None and h % heads:
        p.append(f"{k('hidden_size')} = {h} is not divisible by num_attention_heads = {heads} (each head gets "
                 "hidden_size / num_attention_heads dimensions); change one of them, or set head_dim")
    if heads and kv and heads % kv:
        p.append(f"{k('num_attention_heads')} = {heads} is not a multiple of num_key_value_heads = {kv} "
                 "(grouped-query attention shares each key/value head among a whole number of query heads)")
    if c.get("n_embd") and c.get("n_head") and c["n_embd"] % c["n_head"]:
        p.append(f"{k('n_embd')} = {c['n_embd']} is not divisible by n_head = {c['n_head']}")
    return p


# Module names of a Llama-style model (transformers' LlamaFor*/MistralFor*), "{i}" = a layer index.
_LLAMA_MODULES = ("model", "model.embed_tokens", "model.layers", "model.layers.{i}", "model.layers.{i}.self_attn",
                  *(f"model.layers.{{i}}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")),
                  "model.layers.{i}.mlp",
                  *(f"model.layers.{{i}}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")),
                  "model.layers.{i}.mlp.act_fn", "model.layers.{i}.input_layernorm",
                  "model.layers.{i}.post_attention_layernorm", "model.norm", "model.rotary_emb")


def llama_module_names(task_type: str) -> tuple[str, ...]:
    """Module names of a Llama-style model for a task ("{i}" = layer index); the head depends on the task."""
    return _LLAMA_MODULES + (("lm_head",) if task_type == "causal_lm" else ("score",))


def module_matches(target: str, names: tuple[str, ...], layers: int) -> bool:
    """peft's rule for a listed target: it equals a module's name or a dotted suffix of it."""
    want = target.split(".")
    for name in names:
        parts = name.split(".")
        if len(want) > len(parts):
            continue
        tail = parts[len(parts) - len(want):]
        if all(t == w or (t == "{i}" and w.isdecimal() and w.isascii() and int(w) < layers)
               for t, w in zip(tail, want)):
            return True
    return False


def lora_target_problems(cfg: RunConfig, hf: dict[str, Any], where: str) -> list[str]:
    """LoRA target modules that match no module of a known (Llama-style) architecture: peft would wrap
    fewer layers than listed, or none. Other architectures are checked by the trainer once built."""
    m = cfg.method
    targets = m.lora.target_modules
    if m.name not in ("lora", "qlora", "adalora") or targets == "all-linear":
        return []
    if not targets:
        return ["'method.lora.target_modules' = [] names no module, so nothing would train; list module names "
                "(e.g. [q_proj, v_proj]) or use all-linear"]
    if hf.get("model_type") not in LLAMA_LIKE:
        return []
    names = llama_module_names(cfg.task.type)
    bad = [t for t in targets if not module_matches(t, names, int(hf.get("num_hidden_layers") or 32))]
    if not bad:
        return []
    linears = ", ".join(n.rsplit(".", 1)[1] for n in names if n.endswith("_proj"))
    return [f"'method.lora.target_modules' lists {bad}, which match no module of this {hf['model_type']} model "
            f"({where}); its linear layers are {linears} (a name, or a dotted suffix of one such as "
            "self_attn.q_proj); fix the names or use all-linear"]


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
    if disk and cfg.model.name_or_path is not None and Path(cfg.model.name_or_path).is_dir():
        try:
            hf, _ = read_model_folder(Path(cfg.model.name_or_path))
        except ConfigError:
            return None  # model_folder_problems says why
        return hf.get("model_type") if isinstance(hf.get("model_type"), str) else None
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
    if s.gpu_mem_gb is not None and s.gpus_per_node == 0:
        p.append(f"'slurm.gpu_mem_gb' = {s.gpu_mem_gb:g} but 'slurm.gpus_per_node' = 0 (CPU-only nodes): there is no "
                 "GPU memory to plan; remove slurm.gpu_mem_gb, or request GPUs")
    if s.gpus_per_node == 0:
        if cfg.precision.dtype == "fp16":
            p.append("'precision.dtype' = 'fp16' cannot run on CPU-only nodes (slurm.gpus_per_node = 0): DeepSpeed "
                     "has no fp16 on a CPU; use precision.dtype=bf16 or fp32, or request GPUs")
        if cfg.method.name == "qlora":
            p.append("'method.name' = 'qlora' cannot run on CPU-only nodes (slurm.gpus_per_node = 0): its 4-bit "
                     "weights need CUDA kernels; use method.name=lora, or request GPUs")
    p += env_setup_problems(s.env_setup)
    if not s.job_name.strip():
        p.append("'slurm.job_name' is empty; give the job a name (e.g. slurm.job_name=finetune)")
    for key in ("partition", "account", "qos", "constraint", "python"):
        value = getattr(s, key)
        if value is not None and not value.strip():
            p.append(f"'slurm.{key}' = {value!r} is empty; remove the key to use the default")
    return p


def env_setup_shell_problems(lines: list[str], parses: Callable[[str], bool]) -> list[str]:
    """The bash part of the slurm.env_setup rule (launcher/slurm.py explains it): ``parses(text)`` is
    ``bash -n`` (the launcher passes launcher/execute.py's); nothing is executed."""
    p = []
    for i, line in enumerate(lines):
        alone, followed = env_setup_probes(line)
        key = f"'slurm.env_setup[{i}]' = {line!r}"
        if not parses(alone):
            p.append(f"{key} is not a complete shell command on its own (bash -n refuses it: an unclosed quote, "
                     "bracket or if/for?); put each whole command on one entry")
        elif parses(followed):
            p.append(f"{key} swallows the line after it (a here-document, a trailing backslash or an open string: "
                     f"a lone {SENTINEL!r} after it still parses), so the launch lines would never run; write "
                     "it as one complete command (e.g. export VAR=value) or move it into a script you source")
    return p


# sbatch options the schema models (the key to use instead); slurm.extra_sbatch may not set them.
MODELLED_SBATCH = {
    "job-name": "slurm.job_name", "nodes": "dist.nodes", "ntasks": "dist.nodes (one task per node)",
    "ntasks-per-node": "dist.procs_per_node (one task per node starts its ranks)", "gpus-per-node":
    "slurm.gpus_per_node", "gpus": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task",
    "mem": "slurm.mem_gb", "time": "slurm.time_min", "partition": "slurm.partition", "account": "slurm.account",
    "qos": "slurm.qos", "constraint": "slurm.constraint", "output": "the run dir (slurm-JOBID.out there)",
    "error": "the run dir (slurm-JOBID.err there)", "signal": "slurm.signal and slurm.signal_lead_s",
    "requeue": "slurm.max_requeues", "no-requeue": "slurm.max_requeues=0", "open-mode": "nothing (append keeps "
    "a requeued job's output in one file)", "exclusive": "slurm.exclusive", "array": "python -m launcher sweep",
    "wrap": "nothing (the batch script is rendered)", "chdir": "nothing (relative paths resolve in the submit "
    "directory; submit from the directory you want)", "parsable": "nothing", "wait": "nothing",
}
_SBATCH_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(=(.+))?", re.S)
_MOUNT = re.compile(r"(/[^,:\s]*):(/[^,:\s]*)(:[a-z+]+)?")


def cluster_problems(cfg: RunConfig) -> list[str]:
    """slurm.extra_sbatch, slurm.container (part of cross_field_problems). Pure."""
    s, p = cfg.slurm, []
    seen = set()
    for item in s.extra_sbatch:
        m = _SBATCH_FLAG.fullmatch(item)
        if m is None or "\n" in item:
            p.append(f"'slurm.extra_sbatch' item {item!r} is not an sbatch option; write it as --flag=value or "
                     "--flag (long form, e.g. --reservation=maint or --mail-type=END)")
            continue
        name = m.group(1)
        if name in MODELLED_SBATCH:
            p.append(f"'slurm.extra_sbatch' item {item!r} sets --{name}, which the config models; use "
                     f"{MODELLED_SBATCH[name]} instead")
        elif name in seen:
            p.append(f"'slurm.extra_sbatch' sets --{name} more than once; keep one")
        seen.add(name)
    c = s.container
    if c is not None:
        if not c.image.strip() or "\n" in c.image:
            p.append(f"'slurm.container.image' = {c.image!r} is empty or holds a newline; give an image "
                     "(e.g. nvcr.io#nvidia/pytorch:24.05-py3) or a squashfs file")
        for mount in c.mounts:
            if not _MOUNT.fullmatch(mount):
                p.append(f"'slurm.container.mounts' item {mount!r} is not SRC:DST[:FLAGS] with absolute paths "
                         "(no commas or spaces: pyxis joins the mounts with commas), e.g. /scratch:/scratch")
        if c.workdir is not None and not c.workdir.startswith("/"):
            p.append(f"'slurm.container.workdir' = {c.workdir!r} must be an absolute path inside the container; "
                     "remove it to use the submit directory")
    return p


# --------------------------------------------------------------------------- disk


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _is_save_to_disk(folder: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset, or a DatasetDict)."""
    return ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()) or \
        (folder / "dataset_dict.json").is_file()


def path_problems(data: dict[str, Any]) -> list[str]:
    """Missing or wrong-kind model/tokenizer folders and data files, read from the raw (overridden) config
    dict, so they are reported even when the schema has problems of its own."""
    p = []
    folders = [("model.name_or_path", "a local Hugging Face folder (save_pretrained)"),
               ("model.tokenizer", "a local folder with tokenizer files")]
    for key, what in folders:
        value = _get(data, key)
        if isinstance(value, str) and path_text_ok(value) and not Path(value).is_dir():
            p.append(f"'{key}' = {value!r} " + ("is a file" if Path(value).exists() else "does not exist") +
                     f"; it must be {what} reachable from the compute nodes")
    for key in ("data.train", "data.eval", "zero.base_config"):
        value = _get(data, key)
        if not (isinstance(value, str) and path_text_ok(value)):
            continue
        if not Path(value).exists():
            p.append(f"'{key}' = {value!r} does not exist; fix the path (relative paths are relative to "
                     "the directory you launch from)")
        elif key.startswith("data.") and Path(value).is_dir() and not _is_save_to_disk(Path(value)):
            p.append(f"'{key}' = {value!r} is a folder, but not one written by datasets' save_to_disk (it has no "
                     "dataset_info.json + state.json, or dataset_dict.json); point it at a data file (.jsonl, "
                     ".json, .csv, .parquet) or a save_to_disk folder")
    return p


def resolved_path(path: Union[str, os.PathLike]) -> Path:
    """A path as the filesystem means it: absolute, with '.', '..' and symlinks resolved (relative paths
    against the current directory, i.e. where the user launches). ``./x/`` and ``/abs/x`` compare equal."""
    return Path(os.path.realpath(path))


def same_value(key: str, a: Any, b: Any) -> bool:
    """Two values of one config key mean the same thing (path keys: the same resolved path)."""
    if a == b:
        return True
    return key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str) and resolved_path(a) == resolved_path(b)


_PATH_KEYS = frozenset(path_keys())


def run_dir_path_problems(cfg: RunConfig) -> list[str]:
    """The run dir is a folder we can create or write; a folder that is not a run dir (no config.yaml)
    but holds files named like ours (``render --out slurm``: slurm/finetune.sh) is refused, so a render
    never overwrites a file that is not a run dir's own."""
    key = f"'run_dir' = {cfg.run_dir!r}"
    path = Path(cfg.run_dir).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:
        return [f"{key} cannot be checked ({e.strerror}: {e.filename}); choose a run_dir you can read and write"]
    if existing == path and not path.is_dir():
        return [f"{key} is a file; a run dir is a folder: choose another run_dir"]
    if existing != path and not existing.is_dir():
        return [f"{key} cannot be created: {str(existing)!r} is a file; choose another run_dir"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key} is not writable: you cannot write in {str(existing)!r}; choose a run_dir you can write "
                "(reachable from the compute nodes)"]
    layout = rundir.RunDir(path)
    ours = [f.name for f in (layout.ds_config, layout.script, layout.hostfile, layout.world) if f.exists()]
    if ours and not layout.config.is_file():
        return [f"{key} is not a run dir (it has no {rundir.CONFIG}) but holds {', '.join(ours)}, which would be "
                "overwritten; choose a new (or empty) run_dir"]
    return []


def model_folder_problems(cfg: RunConfig) -> list[str]:
    """The model folder's config.json and safetensors headers (what launcher/memory.py and from_pretrained
    read): readable, a buildable shape, and LoRA targets that exist in it."""
    folder = cfg.model.name_or_path
    if folder is None or not Path(folder).is_dir():
        return []  # none, or path_problems says so
    try:
        hf, _ = read_model_folder(Path(folder))
    except ConfigError as e:
        return [f"'model.name_or_path' = {folder!r}: {p}" for p in e.problems]
    where = str(Path(folder) / HF_CONFIG)
    return hf_config_problems(hf, where) or lora_target_problems(cfg, hf, where)


def _where(key: str, value: Any, run_dir: str) -> Any:
    """A path key's identity: its resolved path, or its place inside the run dir (a moved run dir
    takes such files along). Other values are themselves."""
    if key not in _PATH_KEYS or not isinstance(value, str):
        return value
    path, root = resolved_path(value), resolved_path(run_dir)
    return ("RUN_DIR", path.relative_to(root).as_posix()) if path.is_relative_to(root) else str(path)


def run_dir_problems(cfg: RunConfig, allow_done: bool = False) -> list[str]:
    """A run dir belongs to one run: a different config there would mix two runs. The slurm
    section may differ (a resubmission with more time or another partition is the same run), and so
    may ``run_dir`` itself (a run dir copied or moved elsewhere is the same run); the other paths
    count by where they resolve to."""
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
        old_root = old.get("run_dir") if isinstance(old.get("run_dir"), str) else cfg.run_dir
        old = {k: _where(k, v, old_root) for k, v in old.items()}
        new = {k: _where(k, v, cfg.run_dir) for k, v in new.items()}
        # slurm.* says where and how long a job runs, not what it trains: a resubmission may change it
        # (nor do the RESUBMIT_FREE_KEYS: how the job copes with faults, not what it trains)
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "run_dir"
                      and not k.startswith("slurm.") and k not in RESUBMIT_FREE_KEYS)
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


def disk_problems(cfg: RunConfig, allow_done: bool = False, paths: bool = True) -> list[str]:
    """The disk rules of :func:`load_config` for an already validated config (the trainer runs them
    at start, before anything is written). ``paths``: include :func:`path_problems`."""
    run_dir = run_dir_path_problems(cfg)
    return ((path_problems(to_dict(cfg)) if paths else []) + run_dir +
            (run_dir_problems(cfg, allow_done) if not run_dir else []) + ds_config_problems(cfg) +
            model_folder_problems(cfg) + (liger_problems(cfg, disk=True) if cfg.model.config is None else []))
