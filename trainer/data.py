"""Data: local files -> datasets.Dataset -> token ids + loss labels -> per-rank micro-batches.

Pure pieces (tokenising a row, the sampling order, collation) are plain functions so they can
be tested without ranks. The order is a function of (seed, epoch, rank, step): resuming needs
only the step.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

IGNORE = -100
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    pass


# --------------------------------------------------------------------------- loading


def _locate_bad_json_line(path: Path) -> Optional[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix or remove that line"
    return None


def _unexpandable(path: Path) -> Path:
    """``datasets`` expands ``$VAR`` and ``~`` inside data_files, so a literal '$' in a real path
    breaks it. Such files are loaded through a symlink with a plain name (stable per path, so
    every rank on a node shares one cache entry)."""
    text = str(path.resolve())
    if os.path.expandvars(os.path.expanduser(text)) == text and "~" not in text:
        return path
    import hashlib

    links = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds-slurm-finetune" / "data-links"
    links.mkdir(parents=True, exist_ok=True)
    link = links / (hashlib.sha1(text.encode()).hexdigest()[:16] + path.suffix)
    if not link.is_symlink() or os.readlink(link) != text:
        tmp = link.with_name(link.name + f".{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(text)
        os.replace(tmp, link)
    return link


def load_rows(path_str: str):
    """A local jsonl/json/csv/parquet file or a ``save_to_disk`` folder -> datasets.Dataset."""
    import datasets

    path = Path(path_str)
    if not path.exists():
        raise DataError(f"data file {path_str!r} does not exist; check data.train / data.eval")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (has {list(ds)}); save one split")
            ds = ds["train"]
    else:
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_BUILDERS)} "
                            "or a save_to_disk folder")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; it needs at least one row")
        try:
            ds = datasets.load_dataset(builder, data_files=str(_unexpandable(path)), split="train")
        except Exception as e:  # datasets' own errors rarely name the line
            where = _locate_bad_json_line(path) if builder == "json" else None
            raise DataError(where or f"{path}: could not be read as {builder} ({type(e).__name__}: {e})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows; it needs at least one")
    return ds


def required_columns(fmt: str, text: str, prompt: str, response: str, messages: str) -> list[str]:
    return {"text": [text], "prompt_response": [prompt, response], "chat": [messages]}[fmt]


def check_columns(ds, path: str, needed: list[str], fmt: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        key = {"text": "text_field", "prompt_response": "prompt_field / data.response_field",
               "chat": "messages_field"}[fmt]
        raise DataError(f"{path}: column(s) {missing} missing for data.format={fmt!r} "
                        f"(the file has {ds.column_names}); rename the column(s) or set data.{key}")


# --------------------------------------------------------------------------- tokenising


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


def make_encoder(tok, fmt: str, fields: dict[str, str], mask_prompt: bool, max_length: int) -> Callable:
    """Row -> {input_ids, labels, truncated}. Over-long rows are cut to max_length and flagged."""

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        if fmt == "text":
            ids, labels = encode_text(tok, row[fields["text"]])
        elif fmt == "prompt_response":
            ids, labels = encode_prompt_response(tok, row[fields["prompt"]], row[fields["response"]], mask_prompt)
        else:
            ids, labels = encode_chat(tok, row[fields["messages"]], mask_prompt)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": len(ids) > max_length}

    return encode


def pack(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Concatenate rows and cut into max_length blocks (the tail that does not fill one is dropped)."""
    ids = [t for row in batch["input_ids"] for t in row]
    labels = [t for row in batch["labels"] for t in row]
    n = len(ids) // max_length * max_length
    return {"input_ids": [ids[i:i + max_length] for i in range(0, n, max_length)],
            "labels": [labels[i:i + max_length] for i in range(0, n, max_length)]}


@dataclass
class TokenizedSplit:
    dataset: Any  # datasets.Dataset with input_ids, labels
    rows_in: int
    truncated: int
    dropped_no_target: int


def tokenize(ds, encode: Callable, packing: bool, max_length: int, desc: str) -> TokenizedSplit:
    rows_in = len(ds)
    ds = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenising {desc}")
    truncated = int(sum(ds["truncated"]))
    ds = ds.remove_columns("truncated")
    ds = ds.filter(lambda r: any(t != IGNORE for t in r["labels"][1:]), desc="dropping rows with no target")
    dropped = rows_in - len(ds)
    if packing:
        ds = ds.map(lambda b: pack(b, max_length), batched=True, batch_size=1000, desc="packing")
    return TokenizedSplit(ds, rows_in, truncated, dropped)


# --------------------------------------------------------------------------- order and batches


def rank_order(n: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This rank's indices for one epoch: a seeded permutation, dealt round-robin, equal per rank."""
    import torch

    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
    else:
        perm = list(range(n))
    per_rank = n // world
    return perm[rank::world][:per_rank]


def steps_per_epoch(n: int, world: int, micro: int, accum: int) -> int:
    return (n // world) // (micro * accum)


def window_indices(n: int, world: int, rank: int, seed: int, micro: int, accum: int, step: int) -> list[list[int]]:
    """The ``accum`` micro-batches (lists of row indices) this rank uses for optimizer step ``step``."""
    spe = steps_per_epoch(n, world, micro, accum)
    epoch, within = divmod(step, spe)
    order = rank_order(n, world, rank, seed, epoch)
    start = within * micro * accum
    return [order[start + k * micro: start + (k + 1) * micro] for k in range(accum)]


def eval_batches(n: int, world: int, rank: int, micro: int) -> list[list[int]]:
    """Every eval row once across ranks; ranks get equal batch counts (ZeRO-3 needs lock-step),
    padded with index -1 meaning 'a row with no loss'."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    per_rank = -(-per_rank // micro) * micro
    mine += [-1] * (per_rank - len(mine))
    return [mine[i:i + micro] for i in range(0, per_rank, micro)]


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def fetch(ds, indices: list[int], pad_id: int) -> dict[str, Any]:
    """Collate rows by index; index -1 gives a copy of row 0 that contributes no loss."""
    real = [i if i >= 0 else 0 for i in indices]
    rows = ds[real]  # column -> list of values
    rows = [{"input_ids": rows["input_ids"][k],
             "labels": rows["labels"][k] if indices[k] >= 0 else [IGNORE] * len(rows["labels"][k])}
            for k in range(len(indices))]
    return collate(rows, pad_id)


def target_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens that carry loss (labels shifted by one for next-token prediction)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum().item())
