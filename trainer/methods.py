"""Apply ``method:`` to a freshly built model: a peft adapter, or a (partially) trainable full model.

    model, applied = apply_method(model, cfg, total_steps)

``applied`` says what trains (count, fraction, optimizer parameter groups) and carries the
per-step hooks a method needs (AdaLoRA's rank allocation). peft is imported only for peft
methods. The combinations that cannot work are refused by launcher/rules.py before
launch; what needs the built model (its class, its block list) is checked here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

from launcher.config import ConfigError, RunConfig
from launcher.config import PEFT_METHODS

# Output heads of classification models; "all-linear" must not wrap them (they train in full).
CLASSIFIER_HEADS = ["classifier", "score"]


class StepHooks:
    """Per-step calls of a method; the defaults do nothing."""

    def before_step(self, step: int) -> None:
        """After the step's last backward, before engine.step() (gradients are there)."""

    def after_step(self, step: int) -> None:
        """After engine.step()."""


@dataclass
class Applied:
    name: str
    is_peft: bool
    n_params: int
    n_trainable: int
    groups: Optional[list[dict]] = None  # optimizer parameter groups; None = decay / no-decay split
    hooks: StepHooks = field(default_factory=StepHooks)
    notes: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.n_trainable / max(1, self.n_params)

    def summary(self) -> str:
        return (f"method {self.name}: {self.n_trainable:,} of {self.n_params:,} parameters trainable "
                f"({100 * self.fraction:.4g}%)")


# --------------------------------------------------------------------------- checks and loading


def check_method_device(cfg: RunConfig, is_cuda: bool) -> None:
    """What the device-agnostic schema cannot know: QLoRA's 4-bit kernels need CUDA."""
    if cfg.method.name == "qlora" and not is_cuda:
        raise ConfigError(["'method.name' = 'qlora' needs a CUDA GPU (bitsandbytes' 4-bit NF4 weights are "
                           "loaded and multiplied by CUDA kernels); this run has none. Use method.name=lora on a "
                           "CPU, or run on GPU nodes"])


def check_module_names(model, cfg: RunConfig) -> None:
    """Every listed LoRA target and modules_to_save entry names a module of the built model (peft's rule:
    the name, or a dotted suffix of it); peft would skip the others silently. launcher/rules_model.py checks
    Llama-style configs before launch; this covers every architecture."""
    names = [n for n, _ in model.named_modules() if n]

    def missing(wanted) -> list[str]:
        return [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]

    m, problems = cfg.method, []
    leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()}))
    targets = m.lora.target_modules
    if m.name in ("lora", "qlora", "adalora") and targets != "all-linear" and missing(targets):
        problems.append(f"'method.lora.target_modules' lists {missing(targets)}, which match no module of "
                        f"{type(model).__name__}; its modules are {leaves}; fix the names or use all-linear")
    if missing(m.modules_to_save):
        problems.append(f"'method.modules_to_save' lists {missing(m.modules_to_save)}, which match no module of "
                        f"{type(model).__name__}; its modules are {leaves}")
    if problems:
        raise ConfigError(problems)


def load_kwargs(cfg: RunConfig, device: str) -> dict[str, Any]:
    """Extra from_pretrained arguments of a method: QLoRA's 4-bit NF4 quantization."""
    if cfg.method.name != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    from trainer.model import torch_dtype

    compute = torch_dtype(cfg.precision.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    return {"quantization_config": quant, "device_map": {"": device}}


def task_type_of(model) -> str:
    """peft's task type from the model class (the task section picks the class)."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "CAUSAL_LM"


# --------------------------------------------------------------------------- peft


def peft_config(cfg: RunConfig, task_type: str, total_steps: int, model_type: str):
    import peft

    m, lo = cfg.method, cfg.method.lora
    save = list(m.modules_to_save) or None
    targets = lo.target_modules
    exclude = CLASSIFIER_HEADS if task_type != "CAUSAL_LM" and targets == "all-linear" else None
    if m.name in ("lora", "qlora"):
        return peft.LoraConfig(task_type=task_type, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                               target_modules=targets, exclude_modules=exclude, use_rslora=lo.use_rslora,
                               use_dora=lo.use_dora, modules_to_save=save)
    if m.name == "adalora":
        a = m.adalora
        tinit, tfinal = int(a.warmup_fraction * total_steps), int(a.final_fraction * total_steps)
        assert tinit < total_steps - tfinal  # rules.method_problems: warmup_fraction + final_fraction < 1
        # orth_reg_weight=0: peft adds the orthogonality penalty to outputs.loss, which this trainer
        # does not use (it computes the loss from the logits); see docs/methods.md.
        return peft.AdaLoraConfig(task_type=task_type, init_r=lo.r, target_r=a.target_r, lora_alpha=lo.alpha,
                                  lora_dropout=lo.dropout, target_modules=targets, exclude_modules=exclude,
                                  tinit=tinit, tfinal=tfinal, deltaT=a.every_steps, total_step=total_steps,
                                  orth_reg_weight=0.0, modules_to_save=save)
    if m.name == "ia3":
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_TARGETS

        if model_type not in IA3_TARGETS:
            raise ConfigError([f"method.name=ia3 has no default target modules for model type {model_type!r} "
                               f"(peft knows {', '.join(sorted(IA3_TARGETS)[:12])}, ...); use method.name=lora "
                               "with method.lora.target_modules"])
        return peft.IA3Config(task_type=task_type, modules_to_save=save)
    if m.name == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=m.num_virtual_tokens,
                                       modules_to_save=save)
    return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=m.num_virtual_tokens,
                                   modules_to_save=save)


def _drop_virtual_token_logits(n_virtual: int):
    """Prompt tuning prepends n virtual tokens to the input embeddings, so per-token logits come
    back n positions longer; the loss lines logits up with the labels of the real tokens."""

    def hook(module, args, kwargs, output):
        if getattr(output, "logits", None) is not None and output.logits.dim() == 3:
            output.logits = output.logits[:, n_virtual:]
        return output

    return hook


def apply_peft(model, cfg: RunConfig, total_steps: int, stage: int):
    import peft

    m = cfg.method
    task_type = task_type_of(model)
    model_type = getattr(model.config, "model_type", "")
    if m.name == "prompt" and task_type == "SEQ_CLS" and hasattr(model, "score"):
        raise ConfigError([f"method.name=prompt cannot work with {type(model).__name__}: a decoder's sequence "
                           "classifier reads the last non-padding token, which it cannot find once prompt "
                           "tuning feeds input embeddings instead of token ids; use method.name=prefix or lora"])
    check_module_names(model, cfg)
    if m.name == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft_config(cfg, task_type, total_steps, model_type))
    hooks: StepHooks = StepHooks()
    if m.name == "prompt" and task_type != "SEQ_CLS":
        model.register_forward_hook(_drop_virtual_token_logits(m.num_virtual_tokens), with_kwargs=True)
    if m.name == "adalora":
        hooks = AdaLoraSteps(model, stage)
    return model, hooks


class AdaLoraSteps(StepHooks):
    """AdaLoRA's rank allocation (peft's update_and_allocate) under ZeRO 0-3.

    peft wants: backward, optimizer step, update_and_allocate(step) with the gradients still there,
    zero_grad. engine.step() does step + zero_grad in one call, and under ZeRO-1/2/3 the gradients
    live in DeepSpeed's partitions (p.grad is None) while engine.step() copies the fp32 master
    weights back over the module's. So: before the step, the importance scores are updated from
    the full gradients (deepspeed.utils.safe_get_full_grad; params gathered under ZeRO-3); after
    the step, the current rank pattern is applied again to the module weights, so that every
    forward sees the pruned singular values as zero, as in peft's own loop.
    """

    def __init__(self, model, stage: int):
        self.model, self.stage = model, stage
        self.params = [p for n, p in model.named_parameters() if "lora_" in n]
        self.values = [p for n, p in model.named_parameters() if "lora_E" in n]

    def _gathered(self, params):
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def before_step(self, step: int) -> None:
        from deepspeed.utils import safe_get_full_grad

        with self._gathered(self.params):
            missing = [p for p in self.params if p.grad is None]
            for p in missing:  # (fp32 under bf16, on the CPU under offload: as the param for peft)
                p.grad = safe_get_full_grad(p).to(p)
            # a non-finite step (trainer/faults.py) is never applied: nor is it scored (NaN importance would
            # stay in the averages for good); the gradients are reduced, so every rank decides alike
            if all(bool(p.grad.isfinite().all()) for p in self.params if p.grad is not None):
                self.model.base_model.update_and_allocate(step)
            for p in missing:
                p.grad = None

    def after_step(self, step: int) -> None:
        pattern = self.model.peft_config["default"].rank_pattern
        if pattern:
            with self._gathered(self.values):
                self.model.base_model.rankallocator.mask_using_rank_pattern(self.model.base_model.model, pattern)


# --------------------------------------------------------------------------- full / partial


def apply_partial(model, cfg: RunConfig) -> tuple[Optional[list[dict]], list[str]]:
    """requires_grad from method.freeze; parameter groups when LR differs by depth. Returns
    (groups or None, notes)."""
    from trainer import layerwise as L

    m, f = cfg.method, cfg.method.freeze
    layered = m.unfreeze_every_steps > 0 or m.layer_lr_decay != 1.0
    if not (layered or f.train_last_k_blocks or f.trainable_patterns or f.head_only or f.freeze_embeddings):
        return None, []
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    try:
        blocks, n_blocks = L.find_blocks(model)
        depth = L.depths(names, blocks, n_blocks)
        trainable = L.select_trainable(names, depth, n_blocks, f.train_last_k_blocks, f.trainable_patterns,
                                       f.head_only, f.freeze_embeddings)
    except L.FreezeError as e:
        raise ConfigError([str(e)]) from None
    if not trainable:
        raise ConfigError(["method.freeze leaves no parameter trainable; loosen the selection"])
    for n, p in named:
        p.requires_grad_(n in trainable)
    units = dict.fromkeys(L.unit_name(d, n_blocks) for d in sorted({depth[n] for n in trainable}))
    notes = [f"blocks: {blocks} ({n_blocks}); trainable units: {', '.join(units)}"]
    if not layered:
        return None, notes
    groups = L.layer_groups(named, trainable, depth, n_blocks, cfg.train.lr, m.layer_lr_decay,
                            cfg.train.weight_decay)
    if m.unfreeze_every_steps:
        units = dict.fromkeys((g["name"], g["depth"]) for g in groups)
        notes.append("gradual unfreezing: " + ", ".join(
            f"{u} from step {d * m.unfreeze_every_steps}" for u, d in units))
    return groups, notes


# --------------------------------------------------------------------------- entry point


def apply_method(model, cfg: RunConfig, total_steps: int) -> tuple[Any, Applied]:
    from trainer.model import count_params

    name = cfg.method.name
    hooks: StepHooks = StepHooks()
    groups, notes = None, []
    if name in PEFT_METHODS:
        model, hooks = apply_peft(model, cfg, total_steps, cfg.zero.stage)
    else:
        groups, notes = apply_partial(model, cfg)
    n_params, n_trainable = count_params(model)
    if name == "qlora":  # a 4-bit weight packs two values per stored element; peft counts them
        n_trainable, n_params = model.get_nb_trainable_parameters()
    return model, Applied(name=name, is_peft=name in PEFT_METHODS, n_params=n_params, n_trainable=n_trainable,
                          groups=groups, hooks=hooks, notes=notes)
