"""Model and tokenizer: a local from_pretrained folder, or a from-scratch model built from a config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.config import ModelConfig, RunConfig


class ModelError(ValueError):
    pass


def torch_dtype(name: str):
    """precision.dtype -> torch dtype (the one map)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def check_device(cfg: RunConfig, is_cuda: bool) -> None:
    """What only the node the trainer runs on can know: fp16, Liger and flash-attention need CUDA (and
    Liger and flash-attention their package)."""
    import importlib.util

    from launcher.config import ConfigError

    m, p = cfg.model, []
    if cfg.precision.dtype == "fp16" and not is_cuda:
        p.append("'precision.dtype' = 'fp16' is not supported on a CPU (DeepSpeed: 'Type fp16 is not supported on "
                 "your device'); use precision.dtype=fp32, or bf16 (slow on CPUs without AMX/AVX512-BF16)")
    if m.liger and not is_cuda:
        p.append("'model.liger' = true needs a CUDA GPU (Liger's kernels are Triton GPU kernels); this run has none; "
                 "set model.liger=false (the chunked loss, train.loss_chunk_tokens, works on every device)")
    elif m.liger and importlib.util.find_spec("liger_kernel") is None:
        p.append("'model.liger' = true but the liger-kernel package is not installed here; pip install -e '.[gpu]' "
                 "(or liger-kernel), or set model.liger=false")
    if m.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (is_cuda and is_flash_attn_2_available()):
            p.append("'model.attn_implementation' = 'flash_attention_2' needs a CUDA GPU and the flash-attn package "
                     f"({'not importable here' if is_cuda else 'this run has no GPU'}); use "
                     "model.attn_implementation=sdpa (or install flash-attn on the GPU nodes)")
    if p:
        raise ConfigError(p)


def apply_liger(model, zero_stage: int) -> list[str]:
    """Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on this model instance.
    The fused loss reads the head's weight inside the model's forward, outside the head's own call,
    so under ZeRO-3 the weight is registered as an external parameter of the model (gathered for
    its forward and backward)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ModelError(f"'model.liger' = true but liger-kernel cannot be imported ({e}); pip install -e '.[gpu]' "
                         "on the GPU nodes, or set model.liger=false") from None

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    if zero_stage == 3:
        import deepspeed

        deepspeed.zero.register_external_parameter(model, model.get_output_embeddings().weight)


def model_facts(model) -> dict[str, Any]:
    """For world.json: the attention kernel the model really uses, and the Liger pieces in it."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Liger patches module instances (their _get_name says so), the model's forward and the modeling module's RoPE.
    liger = sorted({mod._get_name() for mod in base.modules() if mod._get_name().startswith("Liger")})
    forward = getattr(getattr(base.forward, "__func__", base.forward), "__name__", "forward")
    rope = getattr(getattr(sys.modules[type(base).__module__], "apply_rotary_pos_emb", None), "__name__", "")
    liger += [f"{type(base).__name__}.forward={forward}"] if forward != "forward" else []
    liger += [f"apply_rotary_pos_emb={rope}"] if rope.startswith("liger") else []
    return {"attn_implementation": base.config._attn_implementation, "liger": liger}


def facts_lines(facts: dict[str, Any]) -> list[str]:
    """The start lines of model_facts (+ the task's loss line)."""
    liger = f"; liger: {', '.join(facts['liger'])}" if facts["liger"] else ""
    return [f"attention: {facts['attn_implementation']}{liger}"] + ([facts["loss"]] if facts.get("loss") else [])


def load_tokenizer(m: ModelConfig):
    from transformers import AutoTokenizer

    path = m.tokenizer or m.name_or_path
    if not Path(path).is_dir():
        raise ModelError(f"tokenizer folder {path!r} does not exist; set model.tokenizer (or model.name_or_path) "
                         "to a local folder with tokenizer files")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(m: ModelConfig, ds_config: dict[str, Any], dtype: str, task, load_kwargs=None):
    """Returns (model, hf_ds_config_handle). Under ZeRO-3, from_pretrained loads straight into
    partitions, and a from-scratch model is built in partitions (zero.Init: an 8B model never exists
    whole on one rank); transformers' HfDeepSpeedConfig must stay alive while the model exists.
    ``task`` (trainer/tasks.py) picks the Auto class and the labels (num_labels, id2label,
    label2id: saved in the model config)."""
    from transformers import AutoConfig

    auto = task.auto_class()
    labels = task.model_kwargs()

    handle = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)
    if m.name_or_path is not None:
        if not Path(m.name_or_path).is_dir():
            raise ModelError(f"'model.name_or_path' = {m.name_or_path!r} is not a local folder; models load "
                             "offline here, so point it at a save_pretrained folder")

        def create(attn: str):  # load_kwargs: a method's extra arguments (trainer/methods.py; QLoRA's 4-bit)
            return auto.from_pretrained(m.name_or_path, dtype=torch_dtype(dtype), attn_implementation=attn,
                                        **labels, **(load_kwargs or {}))
    else:
        cfg = dict(m.config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ModelError("'model.config' needs a 'model_type' (e.g. llama); see examples/tiny-sft.yaml")

        def create(attn: str):
            return auto.from_config(AutoConfig.for_model(model_type, **{**cfg, **labels}), attn_implementation=attn)
    try:
        model = create(m.attn_implementation)
    except ValueError as e:  # transformers: this architecture has no such attention implementation
        if m.attn_implementation == "eager" or "attention" not in str(e).lower():
            raise
        if m.attn_implementation != "sdpa":
            raise ModelError(f"'model.attn_implementation' = {m.attn_implementation!r} is not available for this "
                             f"model ({str(e).splitlines()[0]}); use model.attn_implementation=sdpa or eager") from None
        model = create("eager")  # the default, on an architecture without sdpa: world.json says eager
    if m.liger:
        apply_liger(model, ds_config["zero_optimization"]["stage"])
    if m.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, handle


def count_params(model) -> tuple[int, int]:
    """(total, trainable) element counts; correct under ZeRO-3, where p.numel() is 0."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
