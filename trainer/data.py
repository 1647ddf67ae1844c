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


def _sizes(batch: dict[str, list]) -> dict[str, list]:
    """Per row: its length, and its targets (labels that are not IGNORE; one label per row counts 1)."""
    labels = batch["labels"]
    return {"length": [len(x) for x in batch["input_ids"]],
            "n_targets": [sum(t != IGNORE for t in y) if isinstance(y, list) else int(y != IGNORE) for y in labels]}


class _FreeSpace:
    """Open bins by free space: the bin with the least free space that still holds ``need`` in
    O(log capacity) (a segment tree over free-space values, a stack of bins per value)."""

    def __init__(self, capacity: int):
        self.size = 1 << (capacity + 1).bit_length()
        self.any = [False] * (2 * self.size)
        self.bins: dict[int, list[int]] = {}

    def _mark(self, space: int) -> None:
        i = space + self.size
        self.any[i] = bool(self.bins.get(space))
        while i > 1:
            i //= 2
            self.any[i] = self.any[2 * i] or self.any[2 * i + 1]

    def add(self, space: int, bin_id: int) -> None:
        self.bins.setdefault(space, []).append(bin_id)
        self._mark(space)

    def take(self, need: int) -> Optional[tuple[int, int]]:
        """(free space, bin) of the fullest bin with at least ``need`` free, removed; or None."""
        i = need + self.size
        if not self.any[i]:
            while i > 1 and not (i % 2 == 0 and self.any[i + 1]):
                i //= 2
            if i == 1:
                return None
            i += 1
            while i < self.size:
                i = 2 * i if self.any[2 * i] else 2 * i + 1
        space = i - self.size
        bin_id = self.bins[space].pop()
        self._mark(space)
        return space, bin_id


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity: items longest first (ties by index),
    each into the fullest bin it fits in. Deterministic; nothing is cut or dropped."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an item of length {int(lengths.max())} exceeds the bin capacity {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    bins: list[list[int]] = []
    free = _FreeSpace(capacity)
    for i in order.tolist():
        n = int(lengths[i])
        found = free.take(n)
        if found is None:
            found = (capacity, len(bins))
            bins.append([])
        space, b = found
        bins[b].append(i)
        free.add(space - n, b)
    return bins


class Rows:
    """A split as the loop batches it: ``rows[indices]`` gives the columns of those rows (like a
    ``datasets.Dataset``), and every row's token count (``lengths``) and target count (``targets``)
    are known up front, so each step's global counts need no collective.

    Packed (``blocks`` given): row i is the documents ``blocks[i]`` of ``docs`` concatenated, with
    ``position_ids`` restarting at 0 at each document and the first label of each document IGNORE
    (no document's first token is predicted from the previous document's last one)."""

    def __init__(self, docs, blocks: Optional[list[list[int]]] = None):
        import numpy as np

        self.docs, self.blocks = docs, blocks
        lengths, targets = np.asarray(docs["length"], dtype=np.int64), np.asarray(docs["n_targets"], dtype=np.int64)
        if blocks is None:
            self.lengths, self.targets = lengths, targets
        else:
            owner = np.repeat(np.arange(len(blocks)), [len(b) for b in blocks])
            flat = np.fromiter((i for b in blocks for i in b), dtype=np.int64, count=len(owner))
            self.lengths = np.bincount(owner, weights=lengths[flat], minlength=len(blocks)).astype(np.int64)
            self.targets = np.bincount(owner, weights=targets[flat], minlength=len(blocks)).astype(np.int64)

    @property
    def packed(self) -> bool:
        return self.blocks is not None

    def __len__(self) -> int:
        return len(self.lengths)

    def shapes(self, windows) -> list[tuple[int, int, int]]:
        """(tokens, width, targets) of every micro-batch of ``windows`` ([rank][micro-batch] -> rows):
        the step's counts on all ranks, from this rank alone."""
        import numpy as np

        idx = np.asarray(windows, dtype=np.int64).reshape(-1, len(windows[0][0]))
        lens = self.lengths[idx]
        return list(zip(lens.sum(axis=1).tolist(), lens.max(axis=1).tolist(), self.targets[idx].sum(axis=1).tolist()))

    def __getitem__(self, indices):
        if isinstance(indices, str):  # a column of the documents, as a Dataset gives it
            return self.docs[indices]
        if not self.packed:
            return self.docs[list(indices)]
        cols = self.docs[[d for i in indices for d in self.blocks[i]]]
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        k = 0
        for i in indices:
            ids, labels, pos = [], [], []
            for _ in self.blocks[i]:
                ids += cols["input_ids"][k]
                labels += [IGNORE] + cols["labels"][k][1:]
                pos += range(len(cols["input_ids"][k]))
                k += 1
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(pos)
        return out


@dataclass
class TokenizedSplit:
    dataset: Any  # datasets.Dataset of encoded rows (documents) with input_ids, labels, length, n_targets
    rows: Rows  # what the loop batches from: the documents, or packed rows of them
    rows_in: int
    truncated: int
    dropped_no_target: int
    tokens_in: int = 0  # tokens of the kept rows before truncation
    tokens_cut: int = 0  # of which cut off by max_length


def tokenize(ds, encoder, packing: bool, max_length: int, desc: str) -> TokenizedSplit:
    """Encode every row (trainer/encode.py), count the truncated ones (and the tokens cut), drop those
    left without a target, and pack the whole split when asked (best-fit decreasing)."""
    rows_in = len(ds)
    ds = ds.map(encoder, remove_columns=ds.column_names, desc=f"tokenising {desc}")
    truncated = int(sum(ds["truncated"]))
    ds = ds.remove_columns("truncated")
    ds = ds.filter(encoder.has_target, desc="dropping rows with no target")
    dropped = rows_in - len(ds)
    ds = ds.map(_sizes, batched=True, desc="counting tokens")
    tokens = int(sum(ds["length"]))
    cut = 0
    if "tokens_cut" in ds.column_names:
        cut = int(sum(ds["tokens_cut"]))
        ds = ds.remove_columns("tokens_cut")
    rows = Rows(ds, best_fit_decreasing(ds["length"], max_length) if packing else None)
    return TokenizedSplit(ds, rows, rows_in, truncated, dropped, tokens + cut, cut)


# --------------------------------------------------------------------------- order and batches

GROUP_MEGABATCH = 50  # group_by_length: sort by length within windows of 50 global micro-batches (as HF does)


class Order:
    """Which rows every rank uses at each optimizer step: a pure function of (seed, epoch, step), so
    a resumed run sees exactly the batches it would have. An epoch is a seeded permutation cut to an
    equal share per rank (rank r takes positions r, r + world, ...). With ``lengths`` (length grouping)
    the permutation is cut into windows of GROUP_MEGABATCH x world x micro rows, each sorted by length,
    and its global micro-batches (world x micro consecutive rows: one micro-batch per rank) are shuffled:
    rows of similar length share a micro-batch, ranks step through similar lengths together."""

    def __init__(self, n: int, world: int, micro: int, accum: int, seed: int, lengths=None, shuffle: bool = True):
        self.n, self.world, self.micro, self.accum, self.seed = n, world, micro, accum, seed
        self.lengths, self.shuffle = lengths, shuffle
        self.per_rank = n // world
        self.steps_per_epoch = self.per_rank // (micro * accum)
        self._epoch: Optional[tuple[int, Any]] = None

    def epoch(self, epoch: int):
        """(world, per_rank) array: each rank's rows of this epoch, in order."""
        import numpy as np
        import torch

        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
        else:
            perm = np.arange(self.n)
        perm = perm[: self.per_rank * self.world]
        if self.lengths is not None:
            perm = self._grouped(perm, epoch)
        order = perm.reshape(self.per_rank, self.world).T
        self._epoch = (epoch, order)
        return order

    def _grouped(self, perm, epoch: int):
        import numpy as np

        unit = self.world * self.micro
        usable = len(perm) // unit * unit
        head, tail = perm[:usable], perm[usable:]
        size = unit * GROUP_MEGABATCH
        parts = []
        for s in range(0, usable, size):
            mega = head[s:s + size]
            parts.append(mega[np.argsort(-np.asarray(self.lengths)[mega], kind="stable")])
        units = np.concatenate(parts).reshape(-1, unit) if parts else head.reshape(0, unit)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 1]))
        return np.concatenate([units[rng.permutation(len(units))].reshape(-1), tail])

    def windows(self, step: int) -> list[list[list[int]]]:
        """[rank][micro-batch] -> row indices of optimizer step ``step``, for every rank."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.micro * self.accum
        block = self.epoch(epoch)[:, start:start + self.micro * self.accum]
        return block.reshape(self.world, self.accum, self.micro).tolist()

    def padding(self, lengths) -> tuple[int, int]:
        """(padding, computed) tokens of epoch 0 on all ranks: each micro-batch is padded to its longest row."""
        import numpy as np

        rows = self.epoch(0)[:, : self.steps_per_epoch * self.micro * self.accum].reshape(-1, self.micro)
        lens = np.asarray(lengths)[rows]
        total = int(lens.max(axis=1).sum()) * self.micro if lens.size else 0
        return total - int(lens.sum()), total


class Prefetch:
    """Assembles the next step's micro-batches on a background thread while this step computes
    (the batches are a pure function of the step, so this changes nothing but the wall time).
    ``background=False``: each step's batches are made when asked for."""

    def __init__(self, make, background: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.make, self.pending = make, None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if background else None

    def get(self, step: int, next_step: Optional[int]):
        ready = self.pending is not None and self.pending[0] == step
        batches = self.pending[1].result() if ready else self.make(step)
        if self.pool is not None and next_step is not None:
            self.pending = (next_step, self.pool.submit(self.make, next_step))
        return batches

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def rank_order(n: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This rank's indices for one epoch: a seeded permutation, dealt round-robin, equal per rank."""
    return Order(n, world, 1, 1, seed, shuffle=shuffle).epoch(epoch)[rank].tolist()


def steps_per_epoch(n: int, world: int, micro: int, accum: int) -> int:
    return (n // world) // (micro * accum)


def window_indices(n: int, world: int, rank: int, seed: int, micro: int, accum: int, step: int) -> list[list[int]]:
    """The ``accum`` micro-batches (lists of row indices) this rank uses for optimizer step ``step``."""
    return Order(n, world, micro, accum, seed).windows(step)[rank]


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
    loses its labels. Packed rows also carry ``position_ids``; their padding is one more document
    (positions 0, 1, ...) that nothing attends to and that has no target."""
    import torch

    n, width = len(rows), max(len(r["input_ids"]) for r in rows)
    per_token = isinstance(rows[0]["labels"], list)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width) if per_token else (n,), IGNORE, dtype=torch.long)
    with_types = rows[0].get("token_type_ids") is not None
    types = torch.zeros((n, width), dtype=torch.long)
    packed = rows[0].get("position_ids") is not None
    positions = torch.arange(width, dtype=torch.long).repeat(n, 1)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        mask[i, :k] = 1
        if with_types:
            types[i, :k] = torch.tensor(r["token_type_ids"])
        if packed:
            positions[i, :k] = torch.tensor(r["position_ids"])
            positions[i, k:] -= k
        if indices[i] >= 0 and per_token:
            labels[i, :k] = torch.tensor(r["labels"])
        elif indices[i] >= 0:
            labels[i] = r["labels"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_types:
        batch["token_type_ids"] = types
    if packed:
        batch["position_ids"] = positions
    return batch


def fetch(ds, indices: list[int], pad_id: int) -> dict[str, Any]:
    """Collate rows by index (``ds``: a Rows or a datasets.Dataset); index -1 gives a copy of row 0
    that contributes no loss."""
    cols = ds[[i if i >= 0 else 0 for i in indices]]  # column -> list of values
    rows = [{k: cols[k][j] for k in cols} for j in range(len(indices))]
    return collate(rows, indices, pad_id)


def target_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens that carry loss (labels shifted by one for next-token prediction)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum().item())


def total_steps_for(cfg, n_train: int, plan) -> int:
    """train.max_steps, or train.epochs over ``n_train`` rows at the plan's global batch."""
    spe = steps_per_epoch(n_train, plan.world_size, plan.micro_batch_size, plan.grad_accum)
    if spe == 0:
        raise DataError(f"the train split has {n_train} examples but one optimizer step needs "
                        f"{plan.global_batch_size} (micro x accum x world); add data or lower train.micro_batch_size")
    return cfg.train.max_steps or max(1, int(cfg.train.epochs * spe))
