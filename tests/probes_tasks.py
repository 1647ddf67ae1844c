"""Post-scenario probes for the classification tasks (see dist_worker.py `probe`).

Each recomputes something the trainer claims, in this process, with plain torch / transformers
and the raw data files, not with trainer/tasks.py: the step-1 loss by the class-weight formula,
the exported model's eval metrics, and label names through a transformers pipeline.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def first_step_loss_by_formula(cfg, world) -> dict:
    """Train loss of optimizer step 1 = sum_i w[y_i] * CE_i / N over the first window of every rank,
    from the initial weights (the pretrained folder; dropout is 0) and weights n / (k * n_c)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.data import window_indices

    if not world.is_main:
        return {}
    rows = _rows(cfg.data.train)
    names = sorted({r["label"] for r in rows})
    counts = Counter(r["label"] for r in rows)
    if cfg.task.class_weights == "auto":
        weights = [len(rows) / (len(names) * counts[c]) for c in names]
    else:
        weights = [1.0] * len(names)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path).eval()
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    t = cfg.train
    total, n = 0.0, 0
    with torch.no_grad():
        for rank in range(world.world_size):
            for idx in window_indices(len(rows), world.world_size, rank, cfg.seed, t.micro_batch_size,
                                      t.grad_accum, 0):
                for i in idx:
                    enc = tok(rows[i]["text"], truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
                    logp = torch.log_softmax(model(**enc).logits[0].double(), -1)
                    y = names.index(rows[i]["label"])
                    total += -weights[y] * logp[y].item()
                    n += 1
    return {"loss": total / n, "weights": weights, "examples": n}


def export_eval(cfg, world) -> dict:
    """Reload RUN_DIR/export with from_pretrained and evaluate the eval file: mean cross-entropy per
    example (no class weights) and accuracy, plus the label names stored in the model config."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not world.is_main:
        return {}
    export = Path(cfg.run_dir) / "export"
    model = AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    rows = _rows(cfg.data.eval)
    loss, correct = 0.0, 0
    with torch.no_grad():
        for r in rows:
            enc = tok(r[cfg.data.text_field], truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
            logits = model(**enc).logits[0].double()
            y = model.config.label2id[r["label"]]
            loss += -torch.log_softmax(logits, -1)[y].item()
            correct += int(logits.argmax().item() == y)
    return {"eval_loss": loss / len(rows), "accuracy": correct / len(rows),
            "id2label": {str(k): v for k, v in model.config.id2label.items()}}


def text_pipeline(cfg, world) -> dict:
    """transformers pipeline on the export: label names come back; accuracy on the eval file."""
    from transformers import pipeline

    if not world.is_main:
        return {}
    clf = pipeline("text-classification", model=str(Path(cfg.run_dir) / "export"), device=-1)
    rows = _rows(cfg.data.eval)
    preds = clf([r["text"] for r in rows], batch_size=32, truncation=True, max_length=cfg.data.max_length)
    return {"labels": sorted({p["label"] for p in preds}),
            "accuracy": sum(p["label"] == r["label"] for p, r in zip(preds, rows)) / len(rows)}


def token_pipeline(cfg, world) -> dict:
    """token-classification pipeline on the export: the tag names come back."""
    from transformers import pipeline

    if not world.is_main:
        return {}
    ner = pipeline("token-classification", model=str(Path(cfg.run_dir) / "export"), device=-1, ignore_labels=[])
    rows = _rows(cfg.data.eval)[:20]
    found = ner([" ".join(r["tokens"]) for r in rows])
    return {"entities": sorted({e["entity"] for sent in found for e in sent}),
            "id2label": {str(k): v for k, v in ner.model.config.id2label.items()}}


def export_vs_base(cfg, world) -> dict:
    """How far the exported weights moved from the pretrained folder, per part of the model
    (max |difference|): what head-only / LoRA-with-head training changed and saved. Sequence
    classifiers are also re-evaluated (export_eval)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    if not world.is_main:
        return {}
    export = Path(cfg.run_dir) / "export"
    token = cfg.task.type == "token_classification"
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    base = auto.from_pretrained(cfg.model.name_or_path).state_dict()
    tuned = auto.from_pretrained(str(export)).state_dict()
    assert set(base) == set(tuned), set(base) ^ set(tuned)
    diff: dict[str, float] = {}
    for name, w in base.items():
        part = next(p for p in ("classifier", "pooler", "embeddings", "encoder") if p in name)
        diff[part] = max(diff.get(part, 0.0), (tuned[name].float() - w.float()).abs().max().item())
    out = {"diff": diff, "id2label": AutoConfig.from_pretrained(str(export)).id2label}
    if not token:
        out.update(export_eval(cfg, world))
    return out
