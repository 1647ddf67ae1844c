"""The export of a peft run: the adapter (run_dir/adapter) and, on request, base + adapter merged
into a plain Hugging Face model (run_dir/export).

Under ZeRO-3 the adapter's weights are partitioned across ranks: a plain ``save_pretrained``
writes shape-(0,) tensors (measured). The adapter is saved inside
``deepspeed.zero.GatheredParameters`` over the adapter's parameters only (not the base).
The merge runs on rank 0 without DeepSpeed: the base is loaded from model.name_or_path,
the saved adapter is applied with ``PeftModel.from_pretrained`` -- exactly what a user would
do -- and ``merge_and_unload()`` folds it into the weights.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from launcher.rundir import RunDir
from trainer.checkpoint import write_pretrained



def adapter_params(model) -> list:
    """What the adapter file holds: the trainable parameters (LoRA/IA3/prompt weights, modules to
    save) plus AdaLoRA's rank counters (frozen, but saved)."""
    return [p for n, p in model.named_parameters() if p.requires_grad or "ranknum" in n]


def save_adapter(engine, tokenizer, out_dir: Path, stage: int) -> None:
    """peft save_pretrained folder (adapter_config.json, adapter_model.safetensors, tokenizer),
    written by rank 0, atomically. Every rank must call it (ZeRO-3 gathers collectively)."""
    import torch.distributed as dist

    model = engine.module
    gather = contextlib.nullcontext()
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(adapter_params(model), modifier_rank=None)
    with gather:
        if dist.get_rank() == 0:
            write_pretrained(model, tokenizer, out_dir)
    dist.barrier()


@contextlib.contextmanager
def _without_zero3_init():
    """transformers builds models inside deepspeed.zero.Init (a collective) while a ZeRO-3
    HfDeepSpeedConfig is alive; a rank-0-only load must not."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def merge_adapter(engine, tokenizer, base_path: str, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    """Rank 0: base (from disk, unquantized) + saved adapter -> merge_and_unload -> save_pretrained."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        from peft import PeftModel

        from trainer.model import torch_dtype

        base_model = engine.module.get_base_model()
        config = copy.deepcopy(base_model.config)  # keeps num_labels / id2label of a classifier
        if hasattr(config, "quantization_config"):  # QLoRA: merge into the full-precision base
            del config.quantization_config
        with _without_zero3_init():
            base = type(base_model).from_pretrained(base_path, config=config, dtype=torch_dtype(dtype))
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        write_pretrained(merged, tokenizer, out_dir)
    dist.barrier()


def export_peft(engine, tokenizer, cfg, run_dir: Path) -> None:
    """run_dir/adapter, and run_dir/export (merged) when method.merge_adapter is set."""
    import torch.distributed as dist

    layout = RunDir(run_dir)
    save_adapter(engine, tokenizer, layout.adapter, cfg.zero.stage)
    if cfg.method.merge_adapter:
        merge_adapter(engine, tokenizer, cfg.model.name_or_path, layout.adapter, layout.export, cfg.precision.dtype)
    if dist.get_rank() == 0:
        print(f"adapter (PeftModel.from_pretrained(base, path)): {layout.adapter}"
              + (f"\nmerged model (from_pretrained): {layout.export}" if cfg.method.merge_adapter else ""),
              flush=True)
