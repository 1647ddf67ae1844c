"""The one typed run config: the schema, and nothing else.

Nested pydantic sections grouped by concern (model, data, train, precision, zero, dist,
checkpoint, logging, slurm, method, task). Every rule that involves more than one field lives in
launcher/rules.py (the model's in launcher/rules_model.py, the Slurm section's in
launcher/rules_slurm.py), the disk rules in launcher/rules_disk.py, and the one loader (YAML +
``key=value`` overrides -> a validated ``RunConfig``) in launcher/load.py. Importable without
torch: the launcher and the trainer share it.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from launcher import yamlio
from launcher.errors import ConfigError  # noqa: F401  (re-exported: the error every check raises)
from launcher.strict import PathStr, SlurmMinutes, StrictSection


class _Section(StrictSection):
    """Unknown keys are errors; every field is type-checked strictly (launcher/strict.py)."""


class ModelConfig(_Section):
    # Local Hugging Face folder (from_pretrained) ...
    name_or_path: Optional[PathStr] = None
    # ... or a transformers config dict to build a from-scratch model (e.g. a tiny Llama).
    config: Optional[dict[str, Any]] = None
    # Tokenizer folder; defaults to name_or_path.
    tokenizer: Optional[PathStr] = None
    gradient_checkpointing: bool = False
    # Attention kernel: sdpa (PyTorch's), flash_attention_2 (needs the flash-attn package and a GPU), eager.
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    # Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); CUDA only, supported architectures.
    liger: bool = False


class DataConfig(_Section):
    train: PathStr
    eval: Optional[PathStr] = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["text", "prompt_response", "chat"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    max_length: int = Field(512, gt=1)
    mask_prompt: bool = True
    # Pack documents into rows of max_length (best-fit decreasing over the whole split); no token
    # attends across documents and position ids restart at each one.
    packing: bool = False
    # Without packing: micro-batches of similar lengths (less padding), still a function of (seed, epoch, step).
    group_by_length: bool = False


class TrainConfig(_Section):
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    # When set, the invariant: accumulation is derived from it and the world size.
    global_batch_size: Optional[int] = Field(None, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    epochs: Optional[float] = Field(None, gt=0)
    lr: float = Field(1e-4, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    # adamw: torch AdamW (DeepSpeed CPU Adam under optimizer offload); deepspeed_adamw: FusedAdam /
    # DeepSpeedCPUAdam; the rest are bitsandbytes 8-bit optimizers (see docs/methods.md).
    optimizer: Literal["adamw", "deepspeed_adamw", "adamw8bit", "adam8bit", "paged_adamw8bit", "lion8bit"] = "adamw"
    # Opt-in: a bitsandbytes optimizer with zero.offload_optimizer (its step then runs on the CPU; slow).
    allow_bnb_offload: bool = False
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    eval_max_batches: int = Field(0, ge=0)  # 0 = whole eval split
    # Causal LM loss: logits computed this many target tokens at a time from the final hidden states
    # and recomputed in backward (the full batch x seq x vocab logits never exist); 0 = plain loss.
    loss_chunk_tokens: int = Field(1024, ge=0)
    # A step whose loss or gradient norm is NaN/Inf never updates the model (its update is skipped and
    # counted: train/nonfinite_steps). skip: go on; stop: after max_nonfinite_steps of them in a row,
    # checkpoint (the weights of the last good step) and exit 3 (README "What it survives").
    on_nonfinite: Literal["skip", "stop"] = "stop"
    max_nonfinite_steps: int = Field(3, gt=0)


class PrecisionConfig(_Section):
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


class ZeroConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    # ZeRO-3: params below this many elements stay gathered. Tiny test models need 0.
    param_persistence_threshold: int = Field(100_000, ge=0)
    overlap_comm: bool = False
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    # A user DeepSpeed JSON merged under ours; contradicting an owned key is an error.
    base_config: Optional[PathStr] = None


class DistConfig(_Section):
    nodes: int = Field(1, gt=0)
    procs_per_node: int = Field(1, gt=0)  # GPUs per node (or CPU ranks per node)
    # What the trainer does when the world it wakes up in differs from nodes*procs_per_node.
    on_world_mismatch: Literal["adapt", "error"] = "adapt"
    # In-job restarts: after a rank fails (crash, OOM kill, a lost node; not a config or data error,
    # exit 2) the batch script starts every rank again from `latest`, up to this many times per job.
    max_restarts: int = Field(0, ge=0)
    # The NCCL environment block of the batch script (each variable explained there; slurm.env_setup
    # and the submitting shell's environment override any of them). auto = set nothing.
    network: Literal["auto", "infiniband", "ethernet", "efa"] = "auto"
    # Process-group timeout: a collective that waits longer fails instead of hanging (DeepSpeed's default 30).
    timeout_min: float = Field(30.0, gt=0)
    # NCCL flight recorder: every rank keeps its last collectives in memory and dumps them to
    # RUN_DIR/flight_recorder/ on a timeout (analyse with `torchfrtrace RUN_DIR/flight_recorder`).
    flight_recorder: bool = False
    # Step watchdog: a training step that has not finished after this many seconds (a hung collective,
    # a stuck rank) ends the process with a message naming the step and the rank (exit 4); 0 = off.
    step_timeout_s: float = Field(0.0, ge=0, le=30 * 24 * 3600)  # at most 30 days


# Keys that say how a job runs and copes, not what it trains: a resubmission of a run may change them
# (like slurm.*), e.g. to turn the flight recorder on for a hang, or to skip non-finite steps after a stop.
RESUBMIT_FREE_KEYS = ("dist.max_restarts", "dist.network", "dist.timeout_min", "dist.flight_recorder",
                      "dist.step_timeout_s", "train.on_nonfinite", "train.max_nonfinite_steps")


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0)  # 0 = only at the end
    keep_last: int = Field(2, gt=0)
    resume: bool = True
    export: bool = True


class LoggingConfig(_Section):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    # Peak dense TFLOP/s per device for MFU; None = look the GPU up in a table.
    peak_tflops: Optional[float] = Field(None, gt=0)
    progress_bar: bool = True


class ContainerConfig(_Section):
    """pyxis/enroot containers (srun --container-*). The run dir, data and model must be mounted at
    the same paths inside as outside (the batch shell, outside, reads RUN_DIR too)."""
    image: str  # e.g. nvcr.io#nvidia/pytorch:24.05-py3, or a squashfs file
    mounts: list[str] = []  # "SRC:DST[:FLAGS]", absolute paths, e.g. /scratch:/scratch
    workdir: Optional[str] = None  # None = the submit directory (where relative config paths resolve)


class SlurmConfig(_Section):
    job_name: str = "finetune"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # Minutes, or a Slurm time string as for sbatch --time ("1-12:00:00", "90:00"; seconds round up).
    time_min: SlurmMinutes = Field(60, gt=0)
    cpus_per_task: int = Field(8, gt=0)
    mem_gb: Optional[int] = Field(None, gt=0)
    # Memory of one GPU (GiB): when set, `validate` runs the memory planner and refuses a layout
    # that does not fit (launcher/planner.py).
    gpu_mem_gb: Optional[float] = Field(None, gt=0)
    # GPUs requested per node; None = dist.procs_per_node, 0 = CPU-only (no --gpus-per-node line).
    gpus_per_node: Optional[int] = Field(None, ge=0)
    # Preemption: Slurm sends this signal signal_lead_s before the time limit; the job
    # checkpoints at the next optimizer step and requeues itself up to max_requeues times.
    signal: Literal["USR1", "USR2"] = "USR2"
    signal_lead_s: int = Field(120, gt=0, le=65535)  # sbatch --signal: 0..65535 s
    max_requeues: int = Field(3, ge=0)
    # Shell lines run before launch: module loads, venv/conda activation, NCCL variables.
    env_setup: list[str] = []
    # Python on the compute nodes; None = the interpreter running `python -m launcher` (python3 in a container).
    python: Optional[PathStr] = None
    exclusive: bool = False  # whole nodes (#SBATCH --exclusive)
    # sbatch options the schema does not model, as "--flag=value" or "--flag" (e.g. --reservation=x).
    extra_sbatch: list[str] = []
    container: Optional[ContainerConfig] = None


# --------------------------------------------------------------------------- method

PEFT_METHODS = ("lora", "qlora", "adalora", "ia3", "prefix", "prompt")
BNB_OPTIMIZERS = ("adamw8bit", "adam8bit", "paged_adamw8bit", "lion8bit")


class LoraSettings(_Section):
    r: int = Field(8, gt=0)  # rank (AdaLoRA: the starting rank of every matrix)
    alpha: float = Field(16.0, gt=0)  # scaling = alpha / r (rsLoRA: alpha / sqrt(r))
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" = every linear layer except the output head, or a list of module names.
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False


class AdaLoraSettings(_Section):
    target_r: int = Field(4, gt=0)  # average rank per matrix left at the end (budget)
    # Steps (as fractions of the run) before the budget starts to shrink, and at the end with
    # the final budget fixed; the rank allocation runs every `every_steps` steps in between.
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    final_fraction: float = Field(0.2, ge=0, lt=1)
    every_steps: int = Field(1, gt=0)


class FreezeSettings(_Section):
    """Partial fine-tuning of the full model (method.name=full); choose at most one."""
    train_last_k_blocks: Optional[int] = Field(None, gt=0)  # top k transformer blocks + head
    trainable_patterns: list[str] = []  # regexes (re.search) on parameter names
    head_only: bool = False  # params after the last block: final norm, lm_head / classifier
    freeze_embeddings: bool = False  # everything except the params before the first block


class MethodConfig(_Section):
    name: Literal["full", "lora", "qlora", "adalora", "ia3", "prefix", "prompt"] = "full"
    lora: LoraSettings = LoraSettings()
    adalora: AdaLoraSettings = AdaLoraSettings()
    # peft methods: modules trained in full and saved with the adapter (e.g. a new head).
    modules_to_save: list[str] = []
    num_virtual_tokens: int = Field(20, gt=0)  # prefix / prompt tuning
    # Export base + adapter merged into a plain Hugging Face model (run_dir/export), besides
    # the adapter (run_dir/adapter).
    merge_adapter: bool = False
    freeze: FreezeSettings = FreezeSettings()
    # Gradual unfreezing (full): one more block group (head, top block, ..., embeddings)
    # trains every N optimizer steps, top down; 0 = off.
    unfreeze_every_steps: int = Field(0, ge=0)
    # Layer-wise LR decay (full): lr x decay^(depth from the top); 1 = off.
    layer_lr_decay: float = Field(1.0, gt=0, le=1)


# --------------------------------------------------------------------------- task

# Metrics each task logs (as eval/<name>); early_stopping.metric must be one of them, or a
# per-label one: eval/f1/<label> (also precision/, recall/) and, for NER, eval/entity_f1/<TYPE>.
_AVERAGED = [f"{m}_{a}" for a in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1")]
TASK_METRICS: dict[str, list[str]] = {
    "causal_lm": ["eval/loss", "eval/ppl"],
    "sequence_classification": ["eval/loss", "eval/accuracy", *(f"eval/{m}" for m in _AVERAGED)],
    "token_classification": ["eval/loss", "eval/accuracy", *(f"eval/{m}" for m in _AVERAGED),
                             *(f"eval/entity_{m}" for m in _AVERAGED)],
}
PER_LABEL_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": (),
    "sequence_classification": ("eval/precision/", "eval/recall/", "eval/f1/"),
    "token_classification": ("eval/precision/", "eval/recall/", "eval/f1/", "eval/entity_precision/",
                             "eval/entity_recall/", "eval/entity_f1/"),
}


class EarlyStoppingConfig(_Section):
    # The metric that picks the best checkpoint (the export is that step's weights) and that
    # early stopping watches, as logged: eval/loss, eval/accuracy, eval/f1_macro, ...
    metric: str = "eval/loss"
    # max or min; null = min for eval/loss and eval/ppl, max for everything else.
    mode: Optional[Literal["max", "min"]] = None
    # Stop after this many evaluations in a row without improvement; null = never stop early
    # (the best checkpoint is still selected).
    patience: Optional[int] = Field(None, gt=0)
    # An improvement must beat the best value so far by more than this.
    min_delta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _default_mode(self):
        if self.mode is None:
            self.mode = "min" if self.metric in ("eval/loss", "eval/ppl") else "max"
        return self


class TaskConfig(_Section):
    type: Literal["causal_lm", "sequence_classification", "token_classification"] = "causal_lm"
    # sequence_classification: the text is data.text_field; a second text of a pair (premise /
    # hypothesis, question / passage) is text_pair_field; the class is label_field.
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    # token_classification: a list of words and one tag per word, as in CoNLL-2003.
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    # Label names in id order; null = read from the train split (sorted; "O" first for tags).
    # Integer labels in the data index this list.
    labels: Optional[list[str]] = None
    # Loss weight per label: "auto" = inverse frequency in the train split (n / (k * n_label)),
    # a list in the order of `labels`, or null = unweighted.
    class_weights: Optional[Union[Literal["auto"], list[float]]] = None
    early_stopping: Optional[EarlyStoppingConfig] = None

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_shape(cls, v):
        ok = v is None or v == "auto" or (isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v))
        if not ok:
            raise ValueError("must be 'auto', a list of non-negative numbers (one per label, in the order "
                             "of task.labels), or null")
        return v


class RunConfig(_Section):
    run_dir: PathStr
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seed range
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    precision: PrecisionConfig = PrecisionConfig()
    zero: ZeroConfig = ZeroConfig()
    dist: DistConfig = DistConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    slurm: SlurmConfig = SlurmConfig()
    method: MethodConfig = MethodConfig()
    task: TaskConfig = TaskConfig()

    @property
    def world_size(self) -> int:
        return self.dist.nodes * self.dist.procs_per_node


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data that launcher/rules.py `validate` reads back to the same config.
    With train.global_batch_size set, grad_accum is derived (rules.validate) and left out, so that it
    cannot go stale when the data is validated again with another world size."""
    data = cfg.model_dump(mode="json")
    if cfg.train.global_batch_size is not None:
        del data["train"]["grad_accum"]
    return data


def to_yaml(cfg: RunConfig) -> str:
    """to_dict as YAML (what RUN_DIR/config.yaml holds)."""
    return yamlio.dump(to_dict(cfg))
