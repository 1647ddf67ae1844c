"""What runs on every rank.

    deepspeed --num_gpus 2 trainer/main.py --config RUN.yaml [key=value ...]
    torchrun --nproc_per_node 2 trainer/main.py --config RUN.yaml
    python trainer/main.py --config RUN.yaml          (a world of one)
    srun python trainer/main.py --config RUN.yaml     (one task per GPU)

main() = load config -> init distributed -> data, model, optimizer -> deepspeed.initialize
-> resume -> train() -> final checkpoint and export.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `trainer` and `launcher` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.batch import fit_world, plan_batch  # noqa: E402
from launcher.checks import DONE_FILE, run_dir_problems  # noqa: E402
from launcher.config import ConfigError, RunConfig, load_config, to_yaml  # noqa: E402

EXIT_USER_ERROR = 2


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fine-tune a Hugging Face model under DeepSpeed.")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def check_device(cfg: RunConfig, is_cuda: bool) -> None:
    if cfg.precision.dtype == "fp16" and not is_cuda:
        raise ConfigError(["'precision.dtype' = 'fp16' is not supported on a CPU (DeepSpeed: 'Type fp16 is "
                           "not supported on your device'); use precision.dtype=fp32, or bf16 (slow on CPUs "
                           "without AMX/AVX512-BF16)"])


def prepare_data(cfg: RunConfig, tok, world):
    """Train and eval splits, tokenised once per node (local rank 0 first, the rest hit the cache),
    and the task (trainer/tasks.py; classification labels come from the config or the data)."""
    from trainer import data as D
    from trainer import tasks
    from trainer.dist import local_main_first

    if cfg.task.type != "causal_lm":
        return tasks.prepare_classification(cfg, tok, world)
    d = cfg.data
    fields = {"text": d.text_field, "prompt": d.prompt_field, "response": d.response_field,
              "messages": d.messages_field}
    needed = D.required_columns(d.format, d.text_field, d.prompt_field, d.response_field, d.messages_field)
    train_raw = D.load_rows(d.train)
    D.check_columns(train_raw, d.train, needed, d.format)
    eval_raw = None
    if d.eval is not None:
        eval_raw = D.load_rows(d.eval)
        D.check_columns(eval_raw, d.eval, needed, d.format)
    elif d.eval_fraction > 0:
        split = train_raw.train_test_split(test_size=d.eval_fraction, seed=cfg.seed)
        train_raw, eval_raw = split["train"], split["test"]
    encode = D.make_encoder(tok, d.format, fields, d.mask_prompt, d.max_length)
    with local_main_first(world):
        train = D.tokenize(train_raw, encode, d.packing, d.max_length, "train")
        evals = D.tokenize(eval_raw, encode, d.packing, d.max_length, "eval") if eval_raw is not None else None
    if world.is_main:
        for name, s in (("train", train), ("eval", evals)):
            if s is not None:
                print(f"data/{name}: {s.rows_in} rows, {s.truncated} longer than max_length={d.max_length} "
                      f"truncated, {s.dropped_no_target} dropped (no target tokens left), "
                      f"{len(s.dataset)} {'packed blocks' if d.packing else 'examples'}", flush=True)
    return train.dataset, (evals.dataset if evals is not None else None), tasks.CausalLM()


def total_steps_for(cfg: RunConfig, n_train: int, plan) -> int:
    from trainer.data import DataError, steps_per_epoch

    spe = steps_per_epoch(n_train, plan.world_size, plan.micro_batch_size, plan.grad_accum)
    if spe == 0:
        raise DataError(f"the train split has {n_train} examples but one optimizer step needs "
                        f"{plan.global_batch_size} (micro x accum x world); add data or lower train.micro_batch_size")
    return cfg.train.max_steps or max(1, int(cfg.train.epochs * spe))


def run(cfg: RunConfig, world) -> dict:
    """One training run on an initialised world. Re-entrant: tests run several per launch."""
    import deepspeed
    from transformers import set_seed

    from launcher.ds_config import build_ds_config
    from trainer import checkpoint
    from trainer.early_stop import EarlyStopping
    from trainer.loop import Run, train
    from trainer.methods import apply_method, check_method_device, load_kwargs
    from trainer.model import build_model, count_params, load_tokenizer
    from trainer.monitor import Monitor, flops_per_token, peak_tflops
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.stop import Stopper

    run_dir = Path(cfg.run_dir)
    check_device(cfg, world.is_cuda)
    check_method_device(cfg, world.is_cuda)
    if (run_dir / DONE_FILE).exists():
        if world.is_main:
            print(f"run already finished ({run_dir / DONE_FILE}); nothing to do. Use a new run_dir to train again.")
        return {"status": "already_done"}
    problems = run_dir_problems(cfg, allow_done=True)
    if problems:
        raise ConfigError(problems)
    t = cfg.train
    plan, note = fit_world(plan_batch(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.world_size),
                           world.world_size, cfg.dist.on_world_mismatch)
    ds_config = build_ds_config(cfg, plan)

    set_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    train_ds, eval_ds, task = prepare_data(cfg, tok, world)
    total_steps = total_steps_for(cfg, len(train_ds), plan)
    set_seed(cfg.seed)  # same initial weights whatever the data preparation consumed
    model, _zero3_handle = build_model(cfg.model, ds_config, cfg.precision.dtype, task, load_kwargs(cfg, world.device))
    model, method = apply_method(model, cfg, total_steps)  # what trains: an adapter, some blocks, all
    n_params, n_trainable = count_params(model)
    optimizer = build_optimizer(model, t, offload=cfg.zero.offload_optimizer, groups=method.groups)
    scheduler = build_scheduler(optimizer, t, total_steps, cfg.method.unfreeze_every_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    # Everything is checked; now the run dir is written.
    write_run_files(cfg, world, ds_config, [
        f"world {world.world_size} ranks; global batch {plan.global_batch_size} = micro {plan.micro_batch_size} "
        f"x accum {plan.grad_accum} x world {plan.world_size}; {total_steps} steps; params {n_params:,} "
        f"({n_trainable:,} trainable)", method.summary(), *method.notes] + ([f"NOTE: {note}"] if note else []))

    ckpt_dir = run_dir / "checkpoints"
    state = checkpoint.resume(engine, ckpt_dir, world.rank) if cfg.checkpoint.resume else None
    start_step = int(state["step"]) if state else 0
    if state and world.is_main:
        print(f"resumed from {ckpt_dir / state['tag']} at step {start_step}", flush=True)
    es = cfg.task.early_stopping
    best = EarlyStopping.from_config(es, (state or {}).get("early_stopping")) if es is not None else None
    monitor = Monitor(run_dir, world.is_main, cfg.logging.tensorboard)
    monitor.log(start_step, {"model/trainable_params": method.n_trainable, "model/trainable_fraction": method.fraction})
    stopper = Stopper(run_dir)

    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, step, {"step": step, "plan": [plan.micro_batch_size, plan.grad_accum,
                        plan.world_size], "early_stopping": best.state() if best else None},
                        cfg.checkpoint.keep_last, world.rank)

    def save_best(step: int) -> None:  # the best evaluation so far, in its own folder until beaten
        checkpoint.save(engine, ckpt_dir / "best", step, {"step": step}, 1, world.rank)

    mcfg = engine.module.config
    loop = Run(cfg=cfg, world=world, plan=plan, engine=engine, train_ds=train_ds, eval_ds=eval_ds,
               pad_id=tok.pad_token_id, total_steps=total_steps, monitor=monitor,
               flops_per_token=flops_per_token(n_params, n_trainable, getattr(mcfg, "num_hidden_layers", 0),
                                               getattr(mcfg, "hidden_size", 0), cfg.data.max_length),
               peak_tflops=peak_tflops(cfg.logging.peak_tflops),
               save=save, should_stop=lambda: stopper.requested(world.device),
               task=task, best=best, save_best=save_best, hooks=method.hooks)
    status = train(loop, start_step)
    result = finish(loop, status, tok, method.is_peft)
    monitor.close()
    engine.destroy()
    return result


def write_run_files(cfg: RunConfig, world, ds_config: dict, lines: list[str]) -> None:
    """Rank 0 writes config.yaml (once), the DeepSpeed config this world uses, world.json; prints the plan."""
    import torch.distributed as dist

    from launcher.plan import GENERATED_KEY
    from trainer.dist import world_info
    from trainer.stop import STOP_FILE

    infos = [None] * world.world_size
    dist.all_gather_object(infos, world_info(world))
    run_dir = Path(cfg.run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        used = {GENERATED_KEY: "trainer/main.py at start: the DeepSpeed config of the world this run woke up in",
                **ds_config}
        (run_dir / "ds_config.json").write_text(json.dumps(used, indent=2) + "\n")
        (run_dir / "world.json").write_text(json.dumps(infos, indent=2) + "\n")
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        nodes = len({i["node_rank"] for i in infos})
        print(f"resolved config ({run_dir / 'config.yaml'}):\n{to_yaml(cfg)}", flush=True)
        print("\n".join([lines[0].replace(" ranks;", f" ranks on {nodes} node(s);", 1), *lines[1:]]), flush=True)
    dist.barrier()


def finish(loop, status: str, tok, is_peft: bool) -> dict:
    """After the loop: final evaluation, the best checkpoint back in the engine when early stopping
    chose one, the last checkpoint, the export, DONE and the summary."""
    from trainer import checkpoint, tasks
    from trainer.adapters import export_peft
    from trainer.loop import evaluate
    from trainer.monitor import plot_loss_curve

    cfg, world, engine, best = loop.cfg, loop.world, loop.engine, loop.best
    run_dir, total_steps = Path(cfg.run_dir), loop.total_steps
    ckpt_dir = run_dir / "checkpoints"
    last_step = best.stopped_step if status == "early_stopped" else total_steps
    status = "done" if status == "early_stopped" else status
    result = {"status": status, "total_steps": total_steps, "last_step": last_step}
    if status != "done":
        return result
    if loop.eval_ds is not None and last_step == total_steps:
        ev = evaluate(loop, last_step)
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
            if checkpoint.resume(engine, ckpt_dir / "best", world.rank) is None:
                raise RuntimeError(f"the best checkpoint (step {best.best_step}) is missing from "
                                   f"{ckpt_dir / 'best'}; it cannot be exported")
            result.update(evaluate(loop, best.best_step))
        result.update(best_step=best.best_step, best_metric=best.metric, best_value=best.best_value)
    report = tasks.publish_report(run_dir, result.get("best_step", last_step)) if world.is_main else None
    if cfg.checkpoint.export and is_peft:
        export_peft(engine, tok, cfg, run_dir)  # run_dir/adapter, + run_dir/export merged on request
    elif cfg.checkpoint.export:
        checkpoint.export_hf(engine, tok, run_dir / "export", cfg.zero.stage)
    if world.is_main:
        png = plot_loss_curve(run_dir)
        (run_dir / DONE_FILE).write_text(json.dumps(result) + "\n")
        print(summary(cfg, result, report, png, best), flush=True)
    return result


def summary(cfg: RunConfig, result: dict, report, png, best) -> str:
    from trainer import checkpoint

    run_dir = Path(cfg.run_dir)
    last_step, total_steps = result["last_step"], result["total_steps"]
    lines = []
    if report is not None:
        lines += [f"\nclassification report, step {result.get('best_step', last_step)}"
                  f"{' (the best evaluation)' if best is not None else ''}:\n{report.read_text()}"]
    lines += [f"\nfinished {last_step} steps in {run_dir}"
              + (f" (early stopping: planned {total_steps})" if last_step != total_steps else "")]
    if best is not None:
        lines += [f"  {best.summary()}{' -> exported' if cfg.checkpoint.export else ''}"]
    if report is not None:
        lines += [f"  classification report: {report} (confusion matrix beside it)"]
    lines += [f"  TensorBoard:  tensorboard --logdir {run_dir / 'tb'}",
              f"  loss curve:   {png}",
              f"  checkpoints:  {run_dir / 'checkpoints'} (latest: {checkpoint.latest_tag(run_dir / 'checkpoints')})"]
    if (run_dir / "adapter").exists():
        lines += [f"  adapter (PeftModel.from_pretrained): {run_dir / 'adapter'}"]
    if (run_dir / "export").exists():
        lines += [f"  exported model (from_pretrained): {run_dir / 'export'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from trainer.data import DataError
    from trainer.model import ModelError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # before any process group exists: every rank says it once
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    from trainer.dist import init_distributed

    world = init_distributed(args.local_rank)
    try:
        result = run(cfg, world)
    except (ConfigError, DataError, ModelError) as e:
        if world.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if result["status"] in ("done", "already_done", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
