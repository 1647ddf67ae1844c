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

    def bind(self, model) -> Optional[str]:
        """Fit the loss to the built model (before deepspeed.initialize); a line saying how, or None."""

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


# Causal-LM model types whose logits are exactly output_head(final hidden states): no softcapping,
# scaling or slicing after the head (read from their modeling files in transformers 5.23; gemma2/3,
# cohere and granite post-process the logits and are not here). The chunked loss reproduces them.
CHUNKABLE_MODEL_TYPES = ("bloom", "deepseek_v3", "falcon", "gemma", "gpt2", "gpt_neox", "gptj", "llama", "ministral",
                         "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
                         "qwen3_moe", "smollm3", "stablelm", "starcoder2")


class HeadInput:
    """A forward pre-hook on the output head. While ``armed`` it keeps the head's input (the final
    hidden states) and hands the head an empty slice of it, so the model's own forward computes no
    logits; the chunked loss then calls the head itself."""

    def __init__(self, head):
        self.head, self.armed, self.hidden = head, False, None
        head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if not self.armed:
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])


def chunked_ce_sum(head, hidden, targets, n_chunks: int):
    """sum_i CE(head(hidden_i), targets_i) over the rows of ``hidden`` (N x H), in ``n_chunks`` parts:
    each part's logits (at most ceil(N / n_chunks) x vocab, in the head's dtype and once in fp32)
    exist only while that part is computed, and again while its backward runs (recomputed under
    torch.utils.checkpoint; a single chunk is kept for backward instead, like the plain loss). The head is called as a module each time, so ZeRO-3 gathers it; every
    rank must pass the same ``n_chunks`` (the same number of gathers)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def ce(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    grad = torch.is_grad_enabled() and n_chunks > 1  # one chunk: recomputing it would save nothing
    parts = [checkpoint(ce, h, y, use_reentrant=False) if grad else ce(h, y)
             for h, y in zip(hidden.tensor_split(n_chunks), targets.tensor_split(n_chunks))]
    return torch.stack(parts).sum()


def cu_seqlens(starts, total: int):
    """Cumulative sequence lengths for flash-attention's varlen kernels: the starts, then the total."""
    import torch

    return torch.cat([starts, torch.tensor([total])]).to(torch.int32)


class CausalLM:
    """Next-token prediction. The loss is computed one of three ways (``bind`` chooses, per model):
    ``chunked`` (default): logits from the final hidden states ``chunk_tokens`` target positions at a
    time (:func:`chunked_ce_sum`), only where a target exists; ``liger``: Liger's fused linear
    cross-entropy inside the model's forward (training; evaluation stays chunked); ``plain``: the
    model's full logits, upcast to fp32 (train.loss_chunk_tokens=0, or a model whose logits are more
    than head(hidden))."""
    kind = "causal_lm"

    def __init__(self, chunk_tokens: int = 0, max_length: int = 0, liger: bool = False):
        self.chunk_tokens, self.max_length, self.liger = chunk_tokens, max_length, liger
        self.loss_kind = "plain"
        self.head: Optional[HeadInput] = None
        self.flatten = False  # flash-attention-2 on packed rows: one row per micro-batch (varlen kernels)

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self) -> dict:
        return {}

    def bind(self, model) -> Optional[str]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.flatten = base.config._attn_implementation == "flash_attention_2"
        kind = base.config.model_type
        if self.chunk_tokens and kind in CHUNKABLE_MODEL_TYPES and base.get_output_embeddings() is not None:
            self.head = HeadInput(base.get_output_embeddings())
            self.loss_kind = "chunked"
            how = (f"chunked cross-entropy (logits of at most {self.chunk_tokens} target tokens at a time, "
                   "recomputed in backward)")
        elif self.chunk_tokens:
            how = (f"plain cross-entropy over the full logits (model type {kind!r} post-processes its logits, so "
                   "train.loss_chunk_tokens does not apply)")
        else:
            how = "plain cross-entropy over the full logits (train.loss_chunk_tokens=0)"
        if self.liger:
            self.loss_kind = "liger"
            how = f"Liger fused linear cross-entropy in training; evaluation: {how}"
        return f"loss: {how}"

    def n_targets(self, batch: dict) -> int:
        return target_tokens(batch)

    def inputs(self, batch: dict, device: str) -> tuple[dict, Any]:
        """Model inputs and labels (on the device; copies from pinned memory do not wait for it).
        Packed rows go without an attention mask and with position ids, from which transformers
        masks every document off from the others (sdpa / eager: a block mask), and without a KV cache
        (with one, use_cache's default, transformers skips that detection). With flash-attention-2 the
        micro-batch becomes one row and the document boundaries go in as the varlen kernels'
        cumulative lengths, computed here on the host (transformers would read them off the device
        in every layer)."""
        def dev(t):
            return t.to(device, non_blocking=True)

        if "position_ids" not in batch:
            return {"input_ids": dev(batch["input_ids"]), "attention_mask": dev(batch["attention_mask"])}, \
                dev(batch["labels"])
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        extra: dict = {}
        if self.flatten:
            ids, pos, labels = ids.reshape(1, -1), pos.reshape(1, -1), labels.reshape(1, -1)
            starts = (pos[0] == 0).nonzero().reshape(-1)
            cu = cu_seqlens(starts, pos.shape[1])
            longest = int((cu[1:] - cu[:-1]).max())
            extra = {"cu_seq_lens_q": dev(cu), "cu_seq_lens_k": dev(cu), "max_length_q": longest,
                     "max_length_k": longest}
        return {"input_ids": dev(ids), "position_ids": dev(pos), "use_cache": False, **extra}, dev(labels)

    def loss_sum(self, engine, batch: dict, device: str):
        """Summed next-token cross-entropy over target tokens (normalised by the caller)."""
        import torch
        import torch.nn.functional as F

        inputs, labels = self.inputs(batch, device)
        if self.loss_kind == "liger" and torch.is_grad_enabled():
            return engine(**inputs, labels=labels, num_items_in_batch=1).loss  # a sum: divided by 1
        if self.head is None:
            logits = engine(**inputs).logits[:, :-1].float()
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        # Which positions have a target, found on the host (a boolean index on the device would wait for it).
        host = batch["labels"].reshape(labels.shape)[:, 1:]
        rows, cols = (host != IGNORE).nonzero(as_tuple=True)
        where, targets = rows * labels.shape[1] + cols, host[rows, cols]
        self.head.armed = True
        try:
            engine(**inputs)
        finally:
            self.head.armed = False
        hidden, self.head.hidden = self.head.hidden, None
        hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]  # prompt tuning: drop the virtual tokens
        picked = hidden.flatten(0, 1).index_select(0, where.to(device, non_blocking=True))
        # The same number of chunks on every rank and step (ZeRO-3 gathers the head once per chunk).
        n_chunks = -(-batch["input_ids"].shape[0] * self.max_length // self.chunk_tokens)
        return chunked_ce_sum(self.head.head, picked, targets.to(device, non_blocking=True), n_chunks)

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

    def bind(self, model) -> Optional[str]:
        return None

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
