"""The one data pipeline, for every task:

    load -> check columns and rows -> split -> encode (the task's encoder) -> tokenise once per node
    -> one stats line per split

``prepare(cfg, tok, world)`` returns the train and eval datasets and the task object the loop uses.
Local rank 0 of each node tokenises first; the other ranks of the node then read the datasets cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from launcher.config import RunConfig
from trainer import data as D
from trainer.encode import encoder_for
from trainer.tasks import Task


@dataclass
class Prepared:
    train: Any  # datasets.Dataset of encoded rows
    eval: Optional[Any]
    task: Task


def split(train_rows, eval_rows, eval_fraction: float, seed: int):
    """(train, eval): the eval file, or a seeded fraction of the train file, or no eval."""
    if eval_rows is None and eval_fraction > 0:
        parts = train_rows.train_test_split(test_size=eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train_rows, eval_rows


def stats_line(name: str, s: D.TokenizedSplit, d, encoder) -> str:
    unit = "packed blocks" if d.packing else "examples"
    return (f"data/{name}: {s.rows_in} rows, {s.truncated} longer than max_length={d.max_length} truncated"
            f"{encoder.truncation_note}, {s.dropped_no_target} dropped ({encoder.drop_reason}), "
            f"{len(s.dataset)} {unit}")


def prepare(cfg: RunConfig, tok, world) -> Prepared:
    from trainer.dist import local_main_first

    d = cfg.data
    encoder = encoder_for(cfg, tok)
    files = [(path, D.load_rows(path)) for path in (d.train, d.eval) if path is not None]
    checked = [encoder.check(path, rows) for path, rows in files]  # columns and rows; the first is train
    train_rows, eval_rows = split(checked[0], checked[1] if len(checked) > 1 else None, d.eval_fraction, cfg.seed)
    task = encoder.task(train_rows)
    with local_main_first(world):
        train = D.tokenize(train_rows, encoder, d.packing, d.max_length, "train")
        evals = D.tokenize(eval_rows, encoder, d.packing, d.max_length, "eval") if eval_rows is not None else None
    if world.is_main:
        lines = [encoder.describe()] + [stats_line(name, s, d, encoder)
                                        for name, s in (("train", train), ("eval", evals)) if s is not None]
        print("\n".join(line for line in lines if line), flush=True)
    return Prepared(train.dataset, evals.dataset if evals is not None else None, task)
