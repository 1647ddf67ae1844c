"""Benchmark (not a test): our trainer vs a minimal hand-written DeepSpeed loop, side by side.

    python bench/throughput.py [--steps 60] [--ranks 2] [--stage 2] [--micro 16] [--rounds 6]

Both arms use the same tiny Llama, data, DeepSpeed config and ranks, in ONE launch, alternating
A/B then B/A for --rounds rounds. Prints non-padding tokens/s of each (steady state: the first 5 steps of
each arm are warm-up), the ratio ours / hand-written of every round and their median.

The hand-written loop is what a user writes: the epoch's order computed once (like a
DistributedSampler), forward with labels (transformers' own loss), backward, step, and one
all-reduce of the loss and token count for its log (ours also ends its step with one collective).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WARMUP = 5


def bench_config(run_dir: Path, args) -> dict:
    return {
        "run_dir": str(run_dir), "seed": 1,
        "model": {"tokenizer": str(ROOT / "examples/tiny-tokenizer"), "config": {
            "model_type": "llama", "vocab_size": 512, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
            "num_hidden_layers": args.layers, "num_attention_heads": max(4, args.hidden // 64),
            "max_position_embeddings": args.max_length}},
        "data": {"train": str(ROOT / "examples/data/arith-train.jsonl"), "format": "prompt_response",
                 "max_length": args.max_length, "packing": args.max_length > 64},
        "precision": {"dtype": args.dtype},
        "train": {"micro_batch_size": args.micro, "max_steps": args.steps, "lr": 1e-3, "scheduler": "constant"},
        "zero": {"stage": args.stage}, "dist": {"procs_per_node": args.ranks},
        "checkpoint": {"every_steps": 0, "export": False},
        "logging": {"every_steps": 1000, "progress_bar": False, "tensorboard": True},
    }


def ours(cfg_dict: dict, world) -> tuple[float, float]:
    from launcher.rules import validate
    from trainer.main import run
    from trainer.monitor import read_metrics

    run(validate(cfg_dict), world)
    rows = [r for r in read_metrics(Path(cfg_dict["run_dir"])) if "train/loss" in r][WARMUP:]
    tokens = sum(r["train/tokens_per_s"] * r["train/step_time_s"] for r in rows)
    mfu = statistics.median(r.get("train/mfu", 0.0) for r in rows)
    return tokens / sum(r["train/step_time_s"] for r in rows), mfu


def hand_written(cfg_dict: dict, world) -> float:
    """What a user would write by hand: model, batches, deepspeed.initialize, forward/backward/step."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from launcher.ds_config import render_ds_config
    from launcher.rules import validate
    from trainer import data as D
    from trainer.encode import CausalLMEncoder

    cfg = validate(cfg_dict)
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    rows = D.load_rows(cfg.data.train)
    d = cfg.data
    ds = D.tokenize(rows, CausalLMEncoder(tok, d), d.packing, d.max_length, "bench").rows
    m = dict(cfg.model.config)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(m.pop("model_type"), **m))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=render_ds_config(cfg))
    order = D.Order(len(ds), world.world_size, cfg.train.micro_batch_size, 1, cfg.seed)
    times, tokens = [], []
    for step in range(cfg.train.max_steps):
        t0 = time.perf_counter()  # timed like ours: batch assembly + forward/backward/step
        (idx,) = order.windows(step)[world.rank]
        b = D.fetch(ds, idx, tok.pad_token_id)
        b = {k: v.to(engine.device) for k, v in b.items()}
        if "position_ids" in b:  # packed rows: documents masked by position ids
            inputs = {"position_ids": b["position_ids"], "use_cache": False}
        else:
            inputs = {"attention_mask": b["attention_mask"]}
        loss = engine(input_ids=b["input_ids"], labels=b["labels"], **inputs).loss
        engine.backward(loss)
        engine.step()
        t = torch.stack([loss.detach().float(), b["attention_mask"].sum().float()])  # its log: mean loss, tokens
        dist.all_reduce(t)
        _, n_tokens = t.tolist()
        times.append(time.perf_counter() - t0)  # like ours: the step ends when the log's numbers are in
        tokens.append(n_tokens)
    engine.destroy()
    return sum(tokens[WARMUP:]) / sum(times[WARMUP:])


def worker(args) -> None:
    from trainer.dist import init_distributed

    world = init_distributed()
    tmp = Path(args.tmp)
    res = {"ours": [], "hand": [], "mfu": []}
    for r in range(args.rounds):  # A B, B A, A B, ...: a load that drifts during the run favours neither
        for arm in (("hand", "ours") if r % 2 == 0 else ("ours", "hand")):
            if arm == "hand":
                res["hand"].append(hand_written(bench_config(tmp / f"hand{r}", args), world))
            else:
                tps, mfu = ours(bench_config(tmp / f"ours{r}", args), world)
                res["ours"].append(tps)
                res["mfu"].append(mfu)
    if world.is_main:
        (tmp / "bench.json").write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--tmp")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               __file__, "--worker", "--tmp", tmp] + [f"--{k}={v}" for k, v in
                                                       (("steps", args.steps), ("stage", args.stage),
                                                        ("micro", args.micro), ("rounds", args.rounds), ("ranks", args.ranks),
                                                        ("hidden", args.hidden), ("layers", args.layers),
                                                        ("max-length", args.max_length), ("dtype", args.dtype))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"benchmark launch failed:\n{proc.stderr[-4000:]}")
        res = json.loads((Path(tmp) / "bench.json").read_text())
    o, h = statistics.median(res["ours"]), statistics.median(res["hand"])
    ratios = [a / b for a, b in zip(res["ours"], res["hand"])]
    print(f"llama hidden {args.hidden} x {args.layers} layers, seq {args.max_length}, {args.dtype}, "
          f"ZeRO-{args.stage}, {args.ranks} ranks, micro {args.micro}, {args.steps} steps x {args.rounds} rounds (A/B, B/A alternating)")
    print(f"  hand-written DeepSpeed loop: {h:10.0f} tokens/s  (rounds: {', '.join(f'{x:.0f}' for x in res['hand'])})")
    print(f"  our trainer:                 {o:10.0f} tokens/s  (rounds: {', '.join(f'{x:.0f}' for x in res['ours'])})")
    print(f"  ratio ours / hand-written:   {statistics.median(ratios):10.3f}  (median of rounds: "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; ratio of medians {o / h:.3f})")
    if any(res["mfu"]):
        print(f"  our MFU (median of rounds):  {statistics.median(res['mfu']):10.3f}")


if __name__ == "__main__":
    main()
