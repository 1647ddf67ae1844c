"""After the loop: the final evaluation, the best checkpoint back in the engine when early stopping
chose one, the last checkpoint, the export, DONE and the summary printed on rank 0."""
from __future__ import annotations

import json

from launcher.config import RunConfig
from launcher.rundir import RunDir
from trainer import checkpoint
from trainer.adapters import export_peft
from trainer.loop import Run, evaluate_and_report
from trainer.monitor import plot_loss_curve
from trainer.tasks import publish_report


def finish(loop: Run, status: str, tok, is_peft: bool) -> dict:
    """After the loop: final evaluation, the best checkpoint back in the engine when early stopping
    chose one, the last checkpoint, the export, DONE and the summary."""
    cfg, world, engine, best = loop.cfg, loop.world, loop.engine, loop.best
    run_dir, total_steps = RunDir(cfg.run_dir), loop.total_steps
    ckpt_dir = run_dir.checkpoints
    last_step = best.stopped_step if status == "early_stopped" else total_steps
    status = "done" if status == "early_stopped" else status
    result = {"status": status, "total_steps": total_steps, "last_step": last_step}
    if status != "done":
        return result
    if loop.eval_ds is not None and last_step == total_steps:
        ev = evaluate_and_report(loop, last_step)
        loop.monitor.log(last_step, ev)
        result.update(ev)
        if best is not None and best.update(last_step, ev).improved:
            loop.save_best(last_step)
        if world.is_main:
            print(f"final eval: {loop.task.describe(ev)}", flush=True)
    if checkpoint.latest_tag(ckpt_dir) != checkpoint.tag_for(last_step):
        loop.save(last_step)
    if best is not None and best.best_step is not None:
        if best.best_step != last_step:  # the export gets the best evaluation's weights
            if checkpoint.resume(engine, run_dir.best, world.rank) is None:
                raise RuntimeError(f"the best checkpoint (step {best.best_step}) is missing from "
                                   f"{run_dir.best}; it cannot be exported")
            result.update(evaluate_and_report(loop, best.best_step))
        result.update(best_step=best.best_step, best_metric=best.metric, best_value=best.best_value)
    report = publish_report(run_dir.root, result.get("best_step", last_step)) if world.is_main else None
    if cfg.checkpoint.export and is_peft:
        export_peft(engine, tok, cfg, run_dir.root)  # run_dir/adapter, + run_dir/export merged on request
    elif cfg.checkpoint.export:
        checkpoint.export_hf(engine, tok, run_dir.export, cfg.zero.stage)
    if world.is_main:
        png = plot_loss_curve(run_dir.root)
        run_dir.done.write_text(json.dumps(result) + "\n")
        print(summary(cfg, result, report, png, best), flush=True)
    return result


def summary(cfg: RunConfig, result: dict, report, png, best) -> str:
    run_dir = RunDir(cfg.run_dir)
    last_step, total_steps = result["last_step"], result["total_steps"]
    lines = []
    if report is not None:
        lines += [f"\nclassification report, step {result.get('best_step', last_step)}"
                  f"{' (the best evaluation)' if best is not None else ''}:\n{report.read_text()}"]
    lines += [f"\nfinished {last_step} steps in {run_dir.root}"
              + (f" (early stopping: planned {total_steps})" if last_step != total_steps else "")]
    if best is not None:
        lines += [f"  {best.summary()}{' -> exported' if cfg.checkpoint.export else ''}"]
    if report is not None:
        lines += [f"  classification report: {report} (confusion matrix beside it)"]
    lines += [f"  TensorBoard:  tensorboard --logdir {run_dir.tensorboard}",
              f"  loss curve:   {png}",
              f"  checkpoints:  {run_dir.checkpoints} (latest: {checkpoint.latest_tag(run_dir.checkpoints)})"]
    if run_dir.adapter.exists():
        lines += [f"  adapter (PeftModel.from_pretrained): {run_dir.adapter}"]
    if run_dir.export.exists():
        lines += [f"  exported model (from_pretrained): {run_dir.export}"]
    return "\n".join(lines) + "\n"
