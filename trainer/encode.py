"""Row encoders, one per kind of task: a raw row -> token ids + loss labels.

    encoder_for(cfg, tok) -> CausalLMEncoder | ClassificationEncoder

An encoder tells the data pipeline (trainer/prepare.py) what it needs and does:
    check(path, ds)          the columns it reads exist, and every row is valid (errors name the file
                             and the row); may map columns (classification: label values -> ids, the
                             label set read from the first file checked, the train split)
    __call__(row)            {"input_ids", "labels", ["token_type_ids"], "truncated"}
    has_target(row)          False drops the encoded row (nothing left to learn after truncation)
    task(train_rows)         the task object the loop uses (trainer/tasks.py)
    describe()               a line for the log (the label set), or None
    truncation_note, drop_reason    what the stats line says about truncated and dropped rows

Pure functions below do the work, so they can be tested with a real tokenizer and no ranks.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from launcher.config import DataConfig, RunConfig, TaskConfig
from trainer.data import IGNORE, DataError, check_columns
from trainer.tasks import CausalLM, Classification, Labels


# --------------------------------------------------------------------------- causal LM


def encode_prompt_response(tok, prompt: str, response: str, mask_prompt: bool) -> tuple[list[int], list[int]]:
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        r = r + [tok.eos_token_id]
    return p + r, ([IGNORE] * len(p) if mask_prompt else list(p)) + r


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    ids = tok(text)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return ids, list(ids)


def _chat_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def encode_chat(tok, messages: list[dict], mask_prompt: bool) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; only assistant turns are learned by default."""
    ids = _chat_ids(tok, messages)
    if not mask_prompt:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(_chat_ids(tok, messages[:i], add_generation_prompt=True))
        end = len(_chat_ids(tok, messages[: i + 1]))
        if ids[:end] != _chat_ids(tok, messages[: i + 1]):
            raise DataError("the chat template does not render conversations prefix-consistently, so "
                            "assistant turns cannot be located; set data.mask_prompt=false")
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_lm_row(tok, d: DataConfig, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    if d.format == "text":
        return encode_text(tok, row[d.text_field])
    if d.format == "prompt_response":
        return encode_prompt_response(tok, row[d.prompt_field], row[d.response_field], d.mask_prompt)
    return encode_chat(tok, row[d.messages_field], d.mask_prompt)


class CausalLMEncoder:
    """text / prompt_response / chat rows -> ids and next-token labels (prompts masked by default).
    The first label of a row is always IGNORE: no token predicts it (the loss compares position t's
    logits with label t + 1), so a row's targets are exactly its labels that are not IGNORE, packed or not."""

    def __init__(self, tok, d: DataConfig, loss_chunk_tokens: int = 0, liger: bool = False):
        self.tok, self.d = tok, d
        self.loss_chunk_tokens, self.liger = loss_chunk_tokens, liger
        keys = {"text": [("text_field", d.text_field)],
                "prompt_response": [("prompt_field", d.prompt_field), ("response_field", d.response_field)],
                "chat": [("messages_field", d.messages_field)]}[d.format]
        self.columns = [(column, f"data.{key}") for key, column in keys]
        self.context = f"data.format={d.format!r}"
        self.truncation_note = ""
        self.drop_reason = "no target tokens left"

    def check(self, path: str, ds):
        check_columns(ds, path, self.columns, self.context)
        return ds

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        ids, labels = encode_lm_row(self.tok, self.d, row)
        n = self.d.max_length
        return {"input_ids": ids[:n], "labels": ([IGNORE] + labels[1:n]) if ids else [], "truncated": len(ids) > n,
                "tokens_cut": max(0, len(ids) - n)}

    def has_target(self, row: dict[str, Any]) -> bool:
        return any(t != IGNORE for t in row["labels"][1:])

    def task(self, train_rows) -> CausalLM:
        return CausalLM(self.loss_chunk_tokens, self.d.max_length, self.liger)

    def describe(self) -> Optional[str]:
        return None


# --------------------------------------------------------------------------- classification


def encode_sequence(tok, text: str, pair: Optional[str], label_id: int, max_length: int) -> dict:
    """Tokenise a text (or pair) with the tokenizer's own special tokens; cut to max_length."""
    enc = tok(text, pair, truncation=True, max_length=max_length + 1)
    truncated = len(enc["input_ids"]) > max_length
    if truncated:
        enc = tok(text, pair, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "token_type_ids": enc.get("token_type_ids"),
            "labels": label_id, "truncated": truncated}


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


def check_classification_columns(path: str, ds, t: TaskConfig, text_field: str) -> None:
    """The columns the task reads exist; a text-pair config on single-text data is named as such."""
    have = ds.column_names
    if t.type == "sequence_classification" and t.text_pair_field and t.text_pair_field not in have:
        raise DataError(f"{path}: row 1 has no column '{t.text_pair_field}' (task.text_pair_field), so this is "
                        f"single-text data (columns: {have}); remove task.text_pair_field for single-text "
                        "classification, or add the second text to every row")
    check_columns(ds, path, classification_columns(t, text_field), f"task.type={t.type!r}")


def classification_columns(t: TaskConfig, text_field: str) -> list[tuple[str, str]]:
    if t.type == "token_classification":
        return [(t.tokens_field, "task.tokens_field"), (t.tags_field, "task.tags_field")]
    pair = [(t.text_pair_field, "task.text_pair_field")] if t.text_pair_field else []
    return [(text_field, "data.text_field"), *pair, (t.label_field, "task.label_field")]


class ClassificationEncoder:
    """Sequence (one label per text or text pair) or token classification (one tag per word)."""

    def __init__(self, tok, cfg: RunConfig):
        self.tok, self.t, self.d = tok, cfg.task, cfg.data
        self.per_token = self.t.type == "token_classification"
        if self.per_token and not getattr(tok, "is_fast", False):
            raise DataError(f"token_classification aligns word tags to sub-words with a fast tokenizer's word_ids(); "
                            f"the tokenizer of {cfg.model.tokenizer or cfg.model.name_or_path!r} is not a fast one "
                            "(no tokenizer.json); use a model folder with tokenizer.json")
        self.columns = classification_columns(self.t, self.d.text_field)
        self.context = f"task.type={self.t.type!r}"
        self.names: Optional[list[str]] = None  # the label set, fixed by the first file checked (train)
        self.source = ""
        self.weights: Optional[list[float]] = None
        self.truncation_note = " (words past the cut lose their tags)" if self.per_token else ""
        self.drop_reason = "no tagged word left" if self.per_token else "no label"

    def check(self, path: str, ds):
        """Every row checked, labels mapped to ids (column ``_label_ids``), only the used columns kept."""
        t = self.t
        check_classification_columns(path, ds, t, self.d.text_field)
        label_col = t.tags_field if self.per_token else t.label_field
        if self.names is None:
            self.names = label_names(ds[label_col], t.labels, self.per_token)
            self.source = "task.labels" if t.labels is not None else f"read from the train split {path}"
        needed = [c for c, _ in self.columns]
        ids = check_and_map_labels(path, {c: ds[c] for c in needed}, t, self.d.text_field, self.names, self.source)
        return ds.select_columns(needed).add_column("_label_ids", ids)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        t, n = self.t, self.d.max_length
        if self.per_token:
            return encode_words(self.tok, row[t.tokens_field], row["_label_ids"], n)
        pair = row[t.text_pair_field] if t.text_pair_field else None
        return encode_sequence(self.tok, row[self.d.text_field], pair, row["_label_ids"], n)

    def has_target(self, row: dict[str, Any]) -> bool:
        if self.per_token:  # a row whose words were all cut off (or that has no words) has nothing to learn
            return any(x != IGNORE for x in row["labels"])
        return True

    def task(self, train_rows) -> Classification:
        self.weights = class_weights(train_rows["_label_ids"], len(self.names), self.t.class_weights)
        return Classification(Labels(self.names, self.weights), per_token=self.per_token)

    def describe(self) -> Optional[str]:
        return (f"task {self.t.type}: {len(self.names)} labels {self.names} ({self.source})"
                + (f"; class weights {[round(w, 4) for w in self.weights]}" if self.weights else ""))


def encoder_for(cfg: RunConfig, tok):
    """The encoder of cfg.task.type."""
    if cfg.task.type == "causal_lm":
        return CausalLMEncoder(tok, cfg.data, cfg.train.loss_chunk_tokens, cfg.model.liger)
    return ClassificationEncoder(tok, cfg)


