"""Probes of tests/test_efficiency_dist.py (run by dist_worker.py after a scenario, on every rank)."""
from __future__ import annotations


def document_losses(cfg, world) -> dict:
    """Per-document summed losses of packed rows against the same documents one per row, through a
    real ZeRO-3 engine (partitioned, 2 ranks), for sdpa and eager attention; and the same packed
    rows with one document's tokens changed. Every rank runs the same batches (ZeRO-3 lock-step);
    rank 0 reports."""
    import deepspeed
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.batch import plan_batch
    from launcher.ds_config import build_ds_config
    from trainer import data as D
    from trainer.encode import CausalLMEncoder
    from trainer.tasks import CausalLM

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.name_or_path)
    d = cfg.data
    split = D.tokenize(D.load_rows(d.train), CausalLMEncoder(tok, d), True, d.max_length, "probe")
    rows = split.rows
    blocks = [i for i in range(len(rows)) if len(rows.blocks[i]) >= 3][:4]  # rows holding 3+ documents
    plan = plan_batch(len(blocks), 1, None, world.world_size)
    ds_config = build_ds_config(cfg.model_copy(update={"zero": cfg.zero.model_copy(update={
        "stage": 3, "param_persistence_threshold": 0})}), plan)
    out: dict = {"blocks": len(blocks), "docs_per_row": [len(rows.blocks[i]) for i in blocks]}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, attn_implementation=attn)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        partitioned = all(p.numel() == 0 for p in engine.module.model.layers.parameters())
        task = CausalLM(0, d.max_length)
        task.bind(engine.module)

        def per_doc(batch) -> list[list[float]]:
            """Summed CE of each document (row by row, split where position ids restart)."""
            inputs, labels = task.inputs(batch, world.device)
            with torch.no_grad():
                logits = engine(**inputs).logits.float()
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=D.IGNORE,
                                 reduction="none")
            pos = batch.get("position_ids")
            result = []
            for r in range(ce.shape[0]):
                n = int(batch["attention_mask"][r].sum())
                starts = [0] + ([t for t in range(1, n) if pos[r, t] == 0] if pos is not None else []) + [n]
                # token t's loss is the prediction of token t + 1: a document spans [s - 1, e - 1)
                result.append([float(ce[r, max(0, s - 1):e - 1].sum()) for s, e in zip(starts, starts[1:])])
            return result

        packed = per_doc(D.fetch(rows, blocks, tok.pad_token_id))
        docs = [doc for i in blocks for doc in rows.blocks[i]]
        alone = [x for r in per_doc(D.fetch(rows.docs, docs, tok.pad_token_id)) for x in r]
        # change every token of the second document of the first row; the others must not move
        cols = rows[blocks]
        first, second = (len(split.dataset[j]["input_ids"]) for j in rows.blocks[blocks[0]][:2])
        cols["input_ids"][0][first:first + second] = [(t * 7 + 3) % 500 for t in cols["input_ids"][0][first:first + second]]
        changed_rows = [{k: cols[k][j] for k in cols} for j in range(len(blocks))]
        changed = per_doc(D.collate(changed_rows, list(range(len(blocks))), tok.pad_token_id))
        flat = [x for r in packed for x in r]
        others = [(a, b) for ri, (ra, rb) in enumerate(zip(packed, changed)) for di, (a, b) in enumerate(zip(ra, rb))
                  if (ri, di) != (0, 1)]
        out[attn] = {"partitioned": partitioned, "n_docs": len(flat),
                     "max_abs_diff_vs_unpacked": max(abs(a - b) for a, b in zip(flat, alone)),
                     "max_abs_doc_loss": max(abs(a) for a in flat),
                     "changed_doc_moved": abs(packed[0][1] - changed[0][1]),
                     "others_max_abs_diff": max(abs(a - b) for a, b in others)}
        engine.destroy()
    return out if world.is_main else {}
