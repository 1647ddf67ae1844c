"""Benchmark on one GPU (not a test): throughput, MFU and memory at real model shapes, side by side.

    python bench/gpu_scale.py --out DIR [--parts a,b,c] [--budget-s 540]   # one GPU, about 8 minutes
    python bench/gpu_scale.py --out DIR --parts a; ... --parts b,c         # the same in two shorter calls
    python bench/gpu_scale.py --smoke --out DIR                            # tiny shapes on the CPU, a few steps

Random-init models from config dicts of real shapes (no hub), the tiny tokenizer, and synthetic
documents of varied length packed into rows. Every arm runs in its own process (a fresh GPU, and an
out-of-memory or a crash costs only that arm); the parent writes DIR/results.json and DIR/results.md
and prints the table.

(a) Llama-3.2-1B shape, seq 2048, bf16, ZeRO-2, packed, one GPU:
    ours        the trainer (trainer.main.run) with its best settings: Liger (if installed),
                flash-attention-2 (if installed, else sdpa), packing, chunked loss
    ours-noliger  the same with model.liger=false
    hf-trainer  transformers' Trainer with the same DeepSpeed config, batch, packed rows and attention
    hand        a hand-written DeepSpeed loop (forward with labels, backward, step) on the same rows
(b) Llama-3-8B shape, full fine-tuning, ZeRO-3 with the optimizer offloaded to the CPU, seq 4096,
    one GPU, 12 steps (10 measured): the trainer; tokens/s, peak GPU and peak CPU memory.
(c) the largest sequence length (one packed row, micro-batch 1) one training step of (a) fits in,
    with Liger, with the chunked loss, and with the plain loss (full fp32 logits).

tokens/s counts non-padding tokens; MFU is the trainer's matmul-FLOP count (README "Efficiency")
over the device's bf16 peak (trainer/monitor.py table), the same formula for every arm. The arms
built on the trainer skip its final checkpoint and export (an 8B checkpoint would be 128 GB):
the benchmark measures training steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "examples" / "tiny-tokenizer"

SHAPES = {
    "llama-3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 4096, "tie_word_embeddings": True},
}
# What each part runs, for real (one GPU) and as a smoke test (CPU, tiny shapes, a few steps).
PLANS = {
    "real": {"a": {"shape": "llama-3.2-1b", "seq": 2048, "micro": 8, "steps": 20, "warmup": 5, "dtype": "bf16"},
             "b": {"shape": "llama-3-8b", "seq": 4096, "micro": 1, "steps": 12, "warmup": 2, "dtype": "bf16"},
             "c": {"shape": "llama-3.2-1b", "seqs": [8192, 16384, 32768, 65536, 98304, 131072], "dtype": "bf16"},
             "tokens": 700_000, "doc_tokens": (64, 3000)},
    "smoke": {"a": {"shape": "tiny", "seq": 128, "micro": 2, "steps": 4, "warmup": 1, "dtype": "bf16"},
              "b": {"shape": "tiny", "seq": 256, "micro": 1, "steps": 3, "warmup": 1, "dtype": "bf16"},
              "c": {"shape": "tiny", "seqs": [128, 256, 512], "dtype": "bf16"},
              "tokens": 12_000, "doc_tokens": (16, 200)},
}
ARM_TIMEOUT_S = {"a": 150, "b": 330, "c": 150}
WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or has had not "
         "but first one their its new after who they have her she two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many can "
         "state about national out known university united then made").split()


# --------------------------------------------------------------------------- helpers (every arm process)


def has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def write_docs(path: Path, tokens: int, doc_tokens: tuple[int, int]) -> None:
    """Synthetic text documents (about 5 tiny-tokenizer tokens per word), lengths log-uniform."""
    import math
    import random

    rng = random.Random(0)
    lo, hi = (math.log(x / 5) for x in doc_tokens)
    rows, total = [], 0
    while total < tokens:
        n = int(math.exp(rng.uniform(lo, hi)))
        rows.append(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}))
        total += 5 * n
    path.write_text("\n".join(rows) + "\n")


def run_config(spec: dict, out: Path, *, liger: bool, chunk: int, zero: dict) -> dict:
    attn = "flash_attention_2" if spec.get("flash") else "sdpa"
    return {"run_dir": str(out), "seed": 1,
            "model": {"tokenizer": str(TOKENIZER), "config": SHAPES[spec["shape"]], "attn_implementation": attn,
                      "liger": liger},
            "data": {"train": spec["data"], "format": "text", "max_length": spec["seq"], "packing": True},
            "precision": {"dtype": spec["dtype"]},
            "train": {"micro_batch_size": spec["micro"], "max_steps": spec["steps"], "lr": 1e-5, "scheduler": "constant",
                      "loss_chunk_tokens": chunk},
            "zero": zero, "dist": {"procs_per_node": 1},
            "checkpoint": {"every_steps": 0, "export": False},
            "logging": {"every_steps": 5, "progress_bar": False, "tensorboard": False}}


def peaks() -> dict:
    """Peak device memory of this process (GiB) and its peak resident CPU memory (GiB)."""
    import resource

    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_gpu_gib": gpu, "peak_cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def summary(times: list[float], tokens: list[float], flops: list[float] | None, warmup: int) -> dict:
    """Steady state (after ``warmup`` steps): tokens/s, median step time, MFU (None without a peak)."""
    from trainer.monitor import peak_tflops

    t, n = times[warmup:], tokens[warmup:]
    peak = peak_tflops(None)
    mfu = sum(flops[warmup:]) / sum(t) / (peak * 1e12) if peak and flops is not None else None
    return {"steps_measured": len(t), "tokens_per_s": sum(n) / sum(t), "step_time_s": statistics.median(t),
            "mfu": mfu, "peak_tflops": peak}


def packed_rows(spec: dict):
    from transformers import AutoTokenizer

    from launcher.config import DataConfig
    from trainer import data as D
    from trainer.encode import CausalLMEncoder

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    d = DataConfig(train=spec["data"], format="text", max_length=spec["seq"], packing=True)
    return tok, D.tokenize(D.load_rows(spec["data"]), CausalLMEncoder(tok, d), True, spec["seq"], "bench").rows


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- arms


def arm_ours(spec: dict, out: Path) -> dict:
    """The trainer itself; its metrics.jsonl gives step times and tokens (every rank agrees)."""
    import trainer.finish
    from launcher.rules import validate
    from trainer.dist import init_distributed
    from trainer.main import run
    from trainer.monitor import read_metrics

    trainer.finish.finish = lambda loop, status, tok, is_peft: {"status": status}  # no final checkpoint/export
    zero = spec["zero"]
    cfg = validate(run_config(spec, out, liger=spec["liger"], chunk=spec.get("chunk", 1024), zero=zero))
    result = run(cfg, init_distributed())
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    res = summary([r["train/step_time_s"] for r in rows], [r["train/tokens_per_s"] * r["train/step_time_s"] for r in rows],
                  None, spec["warmup"])
    mfus = [r["train/mfu"] for r in rows[spec["warmup"]:] if r.get("train/mfu") is not None]
    res["mfu"] = statistics.median(mfus) if mfus else None  # the trainer's own (same formula)
    world = json.loads((out / "world.json").read_text())[0]
    return {**res, **peaks(), "status": result["status"], "loss_first_last": [rows[0]["train/loss"], rows[-1]["train/loss"]],
            "attn_implementation": world["attn_implementation"], "liger": world["liger"], "loss": world["loss"]}


def arm_hf_trainer(spec: dict, out: Path) -> dict:
    """transformers' Trainer on the same packed rows, DeepSpeed config (ours, rendered), batch and attention."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from launcher.batch import plan_batch
    from launcher.ds_config import build_ds_config
    from launcher.rules import validate
    from trainer import data as D
    from trainer.dist import init_distributed
    from trainer.monitor import flop_model

    world = init_distributed()
    cfg = validate(run_config(spec, out, liger=False, chunk=0, zero=spec["zero"]))
    ds_config = build_ds_config(cfg, plan_batch(spec["micro"], 1, None, 1))
    tok, rows = packed_rows(spec)
    m = dict(SHAPES[spec["shape"]])
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(m.pop("model_type"), **m),
                                             attn_implementation=cfg.model.attn_implementation)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {k: v[0] for k, v in rows[[i]].items()}

    tokens: list[int] = []

    def collate(feats):  # packed: position ids, no attention mask (transformers masks the documents)
        batch = D.collate(feats, list(range(len(feats))), tok.pad_token_id)
        tokens.append(int(batch.pop("attention_mask").sum()))
        return batch

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=spec["micro"], gradient_accumulation_steps=1,
                             max_steps=spec["steps"], learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=cfg.train.grad_clip, bf16=spec["dtype"] == "bf16",
                             deepspeed=ds_config, logging_steps=spec["steps"], save_strategy="no", report_to=[],
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=1,
                             use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=collate, callbacks=[Clock()])
    trainer.train()
    fm = flop_model(model)
    n = tokens[: len(times)]
    res = summary(times, n, [fm.step([(x, spec["seq"])]) for x in n], spec["warmup"])
    del world
    return {**res, **peaks(), "status": "done", "attn_implementation": model.config._attn_implementation}


def arm_hand(spec: dict, out: Path) -> dict:
    """What a user writes by hand: the model, deepspeed.initialize, forward with labels, backward, step."""
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.batch import plan_batch
    from launcher.ds_config import build_ds_config
    from launcher.rules import validate
    from trainer import data as D
    from trainer.dist import init_distributed
    from trainer.monitor import flop_model

    world = init_distributed()
    cfg = validate(run_config(spec, out, liger=False, chunk=0, zero=spec["zero"]))
    tok, rows = packed_rows(spec)
    m = dict(SHAPES[spec["shape"]])
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(m.pop("model_type"), **m),
                                             attn_implementation=cfg.model.attn_implementation)
    fm = flop_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=build_ds_config(cfg, plan_batch(spec["micro"], 1, None, 1)))
    order = D.Order(len(rows), 1, spec["micro"], 1, cfg.seed)
    times, tokens, flops = [], [], []
    for step in range(spec["steps"]):
        sync()
        t0 = time.perf_counter()
        (idx,) = order.windows(step)[0]
        b = {k: v.to(world.device) for k, v in D.fetch(rows, idx, tok.pad_token_id).items()}
        loss = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        times.append(time.perf_counter() - t0)
        tokens.append(int(b["attention_mask"].sum()))
        flops.append(fm.step([(tokens[-1], spec["seq"])]))
    engine.destroy()
    return {**summary(times, tokens, flops, spec["warmup"]), **peaks(), "status": "done",
            "attn_implementation": model.config._attn_implementation}


def arm_maxseq(spec: dict, out: Path) -> dict:
    """One training step (micro-batch 1, one packed row of random tokens) at growing sequence lengths,
    with the trainer's model, loss and optimizer, until the GPU runs out of memory."""
    import torch

    from launcher.batch import plan_batch
    from launcher.ds_config import build_ds_config
    from launcher.rules import validate
    from trainer.dist import init_distributed
    from trainer.model import build_model
    from trainer.optim import build_optimizer
    from trainer.tasks import CausalLM

    import deepspeed

    world = init_distributed()
    cfg = validate(run_config({**spec, "seq": spec["seqs"][-1], "micro": 1, "steps": 1}, out, liger=spec["liger"],
                              chunk=spec["chunk"], zero={"stage": 2}))
    ds_config = build_ds_config(cfg, plan_batch(1, 1, None, 1))
    task = CausalLM(cfg.train.loss_chunk_tokens, spec["seqs"][0], cfg.model.liger)
    torch.manual_seed(1)
    model, _ = build_model(cfg.model, ds_config, cfg.precision.dtype, task)
    line = task.bind(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train, offload=False),
                                      config=ds_config)
    fits, failed, peak_gib = [], None, {}
    vocab = SHAPES[spec["shape"]]["vocab_size"]
    for seq in spec["seqs"]:
        task.max_length = seq
        ids = torch.randint(0, vocab, (1, seq))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(seq)[None]}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            loss = task.loss_sum(engine, batch, world.device)
            engine.backward(loss / seq)
            engine.step()
            sync()
        except torch.OutOfMemoryError as e:
            failed = f"{seq}: {str(e).splitlines()[0][:160]}"
            break
        fits.append(seq)
        peak_gib[seq] = peaks()["peak_gpu_gib"]
    return {"status": "done", "max_seq_fits": fits[-1] if fits else None, "fits": fits, "first_oom": failed,
            "peak_gpu_gib_by_seq": peak_gib, "loss": line}


ARMS = {"ours": arm_ours, "hf-trainer": arm_hf_trainer, "hand": arm_hand, "maxseq": arm_maxseq}


# --------------------------------------------------------------------------- the parent


def arm_specs(mode: str, data: Path, parts: list[str]) -> list[tuple[str, str, str, dict]]:
    """(part, label, arm function, spec) in run order."""
    plan = PLANS[mode]
    gpu = not (mode == "smoke")
    liger, flash = gpu and has("liger_kernel"), gpu and has("flash_attn")
    base = {"data": str(data), "flash": flash}
    out = []
    if "a" in parts:
        a = {**plan["a"], **base, "zero": {"stage": 2}}
        out += [("a", "ours (best)", "ours", {**a, "liger": liger}),
                ("a", "ours, Liger off", "ours", {**a, "liger": False}),
                ("a", "HF Trainer", "hf-trainer", a),
                ("a", "hand-written loop", "hand", a)]
    if "b" in parts:
        out.append(("b", "ours, ZeRO-3 + optimizer offload", "ours", {
            **plan["b"], **base, "liger": False, "zero": {"stage": 3, "offload_optimizer": True}}))
    if "c" in parts:
        c = {**plan["c"], **base}
        if liger:
            out.append(("c", "Liger", "maxseq", {**c, "liger": True, "chunk": 1024}))
        out += [("c", "chunked loss (1024)", "maxseq", {**c, "liger": False, "chunk": 1024}),
                ("c", "plain loss (full fp32 logits)", "maxseq", {**c, "liger": False, "chunk": 0})]
    return out


def meta(mode: str) -> dict:
    import datetime

    import deepspeed
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"mode": mode, "date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "liger_kernel": has("liger_kernel"), "flash_attn": has("flash_attn"), "cpu_count": os.cpu_count()}


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# bench/gpu_scale.py ({m['mode']})", "",
             f"{m['gpu'] or 'CPU'}, {m['date']}; torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
             f"{m['transformers']}; liger-kernel {'yes' if m['liger_kernel'] else 'no'}, flash-attn "
             f"{'yes' if m['flash_attn'] else 'no'}", ""]

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    plan = PLANS[m["mode"]]
    a, b = plan["a"], plan["b"]
    for part, title in (("a", f"(a) {a['shape']} shape, seq {a['seq']}, micro {a['micro']}, {a['dtype']}, ZeRO-2, "
                              f"packed, {a['steps']} steps ({a['warmup']} warm-up), 1 device"),
                        ("b", f"(b) {b['shape']} shape, full FT, ZeRO-3 + optimizer offload, seq {b['seq']}, "
                              f"micro {b['micro']}, {b['steps']} steps ({b['warmup']} warm-up), 1 device")):
        arms = [r for r in results["arms"] if r["part"] == part]
        if not arms:
            continue
        lines += [f"## {title}", "", "| arm | tokens/s | MFU | peak GPU GiB | peak CPU RSS GiB | steps | attention | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in arms:
            lines.append(f"| {r['label']} | {f(r.get('tokens_per_s'), '.0f')} | {f(r.get('mfu'), '.3f')} | "
                         f"{f(r.get('peak_gpu_gib'), '.1f')} | {f(r.get('peak_cpu_rss_gib'), '.1f')} | "
                         f"{r.get('steps_measured', 'n/a')} | {r.get('attn_implementation', '')} | {r['status']} |")
        if part == "a":
            tps = {r["label"]: r.get("tokens_per_s") for r in arms}
            if tps.get("ours (best)") and tps.get("HF Trainer"):
                lines += ["", f"ours (best) / HF Trainer: {tps['ours (best)'] / tps['HF Trainer']:.2f}x"]
            if tps.get("ours (best)") and tps.get("hand-written loop"):
                lines += [f"ours (best) / hand-written loop: {tps['ours (best)'] / tps['hand-written loop']:.2f}x"]
        lines.append("")
    arms = [r for r in results["arms"] if r["part"] == "c"]
    if arms:
        lines += [f"## (c) largest sequence length of one training step of (a) (micro-batch 1; tried "
                  f"{', '.join(map(str, plan['c']['seqs']))})", "",
                  "| loss | fits | first out-of-memory | status |", "|---|---|---|---|"]
        for r in arms:
            lines.append(f"| {r['label']} | {r.get('max_seq_fits', 'n/a')} | {r.get('first_oom') or 'none tried'} | "
                         f"{r['status']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the arms' run dirs")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the script end to end")
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting arms after this many seconds (default 540; smoke 3600)")
    p.add_argument("--arm")
    p.add_argument("--spec")
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.arm:  # one arm, in its own process
        res = ARMS[args.arm](json.loads(args.spec), out)
        (out / "arm.json").write_text(json.dumps(res, indent=1, default=str))
        return
    mode = "smoke" if args.smoke else "real"
    args.budget_s = args.budget_s or (3600 if args.smoke else 540)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "docs.jsonl"
    write_docs(data, PLANS[mode]["tokens"], PLANS[mode]["doc_tokens"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    results = {"meta": meta(mode), "arms": []}
    for i, (part, label, arm, spec) in enumerate(arm_specs(mode, data, args.parts.split(","))):
        arm_dir = out / f"{part}{i}-{arm}"
        arm_dir.mkdir(exist_ok=True)
        left = args.budget_s - (time.perf_counter() - start)
        row = {"part": part, "label": label, "arm": arm}
        if left < 30:
            row["status"] = f"skipped: the {args.budget_s:.0f} s budget is spent"
        else:
            t0 = time.perf_counter()
            log = arm_dir / "log.txt"
            try:
                with log.open("w") as f:
                    proc = subprocess.run([sys.executable, __file__, "--arm", arm, "--spec", json.dumps(spec), "--out",
                                           str(arm_dir)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                          timeout=min(ARM_TIMEOUT_S[part] * (4 if args.smoke else 1), left))
                if proc.returncode == 0:
                    row.update(json.loads((arm_dir / "arm.json").read_text()))
                else:
                    killed = " (killed: out of host memory?)" if proc.returncode in (-9, 137) else ""
                    row["status"] = f"failed, exit {proc.returncode}{killed}: " + (
                        log.read_text().strip().splitlines() or ["no output"])[-1][:300]
            except subprocess.TimeoutExpired:
                row["status"] = f"timed out (log: {log})"
            row["wall_s"] = round(time.perf_counter() - t0, 1)
        results["arms"].append(row)
        print(f"[{time.perf_counter() - start:5.0f} s] ({part}) {label}: {row['status']}"
              + (f", {row['tokens_per_s']:.0f} tokens/s" if row.get("tokens_per_s") else ""), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
