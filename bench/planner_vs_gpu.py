"""Benchmark (not a test): the memory planner's predicted peak vs what the trainer really allocates.

    python bench/planner_vs_gpu.py [--out DIR] [--steps 3] [--only NAME ...]   # one GPU, ~5 minutes
    python bench/planner_vs_gpu.py --smoke [--out DIR]                          # CPU, tiny shapes, minutes
    python bench/planner_vs_gpu.py --predict-only                               # the predicted column only

Each layout, in a process of its own, builds a random-init model from a config dict and trains
--steps real optimizer steps through trainer.main.run (one rank; checkpoint writes are skipped: they
do not change the peak and a 1B checkpoint is 15 GB), on packed rows of full length. Then it
compares launcher.planner's parts with the measurement:

    GPU:   predicted allocated peak  vs  torch.cuda.max_memory_allocated (the trainer's train/cuda_max_allocated_gb)
           predicted reserved peak   vs  torch.cuda.max_memory_reserved (allocated + the allocator's slack)
           the CUDA context (device used - reserved) is printed beside, for CUDA_CONTEXT_BYTES
    smoke: predicted allocated peak  vs  the CPU allocator's peak over the whole run (torch.profiler); tiny
           models are dominated by start-up copies, so this only shows the script runs end to end

Layouts (GPU): a Llama-3.2-1B shape at ZeRO-2 and ZeRO-3, each with and without gradient checkpointing
(micro 4 x 2048 tokens, plain fp32 loss), and Llama-3-8B's widths with 8 of its 32 layers (2.8e9
parameters, so that its CPU Adam state, 50 GB, fits the 128 GiB of a one-GPU machine) at ZeRO-3 with
the optimizer on the CPU and checkpointing. A chunked-loss layout is added when the trainer
implements train.loss_chunk_tokens. Prints a markdown table and writes DIR/planner_vs_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "tie_word_embeddings": True, "max_position_embeddings": 4096}
LLAMA_8B_WIDE = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "tie_word_embeddings": False, "max_position_embeddings": 4096}
TINY = {"model_type": "llama", "vocab_size": 2000, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def layouts(smoke: bool, chunked_loss: bool) -> list[dict]:
    """(name, model config, micro, seq, overrides) of every layout measured."""
    if smoke:
        base = {"model": TINY, "micro": 2, "seq": 64, "dtype": "bf16", "extra": {"zero.reduce_bucket_size": 2_000_000}}
        return [dict(base, name=f"tiny z{s}{' ckpt' if c else ''}{' offload' if o else ''}", stage=s, ckpt=c, offload=o)
                for s, c, o in ((2, False, False), (2, True, False), (3, False, False), (3, True, False),
                                (3, True, True))]
    one_b = {"model": LLAMA_1B, "micro": 4, "seq": 2048, "dtype": "bf16", "extra": {}, "offload": False}
    out = [dict(one_b, name="1B z2", stage=2, ckpt=False), dict(one_b, name="1B z2 ckpt", stage=2, ckpt=True),
           dict(one_b, name="1B z3", stage=3, ckpt=False), dict(one_b, name="1B z3 ckpt", stage=3, ckpt=True),
           {"name": "8B-wide (8 layers) z3 offload ckpt", "model": LLAMA_8B_WIDE, "micro": 1, "seq": 2048,
            "dtype": "bf16", "extra": {}, "stage": 3, "ckpt": True, "offload": True}]
    if chunked_loss:
        out.append(dict(one_b, name="1B z2 chunked loss 1024", stage=2, ckpt=False,
                        extra={"train.loss_chunk_tokens": 1024}))
    return out


def write_rows(path: Path, n_rows: int) -> Path:
    """Rows of ~2,300 tiny-tokenizer tokens each; packing cuts them into full-length blocks (no padding)."""
    rng = random.Random(0)
    words = ["the", "model", "learns", "a", "sum", "of", "numbers", "and", "then", "it", "writes", "plus", "is"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) + str(rng.randint(0, 99))
                                                         for _ in range(400))}) + "\n" for _ in range(n_rows)))
    return path


def run_config(lay: dict, run_dir: Path, train: Path, steps: int) -> dict:
    from launcher.rules import apply_overrides

    cfg = {
        "run_dir": str(run_dir), "seed": 1,
        "model": {"tokenizer": str(ROOT / "examples" / "tiny-tokenizer"), "config": dict(lay["model"]),
                  "gradient_checkpointing": lay["ckpt"]},
        "data": {"train": str(train), "format": "text", "max_length": lay["seq"], "packing": True},
        "precision": {"dtype": lay["dtype"]},
        "train": {"micro_batch_size": lay["micro"], "max_steps": steps, "lr": 1e-5, "scheduler": "constant",
                  "loss_chunk_tokens": 0},
        "zero": {"stage": lay["stage"], "offload_optimizer": lay["offload"]},
        "dist": {"nodes": 1, "procs_per_node": 1},
        "checkpoint": {"every_steps": 0, "export": False},
        "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
    }
    return apply_overrides(cfg, lay["extra"])


def predict(cfg, gpu_gib: float):
    from launcher.memory import params_from_hf_config
    from launcher.planner import Hardware, ModelInfo, plan_memory

    c = cfg.model.config
    return plan_memory(cfg, ModelInfo(params_from_hf_config(c), "config dict", c), Hardware(1, 1, gpu_gib))


def measure(cfg, world, smoke: bool) -> dict:
    """Train through the real trainer; the peak the device allocator saw (and, on GPU, reserved)."""
    import torch

    from trainer.main import run
    from trainer.monitor import read_metrics

    if smoke:
        from trainer.monitor import PeakBytes

        with PeakBytes() as peak:
            result = run(cfg, world)
        return {"result": result, "allocated": peak.peak, "reserved": None, "context": None}
    torch.cuda.reset_peak_memory_stats()
    result = run(cfg, world)
    rows = [r for r in read_metrics(Path(cfg.run_dir)) if "train/cuda_max_allocated_gb" in r]
    free, total = torch.cuda.mem_get_info()
    return {"result": result, "allocated": max(torch.cuda.max_memory_allocated(),
                                               max(r["train/cuda_max_allocated_gb"] for r in rows) * 2**30),
            "trainer_allocated": max(r["train/cuda_max_allocated_gb"] for r in rows) * 2**30,
            "reserved": torch.cuda.max_memory_reserved(), "context": (total - free) - torch.cuda.memory_reserved(),
            "steps_done": len(rows)}


def one_layout(args, lay: dict, out: Path) -> dict:
    """Measure one layout in this process (a fresh one per layout: nothing left over from another)."""
    import torch

    from launcher.memory import GIB
    from launcher.planner import ALLOCATOR_SLACK
    from launcher.rules import validate
    from trainer import checkpoint
    from trainer.dist import init_distributed

    checkpoint.save = lambda *a, **k: None  # a checkpoint write does not change the peak; a 1B one is 15 GB
    world = init_distributed(-1)
    run_dir = out / slug(lay["name"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run dir would not train again
    cfg = validate(run_config(lay, run_dir, out / "train.jsonl", args.steps), source=lay["name"])
    plan = predict(cfg, 1e6 if args.smoke else torch.cuda.get_device_properties(0).total_memory / GIB)
    predicted = plan.allocated_peak
    if args.smoke:  # on a CPU the offloaded states live in the same memory as everything else
        predicted += sum(p.second for p in plan.cpu if p.name.startswith("offloaded"))
    t0 = time.perf_counter()
    got = measure(cfg, world, args.smoke)
    import torch.distributed as dist

    dist.destroy_process_group()
    return {"name": lay["name"], "wall_s": round(time.perf_counter() - t0, 1), "status": got["result"]["status"],
            "steps_done": got.get("steps_done", args.steps),
            "predicted_allocated": predicted, "measured_allocated": got["allocated"],
            "predicted_reserved": predicted * (1 + ALLOCATOR_SLACK), "measured_reserved": got["reserved"],
            "predicted_device": plan.gpu_peak, "measured_context": got["context"],
            "trainer_allocated": got.get("trainer_allocated"),
            "parts": {p.name: [p.first, p.second] for p in plan.gpu}}


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for run dirs and planner_vs_gpu.json (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the script runs end to end")
    ap.add_argument("--only", nargs="*", default=None, help="layout names to run (default: all)")
    ap.add_argument("--predict-only", action="store_true", help="print the predicted column only (no device needed)")
    ap.add_argument("--layout", default=None, help=argparse.SUPPRESS)  # internal: measure this one layout here
    args = ap.parse_args()

    import subprocess
    import tempfile

    import torch

    from launcher.memory import GIB
    from launcher.planner import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES
    from launcher.rules import validate

    if args.predict_only:
        for lay in layouts(args.smoke, chunked_loss=False):
            cfg = validate(run_config(lay, Path("/tmp/planner-predict"), ROOT / "README.md", args.steps), source=lay["name"])
            plan = predict(cfg, 141.0)
            print(f"| {lay['name']} | {plan.allocated_peak / GIB:.2f} GiB | {plan.allocated_peak * (1 + ALLOCATOR_SLACK) / GIB:.2f}"
                  f" GiB | " + ", ".join(f"{p.name} {max(p.first, p.second) / GIB:.2f}" for p in plan.gpu
                                         if max(p.first, p.second) >= 0.01 * GIB) + " |")
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="planner_vs_gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    chunked = "loss_chunk_tokens" in "".join(p.read_text() for p in (ROOT / "trainer").glob("*.py"))
    todo = [lay for lay in layouts(args.smoke, chunked) if not args.only or lay["name"] in args.only]
    if args.layout is not None:
        (lay,) = [x for x in todo if x["name"] == args.layout]
        row = one_layout(args, lay, out)
        (out / f"{slug(lay['name'])}.json").write_text(json.dumps(row, indent=1) + "\n")
        return 0
    write_rows(out / "train.jsonl", 12 if args.smoke else 64)
    rows = []
    for lay in todo:
        argv = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps), "--layout", lay["name"]]
        p = subprocess.run(argv + (["--smoke"] if args.smoke else []), cwd=ROOT, capture_output=True, text=True)
        result = out / f"{slug(lay['name'])}.json"
        (out / f"{slug(lay['name'])}.log").write_text(p.stdout + p.stderr)
        if p.returncode or not result.exists():
            print(f"{lay['name']}: FAILED (exit {p.returncode}); log: {out / slug(lay['name'])}.log\n"
                  f"{(p.stdout + p.stderr)[-3000:]}", flush=True)
            return 1
        row = json.loads(result.read_text())
        rows.append(row)
        print(f"{row['name']}: predicted {row['predicted_allocated'] / GIB:.2f} GiB, measured "
              f"{row['measured_allocated'] / GIB:.2f} GiB ({row['wall_s']} s)", flush=True)
    device = "CPU (torch.profiler allocations)" if args.smoke else torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}; CUDA context assumed {CUDA_CONTEXT_BYTES / GIB:.2f} GiB\n")
    print("| layout | predicted allocated | measured max allocated | ratio | predicted reserved | measured max reserved "
          "| ratio | measured context |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        res = (f"{r['predicted_reserved'] / GIB:.2f} GiB | {r['measured_reserved'] / GIB:.2f} GiB | "
               f"{r['predicted_reserved'] / r['measured_reserved']:.3f}" if r["measured_reserved"] else "- | - | -")
        ctx = f"{r['measured_context'] / GIB:.2f} GiB" if r["measured_context"] is not None else "-"
        print(f"| {r['name']} | {r['predicted_allocated'] / GIB:.2f} GiB | {r['measured_allocated'] / GIB:.2f} GiB | "
              f"{r['predicted_allocated'] / r['measured_allocated']:.3f} | {res} | {ctx} |")
    (out / "planner_vs_gpu.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                         "smoke": args.smoke, "layouts": rows}, indent=1) + "\n")
    print(f"\nwrote {out / 'planner_vs_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
