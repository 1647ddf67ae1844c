"""Shared set-up of the method tests: a tiny saved Llama base (hidden 64, so that most weight
tensors reach bitsandbytes' 4096-element minimum for 8-bit state) and the arithmetic data."""
from __future__ import annotations

from pathlib import Path

from helpers import arith_rows, save_tiny_pretrained, write_jsonl

Z3 = {"stage": 3, "param_persistence_threshold": 0}  # really partitioned (see the deepspeed-cpu report)


def make_base(tmp: Path) -> dict:
    """Writes tmp/base (weights + tokenizer), tmp/train.jsonl, tmp/eval.jsonl; returns the model
    section that loads the base."""
    model = save_tiny_pretrained(tmp / "base", hidden_size=64, intermediate_size=128)
    write_jsonl(tmp / "train.jsonl", arith_rows(256, seed=1))
    write_jsonl(tmp / "eval.jsonl", arith_rows(37, seed=2))
    return model
