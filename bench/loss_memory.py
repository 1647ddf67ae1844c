"""Benchmark (not a test): peak memory of the causal-LM loss step, plain vs chunked.

    python bench/loss_memory.py [--vocab 128256] [--seq 2048] [--micro 1] [--hidden 256] [--dtype fp32]

One forward + backward of a random-init Llama (Llama-3's vocabulary by default) with the trainer's
loss (trainer/tasks.py CausalLM), on the CPU: peak bytes of every tensor created in the step
(trainer.monitor.PeakBytes; weights excluded), for train.loss_chunk_tokens = 0 (the plain loss:
full logits, their fp32 copy, their gradient) and for chunk sizes of 1024 and 256 target tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--chunks", default="0,1024,256", help="train.loss_chunk_tokens values to measure")
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.model import torch_dtype
    from trainer.monitor import PeakBytes
    from trainer.tasks import CausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq)
    model = AutoModelForCausalLM.from_config(cfg).to(torch_dtype(args.dtype))
    ids = torch.randint(0, args.vocab, (args.micro, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    logits_bytes = args.micro * args.seq * args.vocab * 4
    print(f"llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, micro {args.micro} x seq {args.seq}, "
          f"{args.dtype}, CPU; the full fp32 logits alone: {logits_bytes / 2**20:.0f} MiB")
    peaks = {}
    for chunk in (int(c) for c in args.chunks.split(",")):
        task = CausalLM(chunk, args.seq)
        task.bind(model)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with PeakBytes() as peak:
            task.loss_sum(model, batch, "cpu").backward()
        dt = time.perf_counter() - t0
        if task.head is not None:
            task.head.armed = False
            task.head.head._forward_pre_hooks.clear()  # the next loss kind binds its own
        peaks[chunk] = peak.peak
        name = "plain (loss_chunk_tokens=0)" if chunk == 0 else f"chunked, {chunk} tokens per chunk"
        print(f"  {name:34s} peak {peak.peak / 2**20:8.1f} MiB  ({dt:.1f} s)")
    if 0 in peaks:
        for chunk, v in peaks.items():
            if chunk:
                print(f"  saved by chunks of {chunk}: {(peaks[0] - v) / 2**20:.1f} MiB ({1 - v / peaks[0]:.0%} of the plain peak)")


if __name__ == "__main__":
    main()
