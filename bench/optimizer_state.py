"""Benchmark (not a test): what each optimizer and each method costs in optimizer state, measured.

    python bench/optimizer_state.py [--hidden 256] [--layers 4] [--vocab 8192] [--fused]

Part 1 builds a Llama of that size, builds every train.optimizer through trainer/optim.py over all
its weights, takes one step on random gradients, and sums the bytes of the tensors in the
optimizer state: bytes per trainable parameter (torch AdamW 8; bitsandbytes 8-bit AdamW about 2,
Lion 8-bit about 1). DeepSpeed's CPU Adam is measured as it runs under ZeRO-Offload;
FusedAdam (--fused) needs its JIT build first (about 46 s on a CPU).

Part 2 applies every method (trainer/methods.py) to a fresh copy of the model and reports the
trainable parameters, their fraction, and the measured AdamW state (plus fp32 gradients) for them:
the memory that choosing a method saves before any activation or ZeRO partitioning.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 64),
        num_key_value_heads=max(4, args.hidden // 64), tie_word_embeddings=False))


def state_bytes(optimizer) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:  # skip scalar step counters
                total += v.numel() * v.element_size()
    return total


def one_step(model, optimizer) -> float:
    import torch

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    t0 = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - t0


def run_config(args, **sections):
    from launcher.rules import validate

    data = {"run_dir": "unused", "model": {"name_or_path": "unused"}, "data": {"train": "unused"},
            "train": {"max_steps": 100, "weight_decay": 0.01}, "zero": {"stage": 0}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return validate(data)


def optimizers_table(args) -> None:
    from trainer.optim import build_optimizer

    arms = [("adamw", False), ("deepspeed_adamw", True), ("adamw8bit", False), ("adam8bit", False),
            ("paged_adamw8bit", False), ("lion8bit", False)]
    if args.fused:
        arms.insert(1, ("deepspeed_adamw", False))
    base = build_model(args)
    n = sum(p.numel() for p in base.parameters())
    print(f"\nPart 1: optimizer state after one step, {n:,} trainable parameters "
          f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab})")
    print(f"{'train.optimizer':<34}{'state MB':>10}{'bytes/param':>13}{'step ms':>10}{'vs adamw':>10}")
    ref = None
    for name, offload in arms:
        model = copy.deepcopy(base)
        cfg = run_config(args, train={"optimizer": name})
        opt = build_optimizer(model, cfg.train, offload=offload)
        one_step(model, opt)
        dt = min(one_step(model, opt) for _ in range(3))
        b = state_bytes(opt)
        ref = ref or b
        label = f"{name} ({type(opt).__name__})"
        print(f"{label:<34}{b / 2**20:>10.2f}{b / n:>13.3f}{dt * 1e3:>10.1f}{b / ref:>10.3f}")


def methods_table(args) -> None:
    from trainer.methods import apply_method
    from trainer.optim import build_optimizer

    arms = [("full", {}), ("full, last 1 block", {"freeze": {"train_last_k_blocks": 1}}),
            ("full, head only", {"freeze": {"head_only": True}}),
            ("lora r=8 all-linear", {"name": "lora"}), ("lora r=16 all-linear", {"name": "lora", "lora": {"r": 16}}),
            ("lora r=8 q,v", {"name": "lora", "lora": {"target_modules": ["q_proj", "v_proj"]}}),
            ("dora r=8 all-linear", {"name": "lora", "lora": {"use_dora": True}}),
            ("adalora r=8 all-linear", {"name": "adalora"}), ("ia3", {"name": "ia3"}),
            ("prefix 20 tokens", {"name": "prefix"}), ("prompt 20 tokens", {"name": "prompt"})]
    base = build_model(args)
    print("\nPart 2: what trains, and its AdamW state + fp32 gradients (measured after one step)")
    print(f"{'method':<26}{'trainable':>12}{'fraction':>10}{'Adam state MB':>15}{'+ grads MB':>12}")
    for label, method in arms:
        model = copy.deepcopy(base)
        cfg = run_config(args, method=method)
        model, applied = apply_method(model, cfg, total_steps=100)
        opt = build_optimizer(model, cfg.train, offload=False, groups=applied.groups)
        one_step(model, opt)
        b = state_bytes(opt)
        grads = 4 * applied.n_trainable
        print(f"{label:<26}{applied.n_trainable:>12,}{100 * applied.fraction:>9.3f}%{b / 2**20:>15.3f}"
              f"{(b + grads) / 2**20:>12.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--fused", action="store_true", help="also DeepSpeed FusedAdam (JIT-builds its op)")
    args = p.parse_args()
    optimizers_table(args)
    methods_table(args)


if __name__ == "__main__":
    main()
