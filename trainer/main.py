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
from launcher.config import ConfigError, RunConfig, to_yaml  # noqa: E402
from launcher.errors import EXIT_CHECKPOINT_WRITE, EXIT_USER_ERROR  # noqa: E402
from launcher.load import load_config  # noqa: E402
from launcher.rules_disk import disk_problems  # noqa: E402
from launcher.rundir import GENERATED_KEY, RunDir  # noqa: E402



def parse_args(argv):
    p = argparse.ArgumentParser(description="Fine-tune a Hugging Face model under DeepSpeed.")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def run(cfg: RunConfig, world) -> dict:
    """One training run on an initialised world. Re-entrant: tests run several per launch."""
    import deepspeed
    from transformers import set_seed

    from launcher.ds_config import LOAD_UNIVERSAL, build_ds_config
    from trainer import checkpoint
    from trainer.early_stop import EarlyStopping
    from trainer.faults import NonFinite
    from trainer.elastic import plan_resume
    from trainer.finish import finish
    from trainer.loop import Run, train
    from trainer.methods import apply_method, check_method_device, load_kwargs
    from trainer.data import total_steps_for
    from trainer.model import build_model, check_device, count_params, facts_lines, load_tokenizer, model_facts
    from trainer.monitor import Monitor, flop_model, peak_tflops
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.prepare import prepare
    from trainer.stop import Stopper

    run_dir = RunDir(cfg.run_dir)
    check_device(cfg, world.is_cuda)
    check_method_device(cfg, world.is_cuda)
    if run_dir.done.exists():
        if world.is_main:
            print(f"run already finished ({run_dir.done}); nothing to do. Use a new run_dir to train again.")
        return {"status": "already_done"}
    problems = disk_problems(cfg, allow_done=True)  # the launcher's checks: paths, this run's run dir
    if problems:
        raise ConfigError(problems)
    t = cfg.train
    plan, note = fit_world(plan_batch(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.world_size),
                           world.world_size, cfg.dist.on_world_mismatch)
    resume = plan_resume(cfg, world)  # another world: refused, or converted to DeepSpeed's universal form
    ds_config = build_ds_config(cfg, plan, also=(LOAD_UNIVERSAL,) if resume.universal else ())

    set_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    data = prepare(cfg, tok, world, plan)  # train / eval rows (packed or not), the task (trainer/tasks.py)
    total_steps = total_steps_for(cfg, len(data.train), plan)
    set_seed(cfg.seed)  # same initial weights whatever the data preparation consumed
    model, _zero3_handle = build_model(cfg.model, ds_config, cfg.precision.dtype, data.task,
                                       load_kwargs(cfg, world.device))
    model, method = apply_method(model, cfg, total_steps)  # what trains: an adapter, some blocks, all
    facts = dict(model_facts(model), loss=data.task.bind(model))  # attention, Liger; the loss fitted to the model
    n_params, n_trainable = count_params(model)
    optimizer = build_optimizer(model, t, offload=cfg.zero.offload_optimizer, groups=method.groups)
    scheduler = build_scheduler(optimizer, t, total_steps, cfg.method.unfreeze_every_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    # Everything is checked; now the run dir is written.
    write_run_files(cfg, world, ds_config, facts, [
        f"world {world.world_size} ranks; global batch {plan.global_batch_size} = micro {plan.micro_batch_size} "
        f"x accum {plan.grad_accum} x world {plan.world_size}; {total_steps} steps; params {n_params:,} "
        f"({n_trainable:,} trainable)", method.summary(), *method.notes, *facts_lines(facts),
        *[f"NOTE: {n}" for n in (note, resume.note) if n]])

    ckpt_dir = run_dir.checkpoints
    state = checkpoint.resume(engine, ckpt_dir, world.rank, cfg.seed, resume.tag) if resume.tag else None
    start_step = int(state["step"]) if state else 0
    if state and world.is_main:
        how = f" (written by {resume.written_world} ranks; its universal form)" if resume.universal else ""
        print(f"resumed from {ckpt_dir / state['tag']} at step {start_step}{how}", flush=True)
    es = cfg.task.early_stopping
    best = EarlyStopping.from_config(es, (state or {}).get("early_stopping")) if es is not None else None
    monitor = Monitor(run_dir.root, world.is_main, cfg.logging.tensorboard)
    monitor.log(start_step, {"model/trainable_params": method.n_trainable, "model/trainable_fraction": method.fraction,
                             "train/total_steps": total_steps, **data.stats})  # total: for `launcher status`
    stopper = Stopper(run_dir.stop)
    nonfinite = NonFinite(engine, t.on_nonfinite, t.max_nonfinite_steps, (state or {}).get("nonfinite_steps", 0),
                          start_step)  # steps with a NaN/Inf loss or gradient norm: never applied

    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, step, {"step": step, "plan": [plan.micro_batch_size, plan.grad_accum,
                        plan.world_size], "early_stopping": best.state() if best else None,
                        "nonfinite_steps": nonfinite.total}, cfg.checkpoint.keep_last, world.rank)

    def save_best(step: int) -> None:  # the best evaluation so far, in its own folder until beaten
        checkpoint.save(engine, run_dir.best, step, {"step": step}, 1, world.rank)

    loop = Run(cfg=cfg, world=world, plan=plan, engine=engine, train_ds=data.train, eval_ds=data.eval,
               pad_id=tok.pad_token_id, total_steps=total_steps, monitor=monitor,
               flops=flop_model(engine.module), peak_tflops=peak_tflops(cfg.logging.peak_tflops),
               save=save, should_stop=stopper.local,
               task=data.task, nonfinite=nonfinite, best=best, save_best=save_best, hooks=method.hooks)
    status = train(loop, start_step)
    result = finish(loop, status, tok, method.is_peft)
    monitor.close()
    engine.destroy()
    return result


def write_run_files(cfg: RunConfig, world, ds_config: dict, facts: dict, lines: list[str]) -> None:
    """Rank 0 writes config.yaml (once), the DeepSpeed config this world uses, world.json (each rank's
    world and ``facts``: attention kernel, loss, Liger pieces); prints the plan."""
    import torch.distributed as dist
    import yaml

    from trainer import start_over
    from trainer.dist import world_info
    from trainer.stop import clear_stale

    infos = [None] * world.world_size
    dist.all_gather_object(infos, {**world_info(world), **facts})
    run_dir = RunDir(cfg.run_dir)
    if world.is_main:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        saved = yaml.safe_load(run_dir.config.read_text()) if run_dir.config.exists() else {}
        if Path(saved.get("run_dir", "")).resolve() != run_dir.root.resolve():  # a new run, or a moved run dir
            run_dir.config.write_text(to_yaml(cfg))
        used = {GENERATED_KEY: "trainer/main.py at start: the DeepSpeed config of the world this run woke up in",
                **ds_config}
        run_dir.ds_config.write_text(json.dumps(used, indent=2) + "\n")
        run_dir.world.write_text(json.dumps(infos, indent=2) + "\n")
        if clear_stale(run_dir.stop):  # the preemption signal came while the ranks were starting
            lines = [*lines, "NOTE: a stop was requested while the ranks started: they checkpoint at the first step"]
        earlier = None if cfg.checkpoint.resume else start_over.set_aside(run_dir)  # never mixed with this attempt
        if earlier:
            lines = [*lines, f"NOTE: checkpoint.resume=false: this run starts over at step 0; the earlier attempt's "
                             f"outputs are kept, set aside in {earlier}"]
        nodes = len({i["node_rank"] for i in infos})
        print(f"resolved config ({run_dir.config}):\n{to_yaml(cfg)}", flush=True)
        print("\n".join([lines[0].replace(" ranks;", f" ranks on {nodes} node(s);", 1), *lines[1:]]), flush=True)
    dist.barrier()


def main(argv=None) -> int:
    from trainer.checkpoint import CheckpointWriteError
    from trainer.data import DataError
    from trainer.faults import exit_code
    from trainer.model import ModelError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:  # the launcher's loader; the disk checks run in run(), once the world is known
        cfg = load_config(args.config, args.overrides, disk=False)
    except ConfigError as e:  # before any process group exists: every rank says it once
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    from trainer.dist import check_software, init_distributed

    world = init_distributed(args.local_rank, cfg.dist.timeout_min)
    try:
        check_software(world)  # every node reports its host, GPUs, versions; mismatched versions: exit 2
        result = run(cfg, world)
    except (ConfigError, DataError, ModelError) as e:
        if world.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except CheckpointWriteError as e:  # disk full, read-only, ...: each rank that failed says so
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_WRITE
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return exit_code(result["status"])


if __name__ == "__main__":
    sys.exit(main())
