"""Data: local files -> datasets.Dataset; encoded rows -> per-rank micro-batches.

The same pieces serve every task (the row encoders are in trainer/encode.py, the pipeline that
strings them together in trainer/prepare.py). Pure pieces (the sampling order, collation) are
plain functions so they can be tested without ranks. The order is a function of (seed, epoch,
rank, step): resuming needs only the step.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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


def check_columns(ds, path: str, wanted: list[tuple[str, str]], context: str) -> None:
    """Every (column, config key) in ``wanted`` is a column of ``ds``; else one message naming the
    missing columns, the file's columns and the keys that name them."""
    missing = [c for c, _ in wanted if c not in ds.column_names]
    if missing:
        keys = " / ".join(dict.fromkeys(k for _, k in wanted))
        raise DataError(f"{path}: column(s) {missing} missing for {context} (the file has {ds.column_names}); "
                        f"rename the column(s) or set {keys}")


# --------------------------------------------------------------------------- tokenising


def pack(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Concatenate rows and cut into max_length blocks (the tail that does not fill one is dropped)."""
    ids = [t for row in batch["input_ids"] for t in row]
    labels = [t for row in batch["labels"] for t in row]
    n = len(ids) // max_length * max_length
    return {"input_ids": [ids[i:i + max_length] for i in range(0, n, max_length)],
            "labels": [labels[i:i + max_length] for i in range(0, n, max_length)]}


@dataclass
class TokenizedSplit:
    dataset: Any  # datasets.Dataset with input_ids, labels (and token_type_ids for some encoders)
    rows_in: int
    truncated: int
    dropped_no_target: int


def tokenize(ds, encoder, packing: bool, max_length: int, desc: str) -> TokenizedSplit:
    """Encode every row (trainer/encode.py), count the truncated ones, drop those left without a
    target, and pack when asked."""
    rows_in = len(ds)
    ds = ds.map(encoder, remove_columns=ds.column_names, desc=f"tokenising {desc}")
    truncated = int(sum(ds["truncated"]))
    ds = ds.remove_columns("truncated")
    ds = ds.filter(encoder.has_target, desc="dropping rows with no target")
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


def collate(rows: list[dict[str, Any]], indices: list[int], pad_id: int) -> dict[str, Any]:
    """Pad a micro-batch: input ids with ``pad_id``, attention mask and token types with 0; labels
    one per row, or one per token padded with IGNORE. A padding row (index -1) keeps its inputs but
    loses its labels."""
    import torch

    n, width = len(rows), max(len(r["input_ids"]) for r in rows)
    per_token = isinstance(rows[0]["labels"], list)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width) if per_token else (n,), IGNORE, dtype=torch.long)
    with_types = rows[0].get("token_type_ids") is not None
    types = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        mask[i, :k] = 1
        if with_types:
            types[i, :k] = torch.tensor(r["token_type_ids"])
        if indices[i] >= 0 and per_token:
            labels[i, :k] = torch.tensor(r["labels"])
        elif indices[i] >= 0:
            labels[i] = r["labels"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_types:
        batch["token_type_ids"] = types
    return batch


def fetch(ds, indices: list[int], pad_id: int) -> dict[str, Any]:
    """Collate rows by index; index -1 gives a copy of row 0 that contributes no loss."""
    cols = ds[[i if i >= 0 else 0 for i in indices]]  # column -> list of values
    rows = [{k: cols[k][j] for k in cols} for j in range(len(indices))]
    return collate(rows, indices, pad_id)


def target_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens that carry loss (labels shifted by one for next-token prediction)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum().item())
