"""The ``method:`` section (how much of the model trains) and its cross-field rules.

Part of the one run config (launcher/config.py imports it); importable without torch. Every
combination either trains under the ZeRO stage the user chose or is refused here, before launch,
with the reason and what to use instead. Device rules (QLoRA needs CUDA) are checked by the
trainer at start, since the schema does not know the machine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from launcher.config import RunConfig

PEFT_METHODS = ("lora", "qlora", "adalora", "ia3", "prefix", "prompt")
LORA_FAMILY = ("lora", "qlora", "adalora")
BNB_OPTIMIZERS = ("adamw8bit", "adam8bit", "paged_adamw8bit", "lion8bit")
OPTIMIZERS = ("adamw", "deepspeed_adamw", *BNB_OPTIMIZERS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


def method_problems(cfg: "RunConfig") -> list[str]:
    """Refused method / optimizer / ZeRO combinations (part of cross_field_problems). Pure."""
    m, z, t, p = cfg.method, cfg.zero, cfg.train, []
    name = m.name
    is_peft = name in PEFT_METHODS
    if is_peft and cfg.model.name_or_path is None:
        p.append(f"'method.name' = {name!r} trains an adapter on a pretrained base, but 'model.name_or_path' is "
                 "not set (a from-scratch model.config has no saved base to reload the adapter onto); set "
                 "model.name_or_path to a local Hugging Face folder, or use method.name=full")
    if name == "qlora" and z.stage == 3:
        p.append("'method.name' = 'qlora' cannot run under zero.stage=3: 4-bit quantized weights cannot be "
                 "partitioned by ZeRO-3's initialisation; use zero.stage=2 (or 0/1), or method.name=lora")
    lo = m.lora
    if lo.use_dora and name not in ("lora", "qlora"):
        p.append(f"'method.lora.use_dora' = true applies to method.name lora or qlora, not {name!r}; remove it")
    if lo.use_rslora and name not in ("lora", "qlora"):
        p.append(f"'method.lora.use_rslora' = true applies to method.name lora or qlora, not {name!r}; remove it")
    if lo.use_dora and name in ("lora", "qlora") and z.stage == 3:
        p.append("'method.lora.use_dora' = true cannot run under zero.stage=3: DoRA reads the whole base weight "
                 "(its column norm) outside the layer's forward, where ZeRO-3 has it partitioned (measured: "
                 "'size of tensor a (0) must match'); use zero.stage=2, or method.lora.use_dora=false")
    if name == "adalora" and m.adalora.target_r > lo.r:
        p.append(f"'method.adalora.target_r' = {m.adalora.target_r} exceeds the starting rank 'method.lora.r' = "
                 f"{lo.r}; AdaLoRA only prunes ranks, so lower target_r or raise method.lora.r")
    if name == "adalora" and m.adalora.warmup_fraction + m.adalora.final_fraction >= 1:
        p.append(f"'method.adalora.warmup_fraction' ({m.adalora.warmup_fraction}) + 'method.adalora.final_fraction' "
                 f"({m.adalora.final_fraction}) must be below 1 to leave steps where the rank budget shrinks; "
                 "lower one of them")
    if m.modules_to_save and not is_peft:
        p.append(f"'method.modules_to_save' = {m.modules_to_save!r} applies to peft methods (an adapter saves "
                 "them); with method.name=full use method.freeze to choose what trains")
    if m.merge_adapter and not is_peft:
        p.append("'method.merge_adapter' = true applies to peft methods; method.name=full already exports "
                 "the whole model (checkpoint.export)")
    if m.merge_adapter and name in ("prefix", "prompt"):
        p.append(f"'method.merge_adapter' = true cannot work with method.name={name!r}: virtual tokens are "
                 "extra inputs, not a change to the base weights, so there is nothing to merge; remove it "
                 "and load run_dir/adapter with PeftModel.from_pretrained")
    if name == "prefix" and cfg.model.gradient_checkpointing:
        p.append("'method.name' = 'prefix' cannot run with model.gradient_checkpointing=true: the prefix is "
                 "passed as a key/value cache, which checkpointed layers do not take (peft: 'PREFIX_TUNING does "
                 "not work with gradient checkpointing'); set model.gradient_checkpointing=false, or use "
                 "method.name=prompt or lora")
    if m.merge_adapter and not cfg.checkpoint.export:
        p.append("'method.merge_adapter' = true needs checkpoint.export=true (the merge is part of the export)")
    f = m.freeze
    chosen = [k for k, v in (("train_last_k_blocks", f.train_last_k_blocks), ("trainable_patterns", f.trainable_patterns),
                             ("head_only", f.head_only), ("freeze_embeddings", f.freeze_embeddings)) if v]
    if chosen and is_peft:
        p.append(f"'method.freeze.{chosen[0]}' applies to method.name=full; {name!r} freezes the base itself "
                 "(use method.modules_to_save to train extra modules in full)")
    if len(chosen) > 1:
        p.append(f"method.freeze sets {', '.join('method.freeze.' + c for c in chosen)}; choose one of them")
    if m.unfreeze_every_steps and is_peft:
        p.append(f"'method.unfreeze_every_steps' = {m.unfreeze_every_steps} applies to method.name=full, not "
                 f"{name!r}; remove it")
    if m.unfreeze_every_steps and f.head_only:
        p.append("'method.unfreeze_every_steps' has nothing to unfreeze with method.freeze.head_only=true (only "
                 "the head ever trains); use method.freeze.train_last_k_blocks to bound what unfreezes")
    if m.layer_lr_decay != 1.0 and is_peft:
        p.append(f"'method.layer_lr_decay' = {m.layer_lr_decay} applies to method.name=full, not {name!r}; "
                 "remove it")
    if t.optimizer in BNB_OPTIMIZERS and z.offload_optimizer and not t.allow_bnb_offload:
        p.append(f"'train.optimizer' = {t.optimizer!r} with zero.offload_optimizer=true runs the bitsandbytes step "
                 "on the CPU (slow; DeepSpeed refuses it unless zero_force_ds_cpu_optimizer is false); use "
                 "train.optimizer=adamw (DeepSpeed's CPU Adam) with offload, or set train.allow_bnb_offload=true "
                 "to accept the slow pairing")
    return p
