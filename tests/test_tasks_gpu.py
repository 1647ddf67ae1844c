"""GPU-marked classification tests: one rank on CUDA over NCCL (`bash tests/run.sh -m gpu`).

What the CPU tests cannot show: labels, class weights and predictions moving between CUDA and the
host, the gather of eval outputs over NCCL, bf16 logits under ZeRO-3, and the best-checkpoint
reload on a GPU. Tiny BERTs with a word-level tokenizer built here from the shipped data, so the
test needs no pretrained model package.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import ROOT, launch, losses, result, tiny_config

pytestmark = pytest.mark.gpu
EXAMPLES = ROOT / "examples" / "data"
NER_TAGS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]


def small_tokenizer(out: Path):
    """A fast WordPiece (BERT-style) tokenizer over the words of the example data."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    words: set[str] = set()
    for name in ("topics-train", "topics-eval"):
        for line in (EXAMPLES / f"{name}.jsonl").read_text().splitlines():
            words |= set(re.findall(r"[a-z]+|[^a-z\s]", json.loads(line)["text"].lower()))
    for name in ("ner-train", "ner-eval"):
        for line in (EXAMPLES / f"{name}.jsonl").read_text().splitlines():
            words |= {w.lower() for w in json.loads(line)["tokens"]}
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words | set(chars)), *(f"##{c}" for c in chars)]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = BertTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(str(out))
    return tok


def tiny_bert(out: Path, token: bool, n_labels: int, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    tok = small_tokenizer(out)
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=n_labels)
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("GPU-marked tests were selected but CUDA is not available")
    tmp = tmp_path_factory.mktemp("tasks-gpu")
    topic = tiny_bert(tmp / "bert-topic", False, 4, seed=2)
    ner = tiny_bert(tmp / "bert-ner", True, len(NER_TAGS), seed=3)

    def cfg(name, model, train_file, eval_file, **sections):
        return tiny_config(tmp / name, train_file, **{
            "model": {"name_or_path": str(model), "tokenizer": None, "config": None},
            "data": {"format": "text", "max_length": 32, "eval": str(eval_file)},
            "dist": {"procs_per_node": 1}, "logging": {"every_steps": 5, "progress_bar": False, "peak_tflops": None},
            **sections})

    seq = {"type": "sequence_classification"}
    sc = [
        {"name": "seq-bf16-z3", "probe": "probes_tasks:export_eval", "config": cfg(
            "seq-bf16-z3", topic, EXAMPLES / "topics-train.jsonl", EXAMPLES / "topics-eval.jsonl",
            precision={"dtype": "bf16"}, zero={"stage": 3, "param_persistence_threshold": 0},
            task={**seq, "class_weights": "auto", "early_stopping": {"metric": "eval/loss", "mode": "max"}},
            train={"max_steps": 8, "eval_every": 2, "micro_batch_size": 16, "lr": 2e-3},
            checkpoint={"export": True})},
        {"name": "ner-z2", "probe": "probes_tasks:token_pipeline", "config": cfg(
            "ner-z2", ner, EXAMPLES / "ner-train.jsonl", EXAMPLES / "ner-eval.jsonl",
            task={"type": "token_classification", "class_weights": "auto"},
            train={"max_steps": 12, "micro_batch_size": 16, "lr": 3e-3}, checkpoint={"export": True})},
        {"name": "lora-seq-z2", "probe": "probes_tasks:export_vs_base", "config": cfg(
            "lora-seq-z2", topic, EXAMPLES / "topics-train.jsonl", EXAMPLES / "topics-eval.jsonl", task=seq,
            method={"name": "lora", "lora": {"r": 4, "target_modules": ["query", "value"]}, "merge_adapter": True},
            train={"max_steps": 6, "micro_batch_size": 16, "lr": 5e-3}, checkpoint={"export": True})},
    ]
    launch(sc, tmp, nproc=1, timeout=900)
    return tmp


@pytest.mark.parametrize("name", ["seq-bf16-z3", "ner-z2", "lora-seq-z2"])
def test_classifiers_train_on_cuda_over_nccl(runs, name):
    out = result(runs / name)
    assert out["result"]["status"] == "done"
    (w,) = json.loads((runs / name / "world.json").read_text())
    assert w["device"] == "cuda:0" and w["backend"] == "nccl"
    curve = losses(runs / name)
    assert len(curve) >= 6 and all(loss == loss for _, loss in curve), curve  # no NaN (bf16, weights)
    if name == "ner-z2":
        assert curve[-1][1] < 0.7 * curve[0][1], curve
    assert (runs / name / "classification_report.txt").exists()


def test_bf16_zero3_best_checkpoint_reloads_on_the_gpu(runs):
    out = result(runs / "seq-bf16-z3")
    res = out["result"]
    evals = [json.loads(line) for line in (runs / "seq-bf16-z3" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["eval/loss"] for r in evals if "eval/loss" in r}
    # mode max on the (weighted) eval loss: a contrived direction so that an early step is the best
    assert res["best_step"] == max(logged, key=logged.get) and res["best_step"] < res["last_step"]
    assert res["eval/loss"] == pytest.approx(logged[res["best_step"]], rel=1e-4)  # reloaded on the GPU
    assert sorted(out["probe"]["id2label"].values()) == ["business", "health", "science", "sports"]


def test_token_pipeline_and_lora_head_after_gpu_training(runs):
    assert set(result(runs / "ner-z2")["probe"]["entities"]) <= set(NER_TAGS)
    probe = result(runs / "lora-seq-z2")["probe"]
    assert probe["diff"]["classifier"] > 1e-4 and probe["diff"]["embeddings"] == 0.0
    assert probe["eval_loss"] == pytest.approx(result(runs / "lora-seq-z2")["result"]["eval/loss"], rel=1e-4)
