"""Post-scenario probes for the method tests (see dist_worker.py `probe`). They run on every rank
after the trainer returned; rank 0 does the work in plain PyTorch (no DeepSpeed) and returns
JSON-able facts for the test to compare."""
from __future__ import annotations

import hashlib
from pathlib import Path


def _eval_split(cfg, tok):
    from trainer import data as D
    from trainer.encode import CausalLMEncoder

    d = cfg.data
    return D.tokenize(D.load_rows(d.eval), CausalLMEncoder(tok, d), False, d.max_length, "probe").dataset


def _eval(model, split, pad_id):
    """(summed next-token CE / target tokens, the logits of every batch) -- as the trainer computes it."""
    import torch

    from trainer import data as D

    loss_sum = tokens = 0.0
    every = []
    with torch.no_grad():
        for i in range(0, len(split), 8):
            batch = D.fetch(split, list(range(i, min(i + 8, len(split)))), pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            every.append(logits)
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1),
                ignore_index=D.IGNORE, reduction="sum").item()
            tokens += D.target_tokens(batch)
    return loss_sum / tokens, every


def adapter_reload(cfg, world) -> dict:
    """Reload run_dir/adapter onto a fresh base with PeftModel.from_pretrained; its eval loss; the
    adapter file's tensor shapes; and, when a merged export exists, its eval loss and the largest
    logit difference between merged and adapter model."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.methods import _drop_virtual_token_logits

    if not world.is_main:
        return {}
    run_dir = Path(cfg.run_dir)
    adapter = run_dir / "adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(adapter))
    split = _eval_split(cfg, tok)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path).eval()
    base_loss, _ = _eval(base, split, tok.pad_token_id)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    if cfg.method.name == "prompt":
        model.register_forward_hook(_drop_virtual_token_logits(cfg.method.num_virtual_tokens), with_kwargs=True)
    loss, logits = _eval(model, split, tok.pad_token_id)
    out = {"eval_loss": loss, "base_eval_loss": base_loss, "n_tensors": len(tensors), "adapter_numel": sum(t.numel() for t in tensors.values()),
           "empty_tensors": sorted(k for k, t in tensors.items() if t.numel() == 0),
           "keys": sorted(tensors)[:6]}
    if (run_dir / "export").exists():
        merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "export")).eval()
        m_loss, m_logits = _eval(merged, split, tok.pad_token_id)
        diff = max(float((m - a).abs().max()) for m, a in zip(m_logits, logits))  # over the whole eval split
        out.update(merged_eval_loss=m_loss, merged_max_logit_diff=diff, merged_batches=len(m_logits),
                   merged_is_plain=not any("lora" in n for n, _ in merged.named_parameters()))
    return out


def _digest(t) -> str:
    return hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_by_step(cfg, world) -> dict:
    """sha1 of every weight: in the base folder (step 0) and in every kept checkpoint (ZeRO-3: the
    fp32 master weights assembled from the shards by DeepSpeed's zero_to_fp32)."""
    import torch
    from safetensors.torch import load_file

    if not world.is_main:
        return {}
    ckpt = Path(cfg.run_dir) / "checkpoints"
    steps = {0: {k: _digest(v) for k, v in load_file(str(Path(cfg.model.name_or_path) / "model.safetensors")).items()}}
    for tag_dir in sorted(ckpt.glob("step*")):
        step = int(tag_dir.name[4:])
        if cfg.zero.stage < 3:  # the module's weights (fp32 here, equal to the master copy)
            sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag_dir.name)
        steps[step] = {k: _digest(v) for k, v in sd.items()}
    return {"steps": steps}


def optimizer_state(cfg, world) -> dict:
    """The optimizer state in the latest checkpoint's rank-0 shard: per state key (state1/state2/
    absmax1/absmax2 for bitsandbytes, exp_avg/exp_avg_sq for Adam), its dtype, element count and
    bytes; and the parameter count the shard covers."""
    import torch

    if not world.is_main:
        return {}
    ckpt = Path(cfg.run_dir) / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    files = sorted((ckpt / tag).glob("*optim_states.pt")) or sorted((ckpt / tag).glob("mp_rank_00_model_states.pt"))
    sd = torch.load(files[0], weights_only=False, map_location="cpu")
    keys = ("state1", "state2", "absmax1", "absmax2", "exp_avg", "exp_avg_sq")
    found: dict[str, dict] = {}

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in keys and isinstance(v, torch.Tensor):
                    e = found.setdefault(k, {"dtype": str(v.dtype), "numel": 0, "bytes": 0})
                    e["numel"] += v.numel()
                    e["bytes"] += v.numel() * v.element_size()
                else:
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(sd.get("optimizer_state_dict", sd.get("optimizer")))
    return {"state": found}


def qlora_reload(cfg, world) -> dict:
    """GPU: reload run_dir/adapter onto the base quantized the same way (4-bit NF4) and compute the
    eval loss; and the merged export's (bf16 base, unquantized) eval loss."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.methods import load_kwargs

    if not world.is_main:
        return {}
    run_dir = Path(cfg.run_dir)
    tok = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    split = _eval_split(cfg, tok)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.bfloat16,
                                                **load_kwargs(cfg, "cuda:0")).eval()
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    out = {"eval_loss": _eval_cuda(model, split, tok.pad_token_id),
           "quantized": type(base.model.layers[0].self_attn.q_proj).__name__}
    if (run_dir / "export").exists():
        merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "export"), dtype=torch.bfloat16).cuda().eval()
        out["merged_eval_loss"] = _eval_cuda(merged, split, tok.pad_token_id)
    return out


def _eval_cuda(model, split, pad_id) -> float:
    import torch

    from trainer import data as D

    loss_sum = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(split), 8):
            batch = D.fetch(split, list(range(i, min(i + 8, len(split)))), pad_id)
            logits = model(input_ids=batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda()).logits
            logits = logits[:, :-1].float()
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1).cuda(),
                ignore_index=D.IGNORE, reduction="sum").item()
            tokens += D.target_tokens(batch)
    return loss_sum / tokens
