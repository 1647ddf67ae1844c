"""Data pipeline pieces and the LR schedule: single process, real tokenizer and datasets."""
from __future__ import annotations

import pytest

from helpers import TOKENIZER, arith_rows, write_jsonl
from launcher.config import DataConfig
from trainer import data as D
from trainer import encode as E
from trainer.optim import lr_factor


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_prompt_tokens_are_masked_and_response_ends_with_eos(tok):
    ids, labels = E.encode_prompt_response(tok, "What is 1 plus 2?", " 1 plus 2 is 3.", mask_prompt=True)
    n_prompt = len(tok("What is 1 plus 2?")["input_ids"])
    assert labels[:n_prompt] == [D.IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    _, unmasked = E.encode_prompt_response(tok, "What is 1 plus 2?", " 1 plus 2 is 3.", mask_prompt=False)
    assert unmasked == ids


def test_chat_learns_only_assistant_turns(tok):
    msgs = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": " 3."},
            {"role": "user", "content": "And 2 plus 2?"}, {"role": "assistant", "content": " 4."}]
    ids, labels = E.encode_chat(tok, msgs, mask_prompt=True)
    learned = tok.decode([i for i, l in zip(ids, labels) if l != D.IGNORE])
    assert learned == " 3.</s> 4.</s>"
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))


def test_truncation_is_counted_and_rows_without_targets_dropped(tok, tmp_path):
    rows = [{"prompt": "What is 1 plus 2?", "response": " 3."},
            {"prompt": "What is 1 plus 2?" + " please" * 30, "response": " 3."},  # prompt fills max_length
            {"prompt": "Hi", "response": " a long answer" * 20}]
    ds = D.load_rows(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    enc = E.CausalLMEncoder(tok, DataConfig(train="t.jsonl", format="prompt_response", max_length=24))
    split = D.tokenize(ds, enc, packing=False, max_length=24, desc="t")
    assert (split.rows_in, split.truncated, split.dropped_no_target, len(split.dataset)) == (3, 2, 1, 2)
    assert max(len(r) for r in split.dataset["input_ids"]) == 24


def test_packing_fills_blocks():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[-100, 2, 3], [4, 5], [6, 7, 8, 9]]}
    out = D.pack(batch, 4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]] and out["labels"] == [[-100, 2, 3, 4], [5, 6, 7, 8]]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "disk"])
def test_other_file_types_load(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(arith_rows(5))
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: ds.to_csv(str(path)), "parquet": lambda: ds.to_parquet(str(path)),
     "disk": lambda: ds.save_to_disk(str(path))}[fmt]()
    assert D.load_rows(str(path))["prompt"] == ds["prompt"]


def test_bad_files_name_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(D.DataError, match=r"empty.jsonl: the file is empty"):
        D.load_rows(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:3: malformed JSON"):
        D.load_rows(str(bad))
    with pytest.raises(D.DataError, match=r"does not exist"):
        D.load_rows(str(tmp_path / "none.jsonl"))
    ds = D.load_rows(str(write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "response": "r"}])))
    with pytest.raises(D.DataError) as e:
        D.check_columns(ds, "ok.jsonl", [("prompt", "data.prompt_field"), ("response", "data.response_field")],
                        "data.format='prompt_response'")
    assert "column(s) ['prompt'] missing" in str(e.value) and "['question', 'response']" in str(e.value)
    assert "data.prompt_field" in str(e.value)


def test_order_is_seeded_disjoint_across_ranks_and_resumable():
    a0 = D.rank_order(100, 2, 0, seed=3, epoch=0)
    a1 = D.rank_order(100, 2, 1, seed=3, epoch=0)
    assert len(a0) == len(a1) == 50 and not set(a0) & set(a1)
    assert a0 == D.rank_order(100, 2, 0, seed=3, epoch=0) != D.rank_order(100, 2, 0, seed=3, epoch=1)
    # accumulation 4 x micro 2 consumes exactly the rows of micro 8 x accum 1, step by step
    for step in range(8):
        w42 = D.window_indices(100, 2, 1, 3, 2, 4, step)
        w18 = D.window_indices(100, 2, 1, 3, 8, 1, step)
        assert [i for mb in w42 for i in mb] == w18[0]
    # steps past one epoch continue into the next epoch's permutation
    spe = D.steps_per_epoch(100, 2, 8, 1)
    assert spe == 6 and D.window_indices(100, 2, 0, 3, 8, 1, spe)[0] == D.rank_order(100, 2, 0, 3, 1)[:8]


def test_eval_batches_cover_every_row_once_with_equal_counts():
    batches = [D.eval_batches(37, 2, r, 4) for r in range(2)]
    assert len(batches[0]) == len(batches[1])
    seen = sorted(i for b in batches for mb in b for i in mb if i >= 0)
    assert seen == list(range(37))


def test_lr_schedule():
    assert [lr_factor(s, 2, 10, "constant", 0) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "linear", 0) == 1.0 and lr_factor(10, 2, 10, "linear", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(10, 2, 10, "cosine", 0.2) == pytest.approx(0.2)


def test_paths_with_dollar_and_tilde_load_as_written(tmp_path):
    odd = tmp_path / "a $HOME ~x dir"
    odd.mkdir()
    path = write_jsonl(odd / "d.jsonl", [{"text": "kept"}])
    assert D.load_rows(str(path))["text"] == ["kept"]
