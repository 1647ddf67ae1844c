"""Everything that depends on the task, behind one small seam.

A task object answers, for the loop and main():
    auto_class() / model_kwargs()   which transformers Auto class builds the model, with which labels
    fetch(ds, indices, pad_id)      a collated micro-batch (index -1 = a padding row with no loss)
    n_targets(batch)                what the loss is normalised by: target tokens (causal LM),
                                    labelled examples (sequence), labelled tokens (token classification)
    loss_sum(engine, batch, device) the summed (class-weighted) cross-entropy of a micro-batch
    eval_step / eval_metrics        per-example predictions + labels, gathered into metrics and a report
    describe(metrics)               one line for the log

Three plain classes with the same methods (no base class): CausalLM, SequenceClassification,
TokenClassification. Classification data (labels, row checks, tokenising) is prepared by
:func:`prepare_classification`; the causal-LM data path stays in trainer/main.py and trainer/data.py.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from trainer import metrics as M
from trainer.data import IGNORE, DataError

REPORT_FILES = ("classification_report.txt", "confusion_matrix.png", "report.json")


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


def report_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "eval" / f"step{step:08d}"


def publish_report(run_dir: Path, step: int) -> Optional[Path]:
    """Copy the report of the evaluation at ``step`` (the exported model's) to the run dir's top."""
    src = report_dir(run_dir, step)
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
    """Next-token prediction; the trainer-core behaviour, unchanged."""
    kind = "causal_lm"

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self) -> dict:
        return {}

    def fetch(self, ds, indices: list[int], pad_id: int) -> dict:
        from trainer.data import fetch

        return fetch(ds, indices, pad_id)

    def n_targets(self, batch: dict) -> int:
        from trainer.data import target_tokens

        return target_tokens(batch)

    def loss_sum(self, engine, batch: dict, device: str):
        from trainer.loop import lm_loss_sum

        return lm_loss_sum(engine, batch, device)

    def eval_step(self, engine, batch: dict, indices: list[int], device: str):
        return self.loss_sum(engine, batch, device), []

    def eval_metrics(self, loss: float, outputs: list) -> tuple[dict[str, float], Optional[Report]]:
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}, None

    def describe(self, ev: dict[str, float]) -> str:
        return f"loss {ev['eval/loss']:.4f} ppl {ev['eval/ppl']:.2f}"


# --------------------------------------------------------------------------- classification (shared pieces)


def _collate(rows: list[dict], indices: list[int], pad_id: int, per_token: bool) -> dict:
    """Pad input ids (pad_id), attention mask and token types (0); labels: one per row, or one per
    token padded with IGNORE. A padding row (index -1) keeps its inputs but loses its labels."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width) if per_token else (len(rows),), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        if r.get("token_type_ids") is not None:
            types[i, :n] = torch.tensor(r["token_type_ids"])
        if indices[i] >= 0 and per_token:
            labels[i, :n] = torch.tensor(r["labels"])
        elif indices[i] >= 0:
            labels[i] = r["labels"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if rows[0].get("token_type_ids") is not None:
        batch["token_type_ids"] = types
    return batch


def _rows(ds, indices: list[int]) -> list[dict]:
    cols = ds.select([i if i >= 0 else 0 for i in indices]).to_dict()
    return [{k: cols[k][j] for k in cols} for j in range(len(indices))]


def _logits(engine, batch: dict, device: str):
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return engine(**inputs).logits.float()


@dataclass
class _Labels:
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


def _n_labelled(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum().item())


# --------------------------------------------------------------------------- sequence classification


@dataclass
class SequenceClassification:
    """One label per text (or text pair); AutoModelForSequenceClassification."""
    labels: _Labels
    kind: str = "sequence_classification"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict:
        return self.labels.model_kwargs()

    def fetch(self, ds, indices: list[int], pad_id: int) -> dict:
        return _collate(_rows(ds, indices), indices, pad_id, per_token=False)

    def n_targets(self, batch: dict) -> int:
        return _n_labelled(batch)

    def loss_sum(self, engine, batch: dict, device: str):
        return self.labels.loss_sum(_logits(engine, batch, device), batch["labels"], device)

    def eval_step(self, engine, batch: dict, indices: list[int], device: str):
        logits = _logits(engine, batch, device)
        pred = logits.argmax(-1).tolist()
        out = [(indices[k], y, pred[k]) for k, y in enumerate(batch["labels"].tolist()) if y != IGNORE]
        return self.labels.loss_sum(logits, batch["labels"], device), out

    def eval_metrics(self, loss: float, outputs: list) -> tuple[dict[str, float], Optional[Report]]:
        rows = _gather(outputs)
        y_true, y_pred = [r[1] for r in rows], [r[2] for r in rows]
        names = self.labels.names
        values = M.label_metrics(y_true, y_pred, names)
        report = Report(M.label_report(y_true, y_pred, names), M.confusion(y_true, y_pred, len(names)),
                        names, dict(values, loss=loss, examples=len(rows)))
        return {"eval/loss": loss, **_prefixed(values)}, report

    def describe(self, ev: dict[str, float]) -> str:
        return f"loss {ev['eval/loss']:.4f} accuracy {ev['eval/accuracy']:.4f} f1_macro {ev['eval/f1_macro']:.4f}"


def encode_sequence(tok, text: str, pair: Optional[str], label_id: int, max_length: int) -> dict:
    """Tokenise a text (or pair) with the tokenizer's own special tokens; cut to max_length."""
    enc = tok(text, pair, truncation=True, max_length=max_length + 1)
    truncated = len(enc["input_ids"]) > max_length
    if truncated:
        enc = tok(text, pair, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc.get("token_type_ids"),
            "labels": label_id, "truncated": truncated}


# --------------------------------------------------------------------------- token classification


@dataclass
class TokenClassification:
    """One tag per word (CoNLL-2003 style); the first sub-word of a word carries its tag, the other
    sub-words and the special tokens are ignored in the loss and the metrics."""
    labels: _Labels
    kind: str = "token_classification"

    def auto_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def model_kwargs(self) -> dict:
        return self.labels.model_kwargs()

    def fetch(self, ds, indices: list[int], pad_id: int) -> dict:
        return _collate(_rows(ds, indices), indices, pad_id, per_token=True)

    def n_targets(self, batch: dict) -> int:
        return _n_labelled(batch)

    def loss_sum(self, engine, batch: dict, device: str):
        return self.labels.loss_sum(_logits(engine, batch, device), batch["labels"], device)

    def eval_step(self, engine, batch: dict, indices: list[int], device: str):
        logits = _logits(engine, batch, device)
        pred, gold = logits.argmax(-1).cpu(), batch["labels"]
        out = []
        for k in range(gold.shape[0]):
            keep = gold[k] != IGNORE
            if keep.any():
                out.append((indices[k], gold[k][keep].tolist(), pred[k][keep].tolist()))
        return self.labels.loss_sum(logits, gold, device), out

    def eval_metrics(self, loss: float, outputs: list) -> tuple[dict[str, float], Optional[Report]]:
        rows = _gather(outputs)
        return token_metrics(loss, [r[1] for r in rows], [r[2] for r in rows], self.labels.names)

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


def encode_words(tok, words: list[str], tag_ids: list[int], max_length: int) -> dict:
    """Sub-word ids for pre-split words; the tag goes on each word's first sub-word (fast
    tokenizer's word_ids()), IGNORE elsewhere. Words cut off by max_length lose their tags."""
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels, previous = [], None
    for w in enc.word_ids():
        labels.append(tag_ids[w] if w is not None and w != previous else IGNORE)
        previous = w
    kept = max((w for w in enc.word_ids() if w is not None), default=-1)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc.get("token_type_ids"),
            "labels": labels, "truncated": kept < len(words) - 1}


# --------------------------------------------------------------------------- labels and row checks (pure)


def label_names(values: Sequence, given: Optional[Sequence[str]], per_token: bool) -> list[str]:
    """The label set: the configured list, or the distinct values of the train split (integers in
    numeric order, otherwise sorted by name; "O" first for tags)."""
    if given is not None:
        return list(given)
    flat = [v for row in values for v in row] if per_token else list(values)
    distinct = {v for v in flat if v is not None}
    if distinct and all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    names = sorted({str(v) for v in distinct})
    if per_token and "O" in names:
        names.remove("O")
        names.insert(0, "O")
    return names


def label_id(value: Any, names: list[str], label2id: dict[str, int], ints_index: bool) -> Optional[int]:
    """A label value -> id, or None when it is not in the label set. With a configured label list,
    integers index it (as in datasets' ClassLabel columns)."""
    if ints_index and isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(names) else None
    return label2id.get(str(value))


def _label_problem(path: str, row: int, value: Any, column: str, names: list[str], source: str) -> str:
    return (f"{path}: row {row}: label {value!r} (column '{column}') is not in the label set {names} "
            f"({source}); add it to task.labels (every name, in id order) or fix the row")


def check_and_map_labels(path: str, columns: dict[str, list], task_cfg, text_field: str, names: list[str],
                         source: str) -> list:
    """Validate every row of one file and return its label ids (one per row, or one list per row).
    Raises DataError naming the file, the row (1-based) and the fix."""
    t = task_cfg
    label2id = {n: i for i, n in enumerate(names)}
    ints_index = t.labels is not None
    ids: list = []
    if t.type == "sequence_classification":
        texts, labels = columns[text_field], columns[t.label_field]
        pairs = columns[t.text_pair_field] if t.text_pair_field else None
        for i, value in enumerate(labels):
            row = i + 1
            if not isinstance(texts[i], str):
                raise DataError(f"{path}: row {row}: the text (column '{text_field}', data.text_field) is "
                                f"{texts[i]!r}, not a string; fix the row")
            if pairs is not None and not isinstance(pairs[i], str):
                raise DataError(f"{path}: row {row}: the second text of the pair (column '{t.text_pair_field}', "
                                f"task.text_pair_field) is {pairs[i]!r}; every row needs both texts, or remove "
                                "task.text_pair_field for single-text classification")
            if value is None:
                raise DataError(f"{path}: row {row}: no label (column '{t.label_field}' is null); label the row "
                                "or remove it")
            lid = label_id(value, names, label2id, ints_index)
            if lid is None:
                raise DataError(_label_problem(path, row, value, t.label_field, names, source))
            ids.append(lid)
        return ids
    words, tags = columns[t.tokens_field], columns[t.tags_field]
    for i, (ws, ts) in enumerate(zip(words, tags)):
        row = i + 1
        if not isinstance(ws, list) or not all(isinstance(w, str) for w in ws):
            raise DataError(f"{path}: row {row}: column '{t.tokens_field}' (task.tokens_field) must be a list of "
                            f"words (strings), got {ws!r}")
        if not isinstance(ts, list):
            raise DataError(f"{path}: row {row}: column '{t.tags_field}' (task.tags_field) must be a list of "
                            f"tags, one per word, got {ts!r}")
        if len(ws) != len(ts):
            raise DataError(f"{path}: row {row}: {len(ws)} tokens but {len(ts)} tags (columns '{t.tokens_field}' "
                            f"/ '{t.tags_field}'); give exactly one tag per word")
        row_ids = []
        for value in ts:
            lid = label_id(value, names, label2id, ints_index)
            if lid is None:
                raise DataError(_label_problem(path, row, value, t.tags_field, names, source))
            row_ids.append(lid)
        ids.append(row_ids)
    return ids


def check_columns(path: str, ds, task_cfg, text_field: str) -> None:
    """The columns the task reads exist; a text-pair config on single-text data is named as such."""
    t = task_cfg
    have = ds.column_names
    if t.type == "sequence_classification":
        if t.text_pair_field and t.text_pair_field not in have:
            raise DataError(f"{path}: row 1 has no column '{t.text_pair_field}' (task.text_pair_field), so this is "
                            f"single-text data (columns: {have}); remove task.text_pair_field for single-text "
                            "classification, or add the second text to every row")
        wanted = [(text_field, "data.text_field"), (t.label_field, "task.label_field")]
    else:
        wanted = [(t.tokens_field, "task.tokens_field"), (t.tags_field, "task.tags_field")]
    for col, key in wanted:
        if col not in have:
            raise DataError(f"{path}: row 1 has no column '{col}' ({key}) for task.type={t.type!r} (columns: "
                            f"{have}); rename the column or set {key}")


def class_weights(ids: list, n_labels: int, setting) -> Optional[list[float]]:
    """None, an explicit list, or 'auto': w_c = n / (k * n_c) over the train split's labels
    (scikit-learn's 'balanced'); a label absent from the train split gets weight 0."""
    if setting is None:
        return None
    if setting != "auto":
        return [float(w) for w in setting]
    flat = [i for row in ids for i in row] if ids and isinstance(ids[0], list) else list(ids)
    counts = [0] * n_labels
    for i in flat:
        counts[i] += 1
    n = len(flat)
    return [n / (n_labels * c) if c else 0.0 for c in counts]


# --------------------------------------------------------------------------- data preparation


def prepare_classification(cfg, tok, world):
    """Train / eval splits for a classification task, and the task (labels from config or data).
    Every row is checked before anything is tokenised: errors name the file and the row."""
    from trainer import data as D
    from trainer.dist import local_main_first

    d, t = cfg.data, cfg.task
    per_token = t.type == "token_classification"
    if per_token and not getattr(tok, "is_fast", False):
        raise DataError(f"token_classification aligns word tags to sub-words with a fast tokenizer's word_ids(); "
                        f"the tokenizer of {cfg.model.tokenizer or cfg.model.name_or_path!r} is not a fast one "
                        "(no tokenizer.json); use a model folder with tokenizer.json")
    label_col = t.tags_field if per_token else t.label_field
    files = [(d.train, D.load_rows(d.train))] + ([(d.eval, D.load_rows(d.eval))] if d.eval else [])
    for path, ds in files:
        check_columns(path, ds, t, d.text_field)
    names = label_names(files[0][1][label_col], t.labels, per_token)
    source = "task.labels" if t.labels is not None else f"read from the train split {d.train}"
    needed = [t.tokens_field, t.tags_field] if per_token else [d.text_field, t.label_field] + (
        [t.text_pair_field] if t.text_pair_field else [])
    mapped = []
    for path, ds in files:
        ids = check_and_map_labels(path, {c: ds[c] for c in needed}, t, d.text_field, names, source)
        mapped.append(ds.select_columns(needed).add_column("_label_ids", ids))
    train_raw, eval_raw = mapped[0], (mapped[1] if len(mapped) > 1 else None)
    if eval_raw is None and d.eval_fraction > 0:
        split = train_raw.train_test_split(test_size=d.eval_fraction, seed=cfg.seed)
        train_raw, eval_raw = split["train"], split["test"]
    labels = _Labels(names, class_weights(train_raw["_label_ids"], len(names), t.class_weights))
    task = TokenClassification(labels) if per_token else SequenceClassification(labels)

    def encode(row: dict) -> dict:
        if per_token:
            return encode_words(tok, row[t.tokens_field], row["_label_ids"], d.max_length)
        pair = row[t.text_pair_field] if t.text_pair_field else None
        return encode_sequence(tok, row[d.text_field], pair, row["_label_ids"], d.max_length)

    def tokenize(ds, desc: str):
        ds = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenising {desc}")
        truncated = int(sum(ds["truncated"]))
        ds = ds.remove_columns("truncated")
        dropped = 0
        if per_token:  # a row whose words were all cut off (or that has no words) has nothing to learn
            n = len(ds)
            ds = ds.filter(lambda r: any(x != IGNORE for x in r["labels"]), desc="dropping rows without tags")
            dropped = n - len(ds)
        return ds, truncated, dropped

    with local_main_first(world):
        train, tr_cut, tr_drop = tokenize(train_raw, "train")
        evals, ev_cut, ev_drop = tokenize(eval_raw, "eval") if eval_raw is not None else (None, 0, 0)
    if world.is_main:
        print(f"task {t.type}: {len(names)} labels {names} ({source})"
              + (f"; class weights {[round(w, 4) for w in labels.weights]}" if labels.weights else ""), flush=True)
        for name, s, cut, drop, n_in in (("train", train, tr_cut, tr_drop, len(train_raw)),
                                         ("eval", evals, ev_cut, ev_drop, len(eval_raw) if eval_raw else 0)):
            if s is not None:
                print(f"data/{name}: {n_in} rows, {cut} longer than max_length={d.max_length} truncated"
                      + (f" (words past the cut lose their tags), {drop} dropped (no tagged word left)"
                         if per_token else "") + f", {len(s)} examples", flush=True)
    return train, evals, task

