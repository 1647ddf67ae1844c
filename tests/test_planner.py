"""The memory planner (launcher/planner.py, launcher/memory.py): parts against hand computation,
the model states against DeepSpeed's own estimators, the activation formula against what autograd
really saves and the CPU allocator's peak, the `plan` / `validate` CLI, and (GPU-marked) the whole
prediction against torch.cuda.max_memory_allocated through bench/planner_vs_gpu.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, TINY_LLAMA, arith_rows, tiny_config, write_jsonl
from launcher import planner
from launcher.memory import (GIB, activation_bytes, estimate, largest_layer, layer_activation_bytes,
                             layer_backward_bytes, logits_bytes, model_shape, params_from_hf_config)
from launcher.rules import apply_overrides, read_yaml, validate

LLAMA3_8B = json.loads((ROOT / "examples" / "llama3-8b-config.json").read_text())
EXAMPLE_8B = ROOT / "examples" / "cluster-8b-full.yaml"
PSI_8B = 8_030_261_248


def cli(*args, cwd=None):
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def parts(plan: planner.MemoryPlan) -> dict[str, tuple[float, float]]:
    return {p.name: (p.first, p.second) for p in plan.gpu}


def example_8b(**overrides) -> planner.MemoryPlan:
    cfg = validate(apply_overrides(read_yaml(EXAMPLE_8B), overrides))
    model = planner.ModelInfo(params_from_hf_config(LLAMA3_8B), "examples/llama3-8b-config.json", LLAMA3_8B)
    return planner.plan_memory(cfg, model, planner.Hardware(cfg.dist.nodes, cfg.dist.procs_per_node, 80.0, 900.0))


# --------------------------------------------------------------------------- parts by hand


def test_the_8b_example_parts_by_hand():
    """examples/cluster-8b-full.yaml: Llama-3-8B, ZeRO-3, bf16, 2 x 8 GPUs, micro 2 x 4096 tokens, checkpointing,
    the default chunked loss (1024 tokens), no packing (padded batches)."""
    plan = example_8b()
    got = parts(plan)
    psi, n = PSI_8B, 16
    v, h, i, layers, heads, hd = 128256, 4096, 14336, 32, 32, 128  # 8 kv heads, repeated to 32 when padded
    assert params_from_hf_config(LLAMA3_8B) == psi
    assert got["parameters (bf16)"] == (2 * psi / n, 2 * psi / n)
    assert got["gradients"] == (2 * psi / n, 2 * psi / n)
    assert got["optimizer states"] == (12 * psi / n, 12 * psi / n)  # fp32 master + Adam m, v
    assert got["fp32 gradients at the step"] == (0, 4 * psi / n)
    assert got["optimizer temporaries"] == (0, 4 * psi / n)  # torch AdamW's foreach sqrt(v)
    big = v * h  # the output head (untied) is the largest module: 525,336,576 elements
    live = max(big, 1_000_000_000 // 2) + 50_000_000  # reuse distance / 2 vs largest layer, + the prefetch bucket
    persistent = (2 * layers + 1) * h  # RMSNorm weights, below the 100,000-element persistence threshold
    assert got["ZeRO-3 gathered parameters"] == (2 * (live + persistent + big), 2 * persistent)
    assert got["reduce buckets"] == (2 * 500_000_000, 2 * 500_000_000)  # one bf16 bucket, kept by ZeRO-3
    t, s, a = 2 * 4096, 4096, 2
    assert got["activations"] == (layers * a * t * h + 8 * t + (4 + 2 * a) * t * h + 4 * t, 0)
    assert got["logits and loss"] == (12 * 1024 * v, 0)
    # one layer, padded (k, v repeated to 32 heads, the mask as a bf16 bias), recomputed in backward
    layer = (2 * (4 + 2 * a) * t * h + a * t * (2 * heads * hd + 2 * heads * hd) + 4 * a * t * i
             + 4 * 2 * heads * s + 8 * t + a * 2 * s * s)
    inside = layer + 2 * a * t * i + a * h * i
    assert got["layer backward"] == (inside - 12 * 1024 * v, 0)
    allocated = [sum(x[k] for name, x in got.items() if name not in ("allocator fragmentation", "CUDA context"))
                 for k in (0, 1)]
    assert got["allocator fragmentation"] == pytest.approx((0.05 * allocated[0], 0.05 * allocated[1]))
    assert got["CUDA context"] == (0.75 * GIB, 0.75 * GIB)
    assert plan.gpu_peak == pytest.approx(1.05 * max(allocated) + 0.75 * GIB)
    assert plan.gpu_peak == pytest.approx(16.44 * GIB, abs=0.01 * GIB) and plan.fits
    # CPU: ZeRO-3 from_pretrained loads into partitions; nothing offloaded; 8 ranks x 2 GiB of processes
    assert plan.cpu_peak == 8 * 2 * GIB


def test_zero2_plain_loss_without_checkpointing_by_hand():
    """A Llama-3.2-1B shape (tied head) on 1 x 4 GPUs, ZeRO-2 with overlap_comm, packed rows, plain loss."""
    c = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
         "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True}
    psi = params_from_hf_config(c)
    assert psi == 1_235_814_400  # the published size of Llama-3.2-1B
    cfg = validate(apply_overrides(read_yaml(EXAMPLE_8B), {
        "zero.stage": 2, "dist.nodes": 1, "dist.procs_per_node": 4, "model.gradient_checkpointing": False,
        "train.micro_batch_size": 4, "train.global_batch_size": 64, "data.max_length": 2048, "data.packing": True,
        "train.loss_chunk_tokens": 0}))
    plan = planner.plan_memory(cfg, planner.ModelInfo(psi, "test", c), planner.Hardware(1, 4, 80.0))
    got, n, v, h, i, t, a = parts(plan), 4, 128256, 2048, 8192, 4 * 2048, 2
    assert got["parameters (bf16)"] == (2 * psi, 2 * psi)  # ZeRO-2 keeps every parameter
    assert got["gradients"] == (2 * psi / n, 2 * psi / n)
    assert got["optimizer states"] == (12 * psi / n, 12 * psi / n)
    assert "ZeRO-3 gathered parameters" not in got
    assert got["reduce buckets"] == (2 * 2 * 500_000_000, 0)  # two buckets (overlap_comm), freed at the step
    # packed: k, v keep their 8 heads and there is no mask
    layer = 2 * (4 + 2 * a) * t * h + a * t * (2 * 2048 + 2 * 512) + 4 * a * t * i + 4 * 4 * 32 * 2048 + 8 * t
    rotary = 2 * a * 2048 * 64  # cos and sin, shared by every layer
    assert got["activations"] == (16 * layer + 8 * t + (4 + 2 * a) * t * h + 4 * t + rotary, 0)
    assert got["logits and loss"] == (12 * t * v, 0)  # every token's fp32 logits
    assert got["layer backward"] == (0, 0)  # 2 a t i + a h i = 0.3 GiB < the logits' 11.7 GiB


def test_offload_moves_states_to_the_cpu_of_each_node():
    plan = example_8b(**{"zero.offload_optimizer": True, "zero.offload_param": True})
    got, psi, n = parts(plan), PSI_8B, 16
    assert got["parameters (bf16)"][0] == got["gradients"][0] == got["optimizer states"][0] == 0
    assert got["fp32 gradients at the step"] == got["optimizer temporaries"] == (0, 0)  # DeepSpeed's CPU Adam
    cpu = {p.name: p.second for p in plan.cpu}
    assert cpu["offloaded optimizer states"] == 8 * 12 * psi / n  # 8 ranks on a node
    assert cpu["offloaded gradients"] == 8 * (4 + 2) * psi / n  # fp32 + ZeRO-3's 16-bit partition
    assert cpu["offloaded parameters"] == 8 * 2 * psi / n


def test_from_config_models_load_in_fp32_on_every_rank():
    cfg = validate(tiny_config(Path("/tmp/r"), Path("/tmp/t.jsonl"), zero={"stage": 3}))
    psi = params_from_hf_config(TINY_LLAMA)
    plan = planner.plan_memory(cfg, planner.ModelInfo(psi, "formula", TINY_LLAMA), planner.Hardware(1, 2, 80.0))
    load = next(p for p in plan.cpu if p.name == "model load")
    assert load.first == 2 * psi * 4  # no zero.Init for a from-scratch model: the whole fp32 model per rank


def test_unknown_architecture_falls_back_to_model_states():
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "vocab_size": 100}
    cfg = validate(tiny_config(Path("/tmp/r"), Path("/tmp/t.jsonl"), zero={"stage": 3}))
    plan = planner.plan_memory(cfg, planner.ModelInfo(1_000_000, "safetensors", gpt2), planner.Hardware(1, 2, 80.0))
    names = [p.name for p in plan.gpu]
    assert "activations" not in names and "logits and loss" not in names and plan.fits
    assert any("not modeled for model_type 'gpt2'" in note and "a floor" in note for note in plan.notes)
    lines, problems, _ = planner.report(cfg, planner.ModelInfo(None, "model.config: architecture not counted", gpt2),
                                        planner.Hardware(1, 2, 80.0))
    assert lines == [] and "parameter count is unknown" in problems[0] and "--model-config" in problems[0]


def test_layouts_are_ranked_by_speed_and_keep_the_global_batch():
    L = planner.Layout
    layouts = [L(3, True, True, 2, 1, False), L(2, True, False, 4, 1, False), L(3, False, False, 1, 1, True),
               L(2, False, False, 2, 1, True), L(2, False, False, 2, 1, False), L(2, False, False, 4, 1, True)]
    ranked = sorted(layouts, key=L.speed_key)
    assert ranked == [L(2, False, False, 4, 1, True), L(2, False, False, 2, 1, False), L(2, False, False, 2, 1, True),
                      L(3, False, False, 1, 1, True), L(2, True, False, 4, 1, False), L(3, True, True, 2, 1, False)]
    # without train.global_batch_size, a smaller micro-batch gets more accumulation: micro x accum stays 8
    cfg = validate(tiny_config(Path("/tmp/r"), Path("/tmp/t.jsonl"), train={"micro_batch_size": 4, "grad_accum": 2,
                                                                            "max_steps": 3}))
    cands = planner.candidate_layouts(cfg)
    assert {(c["train.micro_batch_size"], c["train.grad_accum"]) for c in cands} == {(4, 2), (2, 4), (1, 8)}
    # with it, accumulation is derived (launcher/batch.py) and not written
    cfg = validate(apply_overrides(read_yaml(EXAMPLE_8B), {"train.micro_batch_size": 4}))
    cands = planner.candidate_layouts(cfg)
    assert {c["train.micro_batch_size"] for c in cands} == {4, 2, 1} and "train.grad_accum" not in cands[0]
    assert len(cands) == 8 * 3 * 2  # (stage, offload) x micro x checkpointing


# --------------------------------------------------------------------------- DeepSpeed's estimators


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (4, 1), (8, 2)])
def test_model_states_equal_deepspeeds_estimators(gpus, nodes):
    """DeepSpeed's estimators assume mixed-precision Adam (2 + 2 + 4 + 8 + 4 bytes) and every state at once.
    estimate_zero2: GPU 2 Psi + 18 Psi / N, CPU under offload Psi x max(4 x total GPUs, 16) x buffer factor.
    estimate_zero3: GPU 4 x largest layer + 18 Psi / N, CPU under offload 16 (18 with offload_param) Psi / nodes x
    buffer factor. The ZeRO-3 one leaves out the 16-bit gradient partition that stage3.py allocates
    (grad_partitions_flat_buffer: on the GPU, or on the CPU under optimizer offload); we count it, so it is taken
    out below. Its largest layer, gathered with its gradient (2 + 2 bytes), is our ZeRO-3 part's 4 x largest layer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi, world = PSI_8B, gpus * nodes
    for offload in (False, True):
        est = estimate(psi, psi, world, 2, "bf16", offload_optimizer=offload)
        cpu, gpu = estimate_zero2_model_states_mem_needs(psi, gpus, nodes, cpu_offload=offload,
                                                        additional_buffer_factor=1.0)
        assert est.gpu_total == pytest.approx(gpu, abs=1)
        if offload and world <= 4:  # beyond 4 GPUs DeepSpeed counts an fp32 model per GPU loading on one node
            assert gpus * est.cpu_per_rank == pytest.approx(cpu, abs=1)
    big = largest_layer(model_shape(LLAMA3_8B))
    for off_opt, off_param in ((False, False), (True, False), (True, True)):
        est = estimate(psi, psi, world, 3, "bf16", offload_optimizer=off_opt, offload_param=off_param)
        cpu, gpu, big_bytes = estimate_zero3_model_states_mem_needs(
            psi, big, gpus, nodes, cpu_offload=off_opt, cpu_offload_params=off_param, additional_buffer_factor=1.0)
        grad16 = 2 * psi / world
        assert big_bytes == 4 * big
        assert est.gpu_total - (0 if off_opt else grad16) + 4 * big == pytest.approx(gpu, abs=1)
        if off_opt:
            assert gpus * (est.cpu_per_rank - grad16) == pytest.approx(cpu, abs=1)
    # the largest layer is what DeepSpeed finds in a real model (tied and untied heads, BERT)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    for c, auto in ((TINY_LLAMA, AutoModelForCausalLM), ({**TINY_LLAMA, "tie_word_embeddings": True}, AutoModelForCausalLM),
                    ({"model_type": "bert", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4}, AutoModelForSequenceClassification)):
        model = auto.from_config(AutoConfig.for_model(**c))
        assert model_to_params(model)[1] == largest_layer(model_shape(c)), c


# --------------------------------------------------------------------------- activations, measured on CPU


def _saved_bytes(model, ids, mask) -> int:
    """Bytes autograd keeps for backward in one forward (storages counted once, parameters left out)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


def _model(c: dict, dtype: str, ckpt: bool, auto=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = (auto or AutoModelForCausalLM).from_config(AutoConfig.for_model(**c))
    model = model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    if ckpt:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _batch(vocab: int, micro: int, seq: int, padded: bool):
    import torch

    ids = torch.randint(0, vocab, (micro, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(micro, seq, dtype=torch.long)
    if padded:
        mask[1, seq // 2:] = 0
    return ids, mask


LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_activation_formula_is_what_autograd_saves(dtype):
    """Exact, byte for byte, on CPU (sdpa's flash kernel keeps no S x S scores there either): Llama packed
    (k, v at their 2 kv heads) and padded (repeated to 4 heads + the mask as a bias), with and without
    checkpointing; BERT with its dropout masks (which the CPU keeps in the activation dtype, CUDA in bool)."""
    from transformers import AutoModelForSequenceClassification

    micro, seq, a = 2, 64, {"bf16": 2, "fp32": 4}[dtype]
    shape = model_shape(LLAMA)
    for ckpt in (False, True):
        model = _model(LLAMA, dtype, ckpt)
        for padded in (False, True):
            saved = _saved_bytes(model, *_batch(1000, micro, seq, padded))
            assert saved == activation_bytes(shape, micro, seq, a, padded, ckpt), (ckpt, padded)
    # one layer of each kind, exactly: the model with 3 layers saves one layer more than with 2
    three = _saved_bytes(_model({**LLAMA, "num_hidden_layers": 3}, dtype, False), *_batch(1000, micro, seq, True))
    two = _saved_bytes(_model(LLAMA, dtype, False), *_batch(1000, micro, seq, True))
    assert three - two == layer_activation_bytes(shape, micro, seq, a, padded=True)
    bert = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "attention_probs_dropout_prob": 0.0}
    for layers in (2, 3):
        c = {**bert, "num_hidden_layers": layers}
        model = _model(c, dtype, False, AutoModelForSequenceClassification)
        saved = _saved_bytes(model, *_batch(1000, micro, seq, False))
        pooler_and_head = 3 * micro * 256 * a  # the pooler's tanh, its dropout mask, the classifier's input
        assert saved - pooler_and_head == activation_bytes(model_shape(c), micro, seq, a, False, False, mask_bytes=a)


def _cpu_peak(model, ids, mask, vocab: int) -> int:
    """Peak bytes the CPU allocator holds above the start of one forward + plain loss + backward
    (the parameters' gradients exist already, as they do from the second step on)."""
    import torch

    from trainer.monitor import PeakBytes

    def step():
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits[:, :-1].float()  # trainer/tasks.py CausalLM.loss_sum
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum")
        del out, logits
        loss.backward()

    step()
    with PeakBytes() as peak:
        step()
    return peak.peak


@pytest.mark.parametrize("vocab,inter,tol", [(32000, 1024, 0.01), (256, 2048, 0.06)])
def test_activations_and_logits_match_the_cpu_allocators_peak(vocab, inter, tol):
    """The forward/backward peak above the model states (activations + the larger of logits and one layer's
    backward) against the CPU allocator's peak from torch.profiler, bf16, with and without checkpointing.
    Measured: vocab 32000 (the logits dominate, as in real models) +0.4 % / +0.4 %; vocab 256 with a wide MLP
    (a layer's backward dominates) +2.9 % / +4.1 %."""
    c = {**LLAMA, "vocab_size": vocab, "intermediate_size": inter}
    shape, micro, seq = model_shape(c), 2, 128
    model = _model(c, "bf16", False)
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peak = _cpu_peak(model, *_batch(vocab, micro, seq, False), vocab)
        predicted = activation_bytes(shape, micro, seq, 2, False, ckpt) + max(
            logits_bytes(shape, micro * seq, 0, False, 2)[0], layer_backward_bytes(shape, micro, seq, 2, False, ckpt))
        assert predicted == pytest.approx(peak, rel=tol), (ckpt, predicted / peak)


# --------------------------------------------------------------------------- the CLI


def test_plan_refuses_8b_full_fine_tuning_on_one_24gb_gpu_and_lists_what_fits():
    p = cli("plan", EXAMPLE_8B, "--gpus-per-node", 1, "--nodes", 1, "--gpu-mem-gb", 24,
            "--model-config", ROOT / "examples" / "llama3-8b-config.json")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "model: 8,030,261,248 params" in p.stdout and "GPU memory per rank" in p.stdout
    assert "optimizer states                       89.75 GiB" in p.stdout  # 12 B x 8.03e9 on one GPU
    assert "DOES NOT FIT" in p.stdout
    err = p.stderr
    assert "does not fit: peak GPU memory per rank is 190." in err and "more than --gpu-mem-gb = 24 GiB" in err
    assert "the largest part is optimizer states: 89.75 GiB (alone more than the whole memory)" in err
    listed = [line.split(".", 1)[1].split("   (")[0].strip() for line in err.splitlines() if line[:4].strip()[:-1].isdigit()]
    assert listed, err
    assert all("zero.offload_optimizer=true" in x and "dist.procs_per_node=1" in x for x in listed)  # none fits without
    # the fastest: ZeRO-2, optimizer on the CPU, micro 2 kept; 2 B x 8.03e9 params (14.96 GiB) + 2 overlapping bf16
    # buckets (1.86) + layer inputs (2.27) + one 1024-token logits chunk (1.47) + one layer's backward beyond it (0.79),
    # + 5 % + 0.75 GiB of context = 23.12 GiB
    assert listed[0] == ("dist.nodes=1 dist.procs_per_node=1 zero.stage=2 zero.offload_optimizer=true "
                         "zero.offload_param=false train.micro_batch_size=2 model.gradient_checkpointing=true")
    assert "(GPU peak 23.12 GiB, CPU 121.66 GiB per node)" in err.splitlines()[[i for i, x in enumerate(
        err.splitlines()) if x.startswith("  1. ")][0]]


def test_plan_fits_the_8b_example_on_its_cluster():
    p = cli("plan", EXAMPLE_8B, "--gpus-per-node", 8, "--gpu-mem-gb", 80,
            "--model-config", ROOT / "examples" / "llama3-8b-config.json")
    assert p.returncode == 0, p.stderr
    assert "hardware: 2 node(s) x 8 GPU(s) of 80 GiB = world size 16; CPU 900 GiB per node" in p.stdout
    assert "peak 16.44 GiB of 80 GiB (--gpu-mem-gb): fits" in p.stdout
    assert "ZeRO-3 gathered parameters" in p.stdout and "logits and loss" in p.stdout


def test_plan_apply_writes_a_new_config_that_validates_and_fits(tmp_path):
    out = tmp_path / "fits.yaml"
    args = ("plan", EXAMPLE_8B, "--gpus-per-node", 1, "--nodes", 1, "--gpu-mem-gb", 24, "--cpu-mem-gb", 200,
            "--model-config", ROOT / "examples" / "llama3-8b-config.json")
    p = cli(*args, "--apply", out)
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}" in p.stdout
    data = read_yaml(out)
    cfg = validate(data)
    assert (cfg.zero.stage, cfg.zero.offload_optimizer, cfg.train.micro_batch_size, cfg.model.gradient_checkpointing,
            cfg.world_size, cfg.train.global_batch_size) == (2, True, 2, True, 1, 128)
    assert out.read_text().startswith("# Generated by: python -m launcher plan ")
    again = cli("plan", out, "--gpus-per-node", 1, "--gpu-mem-gb", 24, "--cpu-mem-gb", 200,
                "--model-config", ROOT / "examples" / "llama3-8b-config.json")
    assert again.returncode == 0 and ": fits" in again.stdout, again.stdout + again.stderr
    before = out.read_text()
    p = cli(*args, "--apply", out)
    assert p.returncode == 2 and "already exists" in p.stderr and out.read_text() == before


def test_validate_with_slurm_gpu_mem_gb_prints_the_plan_and_refuses_what_does_not_fit(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(16))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", train)))  # fp32, ZeRO-2, 2 ranks, the tiny Llama
    p = cli("validate", path, "slurm.gpu_mem_gb=80", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"OK: {path}") and "GPU memory per rank" in p.stdout
    assert "(slurm.gpu_mem_gb): fits" in p.stdout
    # 1 GiB: ZeRO-2's two fp32 reduce buckets of 5e8 elements alone are 3.7 GiB; ZeRO-0 / 1 would fit
    p = cli("validate", path, "slurm.gpu_mem_gb=1", "zero.overlap_comm=true", cwd=tmp_path)
    assert p.returncode == 2 and "OK:" not in p.stdout
    assert "more than slurm.gpu_mem_gb = 1 GiB" in p.stderr
    assert "the largest part is reduce buckets: 3.73 GiB (alone more than the whole memory)" in p.stderr
    assert "1. zero.stage=0 zero.offload_optimizer=false" in p.stderr
    p = cli("validate", path, "slurm.gpu_mem_gb=80", "slurm.gpus_per_node=0", cwd=tmp_path)
    assert p.returncode == 2 and "'slurm.gpu_mem_gb' = 80 but 'slurm.gpus_per_node' = 0" in p.stderr


@pytest.mark.parametrize("flags,message", [
    (("--gpus-per-node", 0, "--gpu-mem-gb", 80), "--gpus-per-node 0: the planner needs at least 1 GPU per node"),
    (("--gpus-per-node", 8, "--gpu-mem-gb", -80), "--gpu-mem-gb -80.0: the memory of one GPU must be a positive"),
    (("--gpus-per-node", 8, "--gpu-mem-gb", 80, "--nodes", 0), "--nodes 0: a run needs at least 1 node"),
    (("--gpus-per-node", 8, "--gpu-mem-gb", 80, "--cpu-mem-gb", 0), "--cpu-mem-gb 0.0: the memory of one node"),
    (("--gpus-per-node", 8, "--gpu-mem-gb", "lots"), "argument --gpu-mem-gb: invalid float value: 'lots'"),
    (("--gpus-per-node", 8, "--gpu-mem-gb", 80), "parameter count is unknown"),  # /models/... is not here
    (("--gpus-per-node", 8, "--gpu-mem-gb", 80, "--model-config", "/nonexistent.json"),
     "--model-config '/nonexistent.json' is not a readable Hugging Face config.json"),
])
def test_plan_bad_input_is_exit_2_with_a_message(flags, message):
    p = cli("plan", EXAMPLE_8B, *flags)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_slurm_gpu_mem_gb_must_be_positive(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arith_rows(4))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", train)))
    p = cli("validate", path, "slurm.gpu_mem_gb=-3", cwd=tmp_path)
    assert p.returncode == 2 and "'slurm.gpu_mem_gb' = -3: Input should be greater than 0" in p.stderr


# --------------------------------------------------------------------------- measured on a GPU


@pytest.mark.gpu
def test_predicted_peak_is_within_10_percent_of_cuda_max_memory_allocated(tmp_path):
    """bench/planner_vs_gpu.py trains a few real steps per layout (1B Llama shape at ZeRO-2 / ZeRO-3 with and without
    checkpointing, an 8B-wide shape at ZeRO-3 with optimizer offload) and compares the planner's allocated peak
    with torch.cuda.max_memory_allocated, and its reserved peak with max_memory_reserved."""
    import torch

    if not torch.cuda.is_available():
        pytest.fail("GPU-marked test selected but CUDA is not available")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "planner_vs_gpu.py"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = json.loads((tmp_path / "planner_vs_gpu.json").read_text())["layouts"]
    assert len(rows) >= 5
    for r in rows:
        assert r["steps_done"] >= 3, r
        assert abs(r["predicted_allocated"] / r["measured_allocated"] - 1) <= 0.10, r
        assert abs(r["predicted_reserved"] / r["measured_reserved"] - 1) <= 0.10, r
