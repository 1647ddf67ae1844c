"""Data formats, precision, gradient checkpointing and bad input on real ranks (one shared launch).

Every bad-input scenario starts on a run dir that already holds a run: a failed start must leave
every file in it byte-identical.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import arith_rows, error_of, launch, losses, result, tiny_config, write_jsonl
from launcher.config import to_yaml
from launcher.rules import validate

GOOD = {
    "text": {"data": {"format": "text"}},
    "chat": {"data": {"format": "chat"}},
    "csv_packed": {"data": {"packing": True, "max_length": 96}},
    "eval_fraction": {"data": {"eval_fraction": 0.25}},
    "grad_ckpt_z3": {"model": {"gradient_checkpointing": True}, "zero": {"stage": 3, "param_persistence_threshold": 0}},
    "bf16_z2": {"precision": {"dtype": "bf16"}},
}
BAD = ["missing_column", "empty_file", "malformed_json", "fp16_on_cpu", "other_runs_dir"]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    rows = arith_rows(96, seed=5)
    files = {
        "jsonl": write_jsonl(tmp / "pr.jsonl", rows),
        "text": write_jsonl(tmp / "text.jsonl", [{"text": r["prompt"] + r["response"]} for r in rows]),
        "chat": write_jsonl(tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                               {"role": "assistant", "content": r["response"]}]}
                                                 for r in rows]),
        "missing": write_jsonl(tmp / "missing.jsonl", [{"prompt": r["prompt"], "answer": r["response"]} for r in rows]),
    }
    import datasets

    datasets.Dataset.from_list(rows).to_csv(str(tmp / "pr.csv"))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c" "response": "d"}\n')
    train_for = {"text": files["text"], "chat": files["chat"], "csv_packed": tmp / "pr.csv"}
    sc = []
    inspect = {"grad_ckpt_z3": "probes:count_layer_calls", "bf16_z2": "probes:param_dtypes"}
    for name, sections in GOOD.items():
        cfg = tiny_config(tmp / name, train_for.get(name, files["jsonl"]), **sections)
        cfg["train"]["max_steps"] = 4
        sc.append({"name": name, "config": cfg, "inspect": inspect.get(name)})
    bad_train = {"missing_column": files["missing"], "empty_file": tmp / "empty.jsonl",
                 "malformed_json": tmp / "malformed.jsonl"}
    for name in BAD:
        cfg = tiny_config(tmp / name, bad_train.get(name, files["jsonl"]))
        if name == "fp16_on_cpu":
            cfg["precision"] = {"dtype": "fp16"}
        # an existing run in the run dir: its config (same, except for other_runs_dir), logs, a checkpoint
        run_dir = tmp / name
        (run_dir / "checkpoints" / "step00000002").mkdir(parents=True)
        saved = dict(cfg, seed=123) if name == "other_runs_dir" else cfg
        (run_dir / "config.yaml").write_text(to_yaml(validate(saved)))
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 6.0}\n')
        (run_dir / "checkpoints" / "latest").write_text("step00000002")
        (run_dir / "checkpoints" / "step00000002" / "COMPLETE").write_text("2")
        sc.append({"name": name, "config": cfg})
    before = {name: snapshot(tmp / name) for name in BAD}
    launch(sc, tmp)
    return tmp, before


@pytest.mark.parametrize("name", list(GOOD))
def test_format_trains(runs, name):
    tmp, _ = runs
    out = result(tmp / name)
    assert out["result"]["status"] == "done"
    curve = losses(tmp / name)
    assert len(curve) == 4 and curve[-1][1] < curve[0][1], curve


def test_packing_was_on(runs):
    tmp, _ = runs
    first = [json.loads(line) for line in (tmp / "csv_packed" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["data/train_documents_per_row"] > 2  # measured: 3.0 (96 rows of ~30 tokens into 96-token rows)
    assert first["data/train_padding_fraction"] < 0.1


def test_eval_fraction_and_bf16_report_eval_and_dtype(runs):
    tmp, _ = runs
    assert "eval/loss" in result(tmp / "eval_fraction")["result"]
    assert json.loads((tmp / "bf16_z2" / "ds_config.json").read_text())["bf16"]["enabled"] is True
    assert result(tmp / "bf16_z2")["inspect"]["dtypes"] == ["torch.bfloat16"]  # the weights the engine trains


def test_gradient_checkpointing_really_recomputes(runs):
    tmp, _ = runs
    # 4 steps x 1 micro-batch: each layer runs once forward and once more when backward recomputes it
    assert result(tmp / "grad_ckpt_z3")["inspect"]["layer0_calls"] == 2 * 4


EXPECTED = {
    "missing_column": ["missing.jsonl: column(s) ['response'] missing", "data.prompt_field / data.response_field"],
    "empty_file": ["empty.jsonl: the file is empty"],
    "malformed_json": ["malformed.jsonl:2: malformed JSON"],
    "fp16_on_cpu": ["'precision.dtype' = 'fp16' is not supported on a CPU", "precision.dtype=fp32"],
    "other_runs_dir": ["holds a different run's config (differs in: seed)", "choose a new run_dir"],
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_a_clear_error_and_loses_nothing(runs, name):
    tmp, before = runs
    err = error_of(tmp / name)
    assert err is not None
    for text in EXPECTED[name]:
        assert text in err, err
    after = snapshot(tmp / name)
    after.pop("worker_result.json"), after.pop("worker_results.jsonl")  # written by the test worker
    assert after == before[name]
