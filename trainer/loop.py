"""The training loop and evaluation. Read top to bottom: one optimizer step per iteration."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.batch import BatchPlan
from launcher.config import RunConfig
from launcher.rundir import RunDir
from trainer import data as D
from trainer.checkpoint import tag_for
from trainer.dist import World, reduce_and_read
from trainer.faults import NonFinite, Watchdog
from trainer.methods import StepHooks
from trainer.monitor import FlopModel, Monitor, memory_gb
from trainer.optim import GradNorm, group_lrs
from trainer.tasks import Report, Task


@dataclass
class Run:
    """Everything the loop needs, built by main()."""
    cfg: RunConfig
    world: World
    plan: BatchPlan
    engine: Any
    train_ds: D.Rows
    eval_ds: Optional[D.Rows]
    pad_id: int
    total_steps: int
    monitor: Monitor
    flops: FlopModel
    peak_tflops: Optional[float]
    save: Callable[[int], None]  # checkpoint at a step
    should_stop: Callable[[], bool]  # this rank's stop request (no collective: the loop fuses the poll)
    task: Task  # trainer/tasks.py: loss and metrics of the task (causal LM, sequence / token classification)
    nonfinite: NonFinite  # trainer/faults.py: the non-finite-step policy and its count (kept in checkpoints)
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
    loss_sum, tokens = 0.0, 0
    outputs: list = []
    with torch.no_grad():
        for idx in batches:
            batch = D.fetch(run.eval_ds, idx, run.pad_id)
            loss, out = task.eval_step(engine, batch, idx, w.device)
            loss_sum = loss_sum + loss.detach()
            tokens += task.n_targets(batch)
            outputs += out
    engine.train()
    (loss_sum, tokens), _ = reduce_and_read([loss_sum, tokens], [], w.device)
    loss = loss_sum / max(1.0, tokens)
    return task.eval_metrics(loss, outputs)


def evaluate_and_report(run: Run, step: int) -> dict[str, float]:
    """evaluate(); rank 0 writes the report (and confusion matrix) to RUN_DIR/eval/stepNNNNNNNN/."""
    metrics, report = evaluate(run)
    if report is not None:
        if run.world.is_main:
            run_dir = Path(run.cfg.run_dir)
            report.write(RunDir(run_dir).eval_report(step), f"{run_dir.name} step {step}")
        import torch.distributed as dist

        dist.barrier()  # the others wait here, not in the next step's collective (timed by dist.step_timeout_s)
    return metrics


def train(run: Run, start_step: int) -> str:
    """Optimizer steps start_step..total_steps-1. Returns "done", "early_stopped", "preempted" or
    "nonfinite" (train.max_nonfinite_steps non-finite steps in a row: trainer/faults.py)."""
    from tqdm import tqdm

    cfg, w, engine, plan, rows = run.cfg, run.world, run.engine, run.plan, run.train_ds
    order = D.Order(len(rows), w.world_size, plan.micro_batch_size, plan.grad_accum, cfg.seed,
                    rows.lengths if cfg.data.group_by_length else None)
    def batches_of(s: int) -> list[dict]:  # in pinned memory on a GPU: copies to it need not wait for it
        out = [D.fetch(rows, idx, run.pad_id) for idx in order.windows(s)[w.rank]]
        return [{k: v.pin_memory() for k, v in b.items()} for b in out] if w.is_cuda else out

    # On a GPU the host waits for the device: the next step's batches are assembled meanwhile. On a CPU
    # the compute already has every core; a second thread would only take turns with it.
    prefetch = D.Prefetch(batches_of, background=w.is_cuda)
    bar = tqdm(total=run.total_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not (w.is_main and cfg.logging.progress_bar))
    engine.train()
    norm = GradNorm(engine)
    nonfinite = run.nonfinite
    watchdog = Watchdog(cfg.dist.step_timeout_s, w.rank)  # dist.step_timeout_s: a hung step ends the process
    try:
        for step in range(start_step, run.total_steps):
            watchdog.arm(step + 1)
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]
            group_lr = group_lrs(engine.optimizer)  # per parameter group: layer-wise decay, unfreezing
            batches = prefetch.get(step, step + 1 if step + 1 < run.total_steps else None)
            # Normalise by the targets (LM: target tokens; classification: labelled examples or tokens)
            # of the whole window on all ranks, so that accumulation N x micro b equals one batch of N*b.
            # Every rank knows every row's counts and the order, so this needs no collective. DeepSpeed
            # divides by accum and averages over ranks.
            shapes = rows.shapes(order.windows(step))
            n_target, n_input = sum(s[2] for s in shapes), sum(s[0] for s in shapes)
            scale = plan.grad_accum * w.world_size / n_target
            loss_sum = 0.0  # on the device: no host sync per micro-batch
            for batch in batches:
                loss = run.task.loss_sum(engine, batch, w.device)
                engine.backward(loss * scale)
                last = batch is batches[-1]  # the step's gradients are complete
                if last:
                    run.hooks.before_step(step)  # (AdaLoRA reads them)
                    norm.before_step()
                with nonfinite.guard(norm) if last else contextlib.nullcontext():  # a NaN/Inf norm: no update
                    engine.step()
                loss_sum = loss_sum + loss.detach()
            run.hooks.after_step(step)
            # The step's one collective and one host sync: the loss for the log and the stop poll
            # (every rank checkpoints and stops at the same step when any rank was asked to).
            (loss_sum, stops), (grad_norm,) = reduce_and_read([loss_sum, float(run.should_stop())],
                                                              [norm.after_step()], w.device)
            watchdog.disarm()
            loss = loss_sum / n_target
            dt = time.perf_counter() - t0
            done = step + 1
            skipped = nonfinite.count(done, loss, engine.was_step_applied())  # DeepSpeed (or the guard) skipped it

            computed = plan.micro_batch_size * sum(s[1] for s in shapes)  # padded tokens the model ran
            metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/tokens_per_s": n_input / dt, "train/samples_per_s": plan.global_batch_size / dt,
                       "train/step_time_s": dt, "train/padding_fraction": 1 - n_input / computed,
                       "train/epoch": step / max(1, order.steps_per_epoch), "train/nonfinite_steps": nonfinite.total}
            if run.peak_tflops:
                metrics["train/mfu"] = run.flops.step((s[0], s[1]) for s in shapes) / dt / (
                    run.peak_tflops * 1e12 * w.world_size)
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
            if w.is_main and skipped:
                bar.write(nonfinite.skipped_note(done, loss, grad_norm))
            if w.is_main and (done % cfg.logging.every_steps == 0 or done == run.total_steps or "eval/loss" in metrics):
                extra = f" eval_loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else ""
                bar.write(f"step {done}/{run.total_steps} loss {loss:.4f} lr {lr:.3g} grad_norm "
                          f"{grad_norm or 0:.3f} tok/s {metrics['train/tokens_per_s']:.0f}{extra}")

            saved = cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < run.total_steps
            if saved:
                run.save(done)
            if verdict is not None and verdict.stop:
                if w.is_main:
                    print(f"early stopping at step {done}: {run.best.metric} has not improved by more than "
                          f"{run.best.min_delta} in {run.best.patience} evaluations; {run.best.summary()}", flush=True)
                return "early_stopped"
            if nonfinite.stop or (done < run.total_steps and stops > 0):
                if not saved:
                    run.save(done)
                if w.is_main and nonfinite.stop:
                    print(nonfinite.stop_message(done, RunDir(cfg.run_dir).checkpoints / tag_for(done)), flush=True)
                elif w.is_main:
                    print(f"stop requested: checkpointed at step {done}; rerun with the same run_dir to resume",
                          flush=True)
                return "nonfinite" if nonfinite.stop else "preempted"
        return "done"
    finally:
        watchdog.close()
        bar.close()
        prefetch.close()
