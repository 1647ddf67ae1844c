"""Efficiency pieces in one process (no ranks): the chunked loss against the plain one (every peft
method the trainer supports on a CPU), that it never builds the full logits (head calls, peak
memory), the matmul-FLOP model against torch's FlopCounterMode, and the refusals of the new keys."""
from __future__ import annotations

import copy

import pytest

from helpers import TINY_LLAMA, tiny_config
from launcher.config import ConfigError
from launcher.rules import validate
from trainer import data as D
from trainer.tasks import CausalLM

torch = pytest.importorskip("torch")


def tiny_llama(**over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = dict(TINY_LLAMA, **over)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).float()


def batches():
    """An unpacked micro-batch (padding, masked prompts) and a packed one (3 documents in row 0)."""
    import datasets

    g = torch.Generator().manual_seed(1)
    docs = []
    for n in (11, 7, 5, 16, 9):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [D.IGNORE] * 3 + ids[3:]})
    ds = datasets.Dataset.from_list(docs).map(D._sizes, batched=True)
    plain = D.fetch(D.Rows(ds), [0, 1, 2, 3], pad_id=0)
    packed = D.fetch(D.Rows(ds, [[0, 1, 2], [3, 4]]), [0, 1], pad_id=0)
    return {"plain": plain, "packed": packed}


def loss_and_grads(model, task, batch):
    """The loss the trainer backpropagates: summed cross-entropy / target tokens."""
    model.zero_grad()
    loss = task.loss_sum(model, batch, "cpu") / D.target_tokens(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, batch, chunk_tokens=8):
    """(loss difference, largest gradient difference, gradient count) of chunked vs plain."""
    plain, chunked = CausalLM(0, 16), CausalLM(chunk_tokens, 16)
    assert "plain" in plain.bind(model) and "chunked" in chunked.bind(model)
    a_loss, a_grads = loss_and_grads(model, plain, batch)
    chunked.head.armed = False
    b_loss, b_grads = loss_and_grads(model, chunked, batch)
    assert a_grads.keys() == b_grads.keys() and a_grads
    return abs(a_loss - b_loss).item() / a_loss.item(), max((a_grads[k] - b_grads[k]).abs().max().item()
                                                            for k in a_grads), len(a_grads)


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_chunked_loss_equals_plain_with_equal_gradients(kind):
    rel, grad, _ = compare(tiny_llama(), batches()[kind])
    print(kind, rel, grad)
    assert rel <= 1e-6, rel  # measured: 0 to 2e-7
    assert grad <= 1e-6, grad  # measured: <= 5e-8 (fp32)


# Every peft method the trainer runs on a CPU (qlora needs CUDA: tests/test_efficiency_gpu.py), as
# trainer/methods.py builds it; modules_to_save puts the head itself in a wrapper.
PEFT = {"lora": {"name": "lora"}, "adalora": {"name": "adalora"}, "ia3": {"name": "ia3"},
        "prefix": {"name": "prefix", "num_virtual_tokens": 4}, "prompt": {"name": "prompt", "num_virtual_tokens": 4},
        "lora-save-head": {"name": "lora", "modules_to_save": ["lm_head"]}}


@pytest.mark.parametrize("name", list(PEFT))
def test_chunked_loss_equals_plain_under_every_peft_method(name, tmp_path):
    from trainer.methods import apply_peft

    cfg = validate(tiny_config(tmp_path, tmp_path / "t.jsonl", model={"name_or_path": str(tmp_path), "config": None},
                               method=PEFT[name]))
    model, _ = apply_peft(tiny_llama(), cfg, total_steps=10, stage=0)
    for p in model.parameters():  # peft zero-initialises some adapters; make every gradient path count
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    rel, grad, _ = compare(model, batches()["plain"])
    print(name, rel, grad)
    assert rel <= 1e-6 and grad <= 1e-6, (rel, grad)  # measured: rel <= 2e-7, grad <= 3e-8


def test_flattened_packed_rows_carry_varlen_boundaries_and_give_the_same_loss():
    """flash-attention-2's input (the micro-batch as one row, document boundaries as cumulative
    lengths): on sdpa the same position ids mask the same documents, so the loss must not move."""
    model = tiny_llama()
    batch = batches()["packed"]  # row 0: documents of 11, 7, 5 tokens (+2 padding); row 1: 16, 9
    rows, flat = CausalLM(8, 32), CausalLM(8, 32)
    rows.bind(model)
    flat.bind(model)
    flat.flatten = True
    inputs, labels = flat.inputs(batch, "cpu")
    assert inputs["input_ids"].shape == labels.shape == (1, 50)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 11, 18, 23, 25, 41, 50] and inputs["max_length_q"] == 16
    a, b = rows.loss_sum(model, batch, "cpu"), flat.loss_sum(model, batch, "cpu")
    assert abs(a - b) <= 1e-6 * a, (a, b)


def test_chunked_loss_never_builds_the_full_logits():
    """The model's own head call gets an empty slice; every other head call (forward and its
    recomputation in backward) sees at most one chunk of target positions."""
    model = tiny_llama()
    batch = batches()["plain"]
    task = CausalLM(8, 16)
    task.bind(model)
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[-2] if out.dim() == 3 else out.shape[0]))
    loss = task.loss_sum(model, batch, "cpu")
    n_chunks = -(-4 * 16 // 8)
    n_targets = D.target_tokens(batch)
    assert rows[0] == 0 and len(rows) == 1 + n_chunks  # the model's call, then one per chunk
    loss.backward()
    assert len(rows) == 1 + 2 * n_chunks  # each chunk recomputed once in backward
    assert max(rows[1:]) == -(-n_targets // n_chunks) < n_targets


def test_chunked_loss_peak_memory_is_below_the_full_logits():
    """Peak bytes of one loss + backward (trainer.monitor.PeakBytes, CPU): the plain loss holds the
    logits, their fp32 copy and their gradients; the chunked one a chunk of each."""
    from trainer.monitor import PeakBytes

    vocab, rows, width = 8192, 4, 256
    model = tiny_llama(vocab_size=vocab, max_position_embeddings=width)
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peaks = {}
    for chunk in (0, 128):
        task = CausalLM(chunk, width)
        task.bind(model)
        model.zero_grad(set_to_none=True)
        with PeakBytes() as peak:
            task.loss_sum(model, batch, "cpu").backward()
        peaks[chunk] = peak.peak
        if task.head is not None:
            task.head.armed = False
    logits_fp32 = rows * width * vocab * 4
    print({k: v / 2**20 for k, v in peaks.items()})
    # measured: plain 100.7 MiB, chunked 18.1 MiB; the fp32 logits alone are 32 MiB
    assert peaks[0] - peaks[128] > logits_fp32, {k: v / 2**20 for k, v in peaks.items()}


def test_models_that_post_process_logits_fall_back_to_the_plain_loss():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    task = CausalLM(1024, 16)
    line = task.bind(AutoModelForCausalLM.from_config(cfg))
    assert task.head is None and "model type 'gemma2' post-processes its logits" in line


def test_matmul_flops_match_torchs_flop_counter():
    """FlopModel (README "Efficiency") against FlopCounterMode on a forward + backward of a tiny
    Llama with eager attention (its attention matmuls are plain bmm calls the counter sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.monitor import flop_model

    model = tiny_llama(num_key_value_heads=2)
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids).logits.float().sum().backward()
    fm = flop_model(model)
    ours = fm.step([(3 * 40, 40)])
    theirs = counter.get_total_flops()
    assert fm.matmul_params == sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight")) \
        + model.lm_head.weight.numel()  # no embedding lookup; the head counts
    assert abs(ours - theirs) <= 0.05 * theirs, (ours, theirs)  # measured: equal (0.0 %)


def test_new_keys_are_refused_with_the_key_the_value_and_the_fix(tmp_path):
    base = tiny_config(tmp_path, tmp_path / "t.jsonl")

    def problems(**sections):
        cfg = copy.deepcopy(base)
        for k, v in sections.items():
            cfg[k] = {**cfg.get(k, {}), **v}
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        return "\n".join(e.value.problems)

    assert "Liger has no kernels for model type 'gpt2'" in problems(
        model={"liger": True, "config": {"model_type": "gpt2", "vocab_size": 512}})
    assert "flash-attention has no fp32 kernels" in problems(model={"attn_implementation": "flash_attention_2"})
    assert "set data.packing=false" in problems(data={"packing": True}, model={"name_or_path": "x", "config": None},
                                                method={"name": "prompt"})
    assert "remove data.group_by_length" in problems(data={"packing": True, "group_by_length": True})
    assert "'train.loss_chunk_tokens' = -1" in problems(train={"loss_chunk_tokens": -1})
    assert "choose one of 'sdpa', 'flash_attention_2' or 'eager'" in problems(model={"attn_implementation": "flash"})


def test_liger_and_flash_attention_are_refused_on_a_cpu():
    from trainer.model import check_device
    from launcher.config import RunConfig

    cfg = RunConfig.model_validate({"run_dir": "/tmp/r", "data": {"train": "t.jsonl"},
                                    "model": {"config": {"model_type": "llama"}, "liger": True,
                                              "attn_implementation": "flash_attention_2"}})
    with pytest.raises(ConfigError) as e:
        check_device(cfg, is_cuda=False)
    text = "\n".join(e.value.problems)
    assert "'model.liger' = true needs a CUDA GPU" in text and "set model.liger=false" in text
    assert "'model.attn_implementation' = 'flash_attention_2' needs a CUDA GPU" in text


def test_the_default_sdpa_falls_back_to_eager_where_an_architecture_has_no_sdpa():
    from launcher.config import ModelConfig
    from trainer.model import build_model, model_facts

    shape = {"vocab_size": 64, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32, "rotary_dim": 4}
    model, _ = build_model(ModelConfig(config={"model_type": "codegen", **shape}, tokenizer="x"),
                           {"zero_optimization": {"stage": 2}}, "fp32", CausalLM())
    assert model_facts(model) == {"attn_implementation": "eager", "liger": []}
    model, _ = build_model(ModelConfig(config={"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                                               "intermediate_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2}, tokenizer="x"),
                           {"zero_optimization": {"stage": 2}}, "fp32", CausalLM())
    assert model_facts(model)["attn_implementation"] == "sdpa"
