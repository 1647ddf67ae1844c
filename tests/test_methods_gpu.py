"""GPU-marked method tests: need CUDA (run on a GPU machine with `bash tests/run.sh -m gpu`).

QLoRA (4-bit NF4 base through bitsandbytes, LoRA on top, bf16) under ZeRO-2 on one GPU: trains,
its adapter reloads onto a base quantized the same way with the engine's eval loss, the merged
export (into the unquantized bf16 base) is close to it, and on a larger model its peak CUDA
memory is well below LoRA's on the same bf16 base (measured on an H100, 537 M parameters: 0.71 GB
vs 1.72 GB). FusedAdam (deepspeed_adamw) tracks torch AdamW; paged 8-bit AdamW trains with real paging.
DeepSpeed 0.19.8 cannot JIT-build FusedAdam when TORCH_CUDA_ARCH_LIST holds an arch suffix such as
"9.0a" ("invalid literal for int() with base 10: '0a'"); run with TORCH_CUDA_ARCH_LIST=9.0 there.
"""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import TOKENIZER, arith_rows, assert_curves_close, launch, losses, result, tiny_config, write_jsonl
from methods_base import make_base

pytestmark = pytest.mark.gpu

BIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 2048, "intermediate_size": 8192,
       "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 64,
       "tie_word_embeddings": False}


def save_big_base(tmp):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(BIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).to(torch.bfloat16)
    model.save_pretrained(str(tmp / "big"))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, tmp / "big" / f.name)
    return {"name_or_path": str(tmp / "big"), "tokenizer": None, "config": None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("GPU-marked tests were selected but CUDA is not available")
    tmp = tmp_path_factory.mktemp("gpu-methods")
    model = make_base(tmp)
    big = save_big_base(tmp)
    write_jsonl(tmp / "train.jsonl", arith_rows(512, seed=3))
    common = {"dist": {"procs_per_node": 1}, "precision": {"dtype": "bf16"},
              "logging": {"every_steps": 5, "progress_bar": False, "peak_tflops": None}}

    def conf(name, method, model_sec=model, zero=None, probe=None, **train):
        extra = {"data": {"eval": str(tmp / "eval.jsonl")}, "checkpoint": {"export": True}} if probe else {}
        return {"name": name, "probe": probe, "config": tiny_config(
            tmp / name, tmp / "train.jsonl", model=model_sec, zero=zero or {"stage": 2}, method=method,
            train={"max_steps": 20, "micro_batch_size": 8, "lr": 2e-2, **train}, **common, **extra)}

    # Memory first: CUDA's peak is per process, and all scenarios share this one; the QLoRA run is
    # first so that its peak is its own (LoRA's, being larger, is LoRA's). Small ZeRO buckets, so
    # that the weights dominate.
    small = {"stage": 2, "reduce_bucket_size": 5_000_000}
    sc = [conf("mem-qlora", {"name": "qlora"}, model_sec=big, zero=small, max_steps=4),
          conf("mem-lora", {"name": "lora"}, model_sec=big, zero=small, max_steps=4),
          conf("qlora", {"name": "qlora", "merge_adapter": True}, probe="probes_methods:qlora_reload"),
          conf("qlora-gc-paged", {"name": "qlora"}, model_sec={**model, "gradient_checkpointing": True},
               optimizer="paged_adamw8bit"),
          conf("adamw", {"name": "full"}, lr=1e-3), conf("fused", {"name": "full"}, lr=1e-3, optimizer="deepspeed_adamw")]
    launch(sc, tmp, nproc=1, timeout=900)
    return tmp


def test_qlora_trains_reloads_and_merges(runs):
    out = result(runs / "qlora")
    curve = [x for _, x in losses(runs / "qlora")]
    assert sum(curve[-5:]) / 5 < curve[0] - 0.2, curve  # measured on an H100: 6.26 -> 5.94
    p = out["probe"]
    assert p["quantized"] == "Linear4bit"
    assert p["eval_loss"] == pytest.approx(out["result"]["eval/loss"], rel=1e-2)  # bf16 kernels
    # merged into the unquantized base: the 4-bit rounding of the base is gone, so close, not equal
    assert p["merged_eval_loss"] == pytest.approx(p["eval_loss"], rel=5e-2)


def test_qlora_with_gradient_checkpointing_and_paged_8bit_adamw(runs):
    result(runs / "qlora-gc-paged")
    curve = [x for _, x in losses(runs / "qlora-gc-paged")]
    assert sum(curve[-3:]) / 3 < curve[0] - 0.3, curve


def test_fused_adam_tracks_torch_adamw(runs):
    assert_curves_close(losses(runs / "fused"), losses(runs / "adamw"), rel=2e-2)  # bf16


def test_qlora_uses_less_cuda_memory_than_lora(runs):
    def peak(name):
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        return max(r.get("train/cuda_max_allocated_gb", 0) for r in rows)

    lora, qlora = peak("mem-lora"), peak("mem-qlora")
    print(f"peak CUDA memory, {BIG['num_hidden_layers']} x hidden {BIG['hidden_size']}: lora {lora:.3f} GB, "
          f"qlora {qlora:.3f} GB")
    # bf16 base 2 bytes/weight vs NF4 about 0.5: 1.07 GB vs about 0.3 GB of weights here
    assert qlora < 0.6 * lora, (lora, qlora)
