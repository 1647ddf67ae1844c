"""Shared set-up of the method tests: a tiny saved Llama base (hidden 64, so that most weight
tensors reach bitsandbytes' 4096-element minimum for 8-bit state) and the arithmetic data."""
from __future__ import annotations

import shutil
from pathlib import Path

from helpers import TINY_LLAMA, TOKENIZER, arith_rows, write_jsonl

BASE_LLAMA = dict(TINY_LLAMA, hidden_size=64, intermediate_size=128)
Z3 = {"stage": 3, "param_persistence_threshold": 0}  # really partitioned (see the deepspeed-cpu report)


def make_base(tmp: Path) -> dict:
    """Writes tmp/base (weights + tokenizer), tmp/train.jsonl, tmp/eval.jsonl; returns the model
    section that loads the base."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(BASE_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    base = tmp / "base"
    model.save_pretrained(str(base))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, base / f.name)
    write_jsonl(tmp / "train.jsonl", arith_rows(256, seed=1))
    write_jsonl(tmp / "eval.jsonl", arith_rows(37, seed=2))
    return {"name_or_path": str(base), "tokenizer": None, "config": None}
