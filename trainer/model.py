"""Model and tokenizer: a local from_pretrained folder, or a from-scratch model built from a config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.config import ModelConfig


class ModelError(ValueError):
    pass


def torch_dtype(name: str):
    """precision.dtype -> torch dtype (the one map)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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
    partitions (transformers' HfDeepSpeedConfig must stay alive while the model exists).
    ``task`` (trainer/tasks.py) picks the Auto class and the labels (num_labels, id2label,
    label2id: saved in the model config)."""
    from transformers import AutoConfig

    auto = task.auto_class()
    labels = task.model_kwargs()

    handle = None
    if ds_config["zero_optimization"]["stage"] == 3 and m.name_or_path is not None:
        from transformers.integrations import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)
    if m.name_or_path is not None:
        if not Path(m.name_or_path).is_dir():
            raise ModelError(f"'model.name_or_path' = {m.name_or_path!r} is not a local folder; models load "
                             "offline here, so point it at a save_pretrained folder")
        # load_kwargs: a method's extra arguments (trainer/methods.py; QLoRA's 4-bit quantization)
        model = auto.from_pretrained(m.name_or_path, dtype=torch_dtype(dtype), **labels, **(load_kwargs or {}))
    else:
        cfg = dict(m.config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ModelError("'model.config' needs a 'model_type' (e.g. llama); see examples/tiny-sft.yaml")
        model = auto.from_config(AutoConfig.for_model(model_type, **{**cfg, **labels}))
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
