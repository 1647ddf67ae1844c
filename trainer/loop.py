"""The training loop and evaluation. Read top to bottom: one optimizer step per iteration."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.batch import BatchPlan
from launcher.config import RunConfig
from launcher.rundir import RunDir
from trainer import data as D
from trainer.dist import World, all_reduce_sum, all_reduce_sums
from trainer.methods import StepHooks
from trainer.monitor import Monitor, memory_gb
from trainer.optim import GradNorm, group_lrs
from trainer.tasks import Report, Task


@dataclass
class Run:
    """Everything the loop needs, built by main()."""
    cfg: RunConfig
    world: World
    plan: BatchPlan
    engine: Any
    train_ds: Any
    eval_ds: Any  # or None
    pad_id: int
    total_steps: int
    monitor: Monitor
    flops_per_token: float
    peak_tflops: Optional[float]
    save: Callable[[int], None]  # checkpoint at a step
    should_stop: Callable[[], bool]
    task: Task  # trainer/tasks.py: loss and metrics of the task (causal LM, sequence / token classification)
    best: Any = None  # trainer/early_stop.py EarlyStopping, or None (the export is the last step)
    save_best: Optional[Callable[[int], None]] = None  # checkpoint the best evaluation so far
    hooks: StepHooks = field(default_factory=StepHooks)  # trainer/methods.py: per-step calls (AdaLoRA)


def evaluate(run: Run) -> tuple[dict[str, float], Optional[Report]]:
    """Eval loss (per target token, or per labelled example / token for classification, over the
    whole eval split) and the task's metrics: perplexity, or accuracy / P / R / F1 with the report
    to write (classification)."""
    import torch

    engine, w, task = run.engine, run.world, run.task
    batches = D.eval_batches(len(run.eval_ds), w.world_size, w.rank, run.plan.micro_batch_size)
    if run.cfg.train.eval_max_batches:
        batches = batches[: run.cfg.train.eval_max_batches]
    engine.eval()
    loss_sum = tokens = 0.0
    outputs: list = []
    with torch.no_grad():
        for idx in batches:
            batch = D.fetch(run.eval_ds, idx, run.pad_id)
            loss, out = task.eval_step(engine, batch, idx, w.device)
            loss_sum += loss.item()
            tokens += task.n_targets(batch)
            outputs += out
    engine.train()
    loss_sum, tokens = all_reduce_sums([loss_sum, tokens], w.device)
    loss = loss_sum / max(1.0, tokens)
    return task.eval_metrics(loss, outputs)


def evaluate_and_report(run: Run, step: int) -> dict[str, float]:
    """evaluate(); rank 0 writes the report (and confusion matrix) to RUN_DIR/eval/stepNNNNNNNN/."""
    metrics, report = evaluate(run)
    if report is not None and run.world.is_main:
        run_dir = Path(run.cfg.run_dir)
        report.write(RunDir(run_dir).eval_report(step), f"{run_dir.name} step {step}")
    return metrics


def train(run: Run, start_step: int) -> str:
    """Optimizer steps start_step..total_steps-1. Returns "done", "early_stopped" or "preempted"."""
    from tqdm import tqdm

    cfg, w, engine, plan = run.cfg, run.world, run.engine, run.plan
    n = len(run.train_ds)
    bar = tqdm(total=run.total_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not (w.is_main and cfg.logging.progress_bar))
    engine.train()
    norm = GradNorm(engine)
    for step in range(start_step, run.total_steps):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        group_lr = group_lrs(engine.optimizer)  # per parameter group: layer-wise decay, unfreezing
        windows = D.window_indices(n, w.world_size, w.rank, cfg.seed, plan.micro_batch_size, plan.grad_accum, step)
        batches = [D.fetch(run.train_ds, idx, run.pad_id) for idx in windows]
        # Normalise by the targets (LM: target tokens; classification: labelled examples or tokens)
        # of the whole window on all ranks, so that accumulation N x micro b equals one batch of
        # N*b. DeepSpeed divides by accum and averages over ranks.
        n_target, n_input = all_reduce_sums([sum(run.task.n_targets(b) for b in batches),
                                              sum(int(b["attention_mask"].sum()) for b in batches)], w.device)
        scale = plan.grad_accum * w.world_size / n_target
        loss_sum = 0.0
        for batch in batches:
            loss = run.task.loss_sum(engine, batch, w.device)
            engine.backward(loss * scale)
            if batch is batches[-1]:  # the step's gradients are complete
                run.hooks.before_step(step)  # (AdaLoRA reads them)
                norm.before_step()
            engine.step()
            loss_sum += loss.item()
        run.hooks.after_step(step)
        loss = all_reduce_sum(loss_sum, w.device) / n_target
        dt = time.perf_counter() - t0
        done = step + 1

        grad_norm = norm.after_step()
        seq_len = max(b["input_ids"].shape[1] for b in batches)
        tokens_all = plan.global_batch_size * seq_len  # computed tokens, padding included
        metrics = {"train/loss": loss, "train/lr": lr,
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "train/tokens_per_s": n_input / dt, "train/samples_per_s": plan.global_batch_size / dt,
                   "train/step_time_s": dt, "train/epoch": step / max(1, D.steps_per_epoch(
                       n, w.world_size, plan.micro_batch_size, plan.grad_accum))}
        if run.peak_tflops:
            metrics["train/mfu"] = run.flops_per_token * tokens_all / dt / (run.peak_tflops * 1e12 * w.world_size)
        mem_tag, mem = memory_gb(w.device)
        metrics[mem_tag] = mem
        metrics.update(group_lr)
        verdict = None
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < run.total_steps and run.eval_ds is not None:
            metrics.update(evaluate_and_report(run, done))
            if run.best is not None:  # best-checkpoint selection / early stopping
                verdict = run.best.update(done, metrics)
                if verdict.improved:
                    run.save_best(done)
        run.monitor.log(done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if w.is_main and (done % cfg.logging.every_steps == 0 or done == run.total_steps or "eval/loss" in metrics):
            extra = f" eval_loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else ""
            bar.write(f"step {done}/{run.total_steps} loss {loss:.4f} lr {lr:.3g} grad_norm "
                      f"{metrics['train/grad_norm'] or 0:.3f} tok/s {metrics['train/tokens_per_s']:.0f}{extra}")

        saved = cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < run.total_steps
        if saved:
            run.save(done)
        if verdict is not None and verdict.stop:
            bar.close()
            if w.is_main:
                print(f"early stopping at step {done}: {run.best.metric} has not improved by more than "
                      f"{run.best.min_delta} in {run.best.patience} evaluations; {run.best.summary()}", flush=True)
            return "early_stopped"
        if done < run.total_steps and run.should_stop():
            if not saved:
                run.save(done)
            bar.close()
            if w.is_main:
                print(f"stop requested: checkpointed at step {done}; rerun with the same run_dir to resume", flush=True)
            return "preempted"
    bar.close()
    return "done"
