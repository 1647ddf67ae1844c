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
