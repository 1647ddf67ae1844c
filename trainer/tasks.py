"""The task seam: what the loop and the run need to know about causal LM, sequence and token
classification, behind one Protocol; and the reports an evaluation writes.

The loop (trainer/loop.py) depends on :class:`Task` only. The data pipeline (trainer/prepare.py)
builds the task object from the train split (label set, class weights); batches come from the
one collate in trainer/data.py for every task.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from launcher.rundir import RunDir
from trainer import metrics as M
from trainer.data import IGNORE, target_tokens

REPORT_FILES = ("classification_report.txt", "confusion_matrix.png", "report.json")


class Task(Protocol):
    kind: str  # task.type

    def auto_class(self):
        """The transformers Auto class that builds the model."""

    def model_kwargs(self) -> dict:
        """Extra model-config arguments (num_labels, id2label, label2id)."""

    def n_targets(self, batch: dict) -> int:
        """What the loss is normalised by: target tokens (causal LM), labelled examples (sequence),
        labelled tokens (token classification)."""

    def loss_sum(self, engine, batch: dict, device: str):
        """The summed (class-weighted) cross-entropy of a micro-batch, a 0-d tensor."""

    def eval_step(self, engine, batch: dict, indices: list[int], device: str) -> tuple[Any, list]:
        """(loss sum, per-example outputs to gather) for one eval micro-batch."""

    def eval_metrics(self, loss: float, outputs: list) -> tuple[dict[str, float], Optional["Report"]]:
        """Metrics (eval/...) from every rank's outputs, and the report to write (or None)."""

    def describe(self, metrics: dict[str, float]) -> str:
        """One log line."""


# --------------------------------------------------------------------------- reports


@dataclass
class Report:
    """What an evaluation of a classifier writes to RUN_DIR/eval/stepNNNNNNNN/."""
    text: str
    matrix: list[list[int]]
    labels: list[str]
    metrics: dict[str, float]

    def write(self, out_dir: Path, title: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "classification_report.txt").write_text(self.text)
        (out_dir / "report.json").write_text(json.dumps(
            {"metrics": self.metrics, "labels": self.labels, "confusion_matrix": self.matrix}, indent=1) + "\n")
        M.confusion_png(self.matrix, self.labels, out_dir / "confusion_matrix.png", title)


def publish_report(run_dir: Path, step: int) -> Optional[Path]:
    """Copy the report of the evaluation at ``step`` (the exported model's) to the run dir's top."""
    src = RunDir(run_dir).eval_report(step)
    if not (src / "classification_report.txt").exists():
        return None
    for name in REPORT_FILES:
        shutil.copy(src / name, Path(run_dir) / name)
    return Path(run_dir) / "classification_report.txt"


def _gather(outputs: list) -> list:
    """Every rank's (row, true, pred) triples, in row order, on every rank."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, outputs)
    return sorted((o for part in parts for o in part), key=lambda o: o[0])


def _prefixed(values: dict[str, float]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in values.items()}


# --------------------------------------------------------------------------- causal LM


class CausalLM:
    """Next-token prediction."""
    kind = "causal_lm"

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self) -> dict:
        return {}

    def n_targets(self, batch: dict) -> int:
        return target_tokens(batch)

    def loss_sum(self, engine, batch: dict, device: str):
        """Summed next-token cross-entropy over target tokens (normalised by the caller)."""
        import torch.nn.functional as F

        out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")

    def eval_step(self, engine, batch: dict, indices: list[int], device: str):
        return self.loss_sum(engine, batch, device), []

    def eval_metrics(self, loss: float, outputs: list) -> tuple[dict[str, float], Optional[Report]]:
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}, None

    def describe(self, ev: dict[str, float]) -> str:
        return f"loss {ev['eval/loss']:.4f} ppl {ev['eval/ppl']:.2f}"


# --------------------------------------------------------------------------- classification


@dataclass
class Labels:
    """Label names in id order and the per-label loss weights (None = unweighted)."""
    names: list[str]
    weights: Optional[list[float]] = None
    _weight_tensor: dict = field(default_factory=dict, repr=False)

    def model_kwargs(self) -> dict:
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {n: i for i, n in enumerate(self.names)}}

    def weight(self, device: str):
        if self.weights is None:
            return None
        if device not in self._weight_tensor:
            import torch

            self._weight_tensor[device] = torch.tensor(self.weights, dtype=torch.float32, device=device)
        return self._weight_tensor[device]

    def loss_sum(self, logits, labels, device: str):
        """sum_i w[y_i] * CE_i over labelled positions (the caller divides by their count)."""
        import torch.nn.functional as F

        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1).to(device),
                               weight=self.weight(device), ignore_index=IGNORE, reduction="sum")


def _logits(engine, batch: dict, device: str):
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return engine(**inputs).logits.float()


@dataclass
class Classification:
    """One label per text or text pair (AutoModelForSequenceClassification), or one tag per word
    (AutoModelForTokenClassification; CoNLL-2003 style: the first sub-word of a word carries its
    tag, the other sub-words and the special tokens are ignored in the loss and the metrics)."""
    labels: Labels
    per_token: bool = False

    @property
    def kind(self) -> str:
        return "token_classification" if self.per_token else "sequence_classification"

    def auto_class(self):
        import transformers

        return (transformers.AutoModelForTokenClassification if self.per_token
                else transformers.AutoModelForSequenceClassification)

    def model_kwargs(self) -> dict:
        return self.labels.model_kwargs()

    def n_targets(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum().item())

    def loss_sum(self, engine, batch: dict, device: str):
        return self.labels.loss_sum(_logits(engine, batch, device), batch["labels"], device)

    def eval_step(self, engine, batch: dict, indices: list[int], device: str):
        """Outputs: (row, true, predicted) per labelled example; per token, the lists of a row's
        labelled words."""
        logits = _logits(engine, batch, device)
        gold, pred = batch["labels"], logits.argmax(-1).cpu()
        if not self.per_token:
            out = [(indices[k], y, int(pred[k])) for k, y in enumerate(gold.tolist()) if y != IGNORE]
        else:
            keep = gold != IGNORE
            out = [(indices[k], gold[k][keep[k]].tolist(), pred[k][keep[k]].tolist())
                   for k in range(gold.shape[0]) if keep[k].any()]
        return self.labels.loss_sum(logits, gold, device), out

    def eval_metrics(self, loss: float, outputs: list) -> tuple[dict[str, float], Optional[Report]]:
        rows = _gather(outputs)
        gold, pred, names = [r[1] for r in rows], [r[2] for r in rows], self.labels.names
        if self.per_token:
            return token_metrics(loss, gold, pred, names)
        values = M.label_metrics(gold, pred, names)
        report = Report(M.label_report(gold, pred, names), M.confusion(gold, pred, len(names)),
                        names, dict(values, loss=loss, examples=len(rows)))
        return {"eval/loss": loss, **_prefixed(values)}, report

    def describe(self, ev: dict[str, float]) -> str:
        line = f"loss {ev['eval/loss']:.4f} accuracy {ev['eval/accuracy']:.4f} f1_macro {ev['eval/f1_macro']:.4f}"
        if "eval/entity_f1_micro" in ev:
            line += f" entity_f1_micro {ev['eval/entity_f1_micro']:.4f}"
        return line


def token_metrics(loss: float, gold: list[list[int]], pred: list[list[int]],
                  names: list[str]) -> tuple[dict[str, float], Report]:
    """Tag-level metrics over labelled words, plus entity-level ones when the tags are IOB."""
    y_true = [t for seq in gold for t in seq]
    y_pred = [t for seq in pred for t in seq]
    values = M.label_metrics(y_true, y_pred, names)
    text = "tag level (one prediction per word)\n" + M.label_report(y_true, y_pred, names)
    if M.is_iob(names):
        true_tags = [[names[t] for t in seq] for seq in gold]
        pred_tags = [[names[t] for t in seq] for seq in pred]
        values.update(M.entity_metrics(true_tags, pred_tags))
        text += "\nentity level (seqeval: type and exact span must match)\n" + M.entity_report(true_tags, pred_tags)
    report = Report(text, M.confusion(y_true, y_pred, len(names)), list(names),
                    dict(values, loss=loss, sequences=len(gold), words=len(y_true)))
    return {"eval/loss": loss, **_prefixed(values)}, report
