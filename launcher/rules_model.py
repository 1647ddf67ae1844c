"""Rules of the model: a Hugging Face config's shape (model.config, or a model folder's config.json),
LoRA targets of a Llama-style architecture, Liger's supported model types, and the model folder itself.
Part of the cross-field rules (launcher/rules.py) and the disk rules (launcher/rules_disk.py).
Importable without torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.memory import HF_CONFIG, LLAMA_LIKE, read_model_folder


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
