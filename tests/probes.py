"""Functions the dist worker runs after a scenario (see dist_worker.py `probe`)."""
from __future__ import annotations

from pathlib import Path


def export_eval_loss(cfg, world) -> dict:
    """Reload the exported folder with from_pretrained in this process (no DeepSpeed) and compute
    the eval loss the same way the engine does: summed next-token CE / target tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import data as D
    from trainer.encode import CausalLMEncoder

    if not world.is_main:
        return {}
    export = Path(cfg.run_dir) / "export"
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    d = cfg.data
    rows = D.load_rows(d.eval)
    split = D.tokenize(rows, CausalLMEncoder(tok, d), False, d.max_length, "probe")
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(split.dataset), 8):
            batch = D.fetch(split.dataset, list(range(i, min(i + 8, len(split.dataset)))), tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1),
                ignore_index=D.IGNORE, reduction="sum").item()
            tokens += D.target_tokens(batch)
    n_empty = sum(1 for p in model.parameters() if p.numel() == 0)
    return {"eval_loss": loss_sum / tokens, "empty_tensors": n_empty,
            "n_params": sum(p.numel() for p in model.parameters())}


def zero3_partitions(run) -> dict:
    """With the live engine, before the first step: how each rank really holds the parameters
    (ZeRO-3: p.numel() == 0 with the full size in p.ds_numel and the rank's share in p.ds_tensor)."""
    import torch.distributed as dist

    params = list(run.engine.module.parameters())
    mine = {"params": len(params), "visible_numel": sum(p.numel() for p in params),
            "empty": sum(1 for p in params if p.numel() == 0),
            "ds_numel": sum(getattr(p, "ds_numel", 0) for p in params),
            "local_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"ranks": every}


def param_dtypes(run) -> dict:
    """The dtypes the engine really trains in (bf16 runs: bfloat16 module weights)."""
    return {"dtypes": sorted({str(p.dtype) for p in run.engine.module.parameters()})}


def count_layer_calls(run) -> dict:
    """Counts forward calls of the first decoder layer's attention from here on (filled in while
    training; the dict is serialised after the run). Gradient checkpointing runs each layer twice
    per micro-batch: once in the forward pass and once more, recomputing, in the backward pass.
    (The hook sits inside the layer: transformers' checkpointed layer recomputes its inner forward,
    so a hook on the layer itself fires only once.)"""
    layer = run.engine.module.model.layers[0].self_attn
    calls = {"layer0_calls": 0}

    def hook(module, args, kwargs, output):
        calls["layer0_calls"] += 1

    layer.register_forward_hook(hook, with_kwargs=True)
    return calls
