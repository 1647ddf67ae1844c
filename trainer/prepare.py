"""The one data pipeline, for every task:

    load -> check columns and rows -> split -> encode (the task's encoder) -> tokenise once per node
    -> pack (data.packing: best-fit decreasing over the whole split) -> one stats line per split

``prepare(cfg, tok, world, plan)`` returns the train and eval rows and the task object the loop uses.
Local rank 0 of each node tokenises first; the other ranks of the node then read the datasets cache
(packing is a pure function of the row lengths, so every rank computes the same blocks itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from launcher.config import RunConfig
from trainer import data as D
from trainer.encode import encoder_for
from trainer.tasks import Task


@dataclass
class Prepared:
    train: D.Rows  # encoded rows (or packed blocks of them) with their lengths and target counts
    eval: Optional[D.Rows]
    task: Task
    stats: dict[str, float] = field(default_factory=dict)  # data/... scalars for TensorBoard


def split(train_rows, eval_rows, eval_fraction: float, seed: int):
    """(train, eval): the eval file, or a seeded fraction of the train file, or no eval."""
    if eval_rows is None and eval_fraction > 0:
        parts = train_rows.train_test_split(test_size=eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train_rows, eval_rows


def padding_of(s: D.TokenizedSplit, d, plan, world_size: int, seed: int) -> float:
    """Fraction of the tokens computed in epoch 0 that are padding (each micro-batch is padded to its
    longest row; the order is the loop's, length-grouped or not)."""
    rows = s.rows
    order = D.Order(len(rows), world_size, plan.micro_batch_size, plan.grad_accum, seed,
                    rows.lengths if d.group_by_length else None)
    pad, total = order.padding(rows.lengths) if order.steps_per_epoch else (0, 0)
    return pad / total if total else 0.0


def stats_line(name: str, s: D.TokenizedSplit, d, encoder, padding: Optional[float]) -> str:
    unit = "packed rows (best-fit decreasing, documents masked from each other)" if d.packing else "examples"
    cut = f" ({s.tokens_cut / max(1, s.tokens_in):.2%} of the tokens dropped)" if s.tokens_in and s.tokens_cut else ""
    pad = f"; padding {padding:.2%} of the tokens computed in epoch 0" if padding is not None else ""
    grouped = " (length-grouped batches)" if d.group_by_length and padding is not None else ""
    return (f"data/{name}: {s.rows_in} rows, {s.truncated} longer than max_length={d.max_length} truncated"
            f"{encoder.truncation_note}{cut}, {s.dropped_no_target} dropped ({encoder.drop_reason}), "
            f"{len(s.rows)} {unit}{pad}{grouped}")


def prepare(cfg: RunConfig, tok, world, plan) -> Prepared:
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
    padding = padding_of(train, d, plan, world.world_size, cfg.seed)
    stats = {"data/train_padding_fraction": padding,
             "data/train_dropped_token_fraction": train.tokens_cut / max(1, train.tokens_in),
             "data/train_documents_per_row": len(train.dataset) / max(1, len(train.rows))}
    if world.is_main:
        lines = [encoder.describe()] + [stats_line(name, s, d, encoder, padding if name == "train" else None)
                                        for name, s in (("train", train), ("eval", evals)) if s is not None]
        print("\n".join(line for line in lines if line), flush=True)
    return Prepared(train.rows, evals.rows if evals is not None else None, task, stats)
