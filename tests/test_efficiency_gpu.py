"""GPU-marked efficiency tests (run on a GPU machine: `bash tests/run.sh -m gpu`).

One rank over NCCL, a tiny bf16 Llama (head_dim 16, for Liger's RoPE kernel), packed rows:
- model.liger=true puts Liger in the model (RMSNorm, SwiGLU, RoPE, the fused-loss forward: world.json
  records what is there) and gives the loss curve of the chunked loss without Liger, within bf16
  tolerance, under ZeRO-2 and under ZeRO-3 (the head weight registered as an external parameter);
- flash_attention_2 on packed rows (varlen kernels, the micro-batch as one row) gives sdpa's curve;
- the chunked loss under QLoRA (4-bit base) gives the plain loss's curve.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import arith_rows, assert_curves_close, launch, losses, result, save_tiny_pretrained, tiny_config, write_jsonl

pytestmark = pytest.mark.gpu
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
Z3 = {"stage": 3, "param_persistence_threshold": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("GPU-marked tests were selected but CUDA is not available")
    tmp = tmp_path_factory.mktemp("effgpu")
    base = save_tiny_pretrained(tmp / "base", **SHAPE)
    train = write_jsonl(tmp / "train.jsonl", arith_rows(512, seed=3))
    common = {"dist": {"procs_per_node": 1}, "precision": {"dtype": "bf16"}, "model": base,
              "data": {"packing": True, "max_length": 128},
              "train": {"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3},
              "logging": {"every_steps": 4, "progress_bar": False, "peak_tflops": None}}
    sc = []
    for zname, zero in (("z2", {"stage": 2}), ("z3", Z3)):
        for liger in (True, False):
            name = f"{zname}-{'liger' if liger else 'chunked'}"
            sc.append({"name": name, "config": tiny_config(tmp / name, train, **common, zero=zero,
                                                           model__liger=liger)})
    if importlib.util.find_spec("flash_attn") is not None:
        sc.append({"name": "flash", "config": tiny_config(tmp / "flash", train, **common,
                                                          model__attn_implementation="flash_attention_2")})
    for chunk in (1024, 0):
        sc.append({"name": f"qlora-{chunk}", "config": tiny_config(
            tmp / f"qlora-{chunk}", train, **common, method={"name": "qlora"}, train__loss_chunk_tokens=chunk)})
    launch(sc, tmp, nproc=1, timeout=1200)
    return tmp


@pytest.mark.parametrize("zero", ["z2", "z3"])
def test_liger_is_in_the_model_and_keeps_the_loss_curve(runs, zero):
    on, off = runs / f"{zero}-liger", runs / f"{zero}-chunked"
    for d in (on, off):
        assert result(d)["result"]["status"] == "done"
    (w,) = json.loads((on / "world.json").read_text())
    assert {"LigerRMSNorm", "LigerSwiGLUMLP", "LlamaForCausalLM.forward=lce_forward",
            "apply_rotary_pos_emb=liger_rotary_pos_emb"} <= set(w["liger"]), w["liger"]
    assert w["loss"].startswith("loss: Liger fused linear cross-entropy")
    (w_off,) = json.loads((off / "world.json").read_text())
    assert w_off["liger"] == [] and w_off["loss"].startswith("loss: chunked")
    a, b = losses(on), losses(off)
    assert a[-1][1] < a[0][1] - 1.0  # it trains
    assert_curves_close(a, b, rel=3e-2)  # bf16 kernels differ in rounding; not yet measured on a GPU


def test_flash_attention_on_packed_rows_matches_sdpa(runs):
    if not (runs / "flash").exists():
        pytest.skip("flash-attn is not installed on this GPU machine")
    (w,) = json.loads((runs / "flash" / "world.json").read_text())
    assert w["attn_implementation"] == "flash_attention_2"
    assert_curves_close(losses(runs / "flash"), losses(runs / "z2-chunked"), rel=3e-2)  # bf16; not yet measured


def test_chunked_loss_under_qlora_matches_the_plain_loss(runs):
    (w,) = json.loads((runs / "qlora-1024" / "world.json").read_text())
    assert w["loss"].startswith("loss: chunked")
    assert_curves_close(losses(runs / "qlora-1024"), losses(runs / "qlora-0"), rel=2e-2)  # bf16; not yet measured
