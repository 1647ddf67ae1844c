"""The memory planner: a run config + the hardware -> the peak GPU memory of one rank as a sum of
parts, the CPU memory of one node, a verdict, and the layouts that fit, fastest first.

    plan_memory(cfg, model, hw)   -> MemoryPlan: every part, in both phases, and whether it fits
    fitting_layouts(cfg, model, hw) -> the layouts (ZeRO stage, offload, micro-batch, checkpointing)
                                     that fit, ranked by expected speed, each as key=value overrides
    report(cfg, model, hw)        -> the lines `plan` and `validate` print, and the problems

The formulas are in launcher/memory.py; this module puts them together with the config and the
DeepSpeed config we render (bucket sizes, ZeRO-3 prefetch and reuse limits, as a user base JSON may
change them). A rank's GPU peak is the larger of two phases:

    forward/backward: model states + ZeRO-3 gathered parameters + reduce buckets + activations + logits
    optimizer step:   model states + the fp32 gradient partition + the optimizer's temporaries

plus the allocator's fragmentation and the CUDA context. No torch, no writes (the base DeepSpeed
JSON is read through launcher/ds_config.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from launcher.config import ConfigError, RunConfig, to_dict
from launcher.memory import (GIB, MemoryEstimate, ModelShape, activation_bytes, estimate, human, largest_layer,
                             layer_backward_bytes, logits_bytes, lora_params, model_shape, persistent_params)

# Not counted by torch.cuda.max_memory_allocated, but taken from the GPU: the CUDA context (about
# 0.3-0.6 GiB on Ampere/Hopper with CUDA 12's lazy module loading), NCCL's communicator buffers and
# kernel images. An assumption until bench/planner_vs_gpu.py measures it (device used - reserved).
CUDA_CONTEXT_BYTES = 0.75 * GIB
# The caching allocator reserves more than it hands out (block rounding, fragmentation). Assumed
# 5 % of the allocated peak; bench/planner_vs_gpu.py reports the measured reserved / allocated.
ALLOCATOR_SLACK = 0.05
# CPU memory of one rank besides offloaded states: Python, torch with the CUDA libraries, DeepSpeed,
# the tokenised data. Assumed (a CPU-only rank of the tiny test model peaks at 0.5 GiB RSS, REPORT 2;
# the CUDA libraries add about 1 GiB).
PROCESS_CPU_BYTES = 2 * GIB
# DeepSpeed defaults for keys our table does not render (deepspeed/runtime/zero/config.py).
DS_SUB_GROUP_SIZE = 1_000_000_000
STAGE0_ALLREDUCE_ELEMENTS = 500_000_000  # engine.allreduce_gradients' flat buffer (MEMORY_OPT_ALLREDUCE_SIZE)


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_mem_gb: float  # GiB per GPU
    cpu_mem_gb: Optional[float] = None  # GiB per node; None = not checked
    gpu_key: str = "--gpu-mem-gb"  # where the numbers came from, for messages
    cpu_key: str = "--cpu-mem-gb"

    def problems(self) -> list[str]:
        p = []
        if self.nodes < 1:
            p.append(f"--nodes {self.nodes}: a run needs at least 1 node")
        if self.gpus_per_node < 1:
            p.append(f"--gpus-per-node {self.gpus_per_node}: the planner needs at least 1 GPU per node "
                     "(CPU-only runs have no GPU memory to plan)")
        if not self.gpu_mem_gb > 0:
            p.append(f"{self.gpu_key} {self.gpu_mem_gb}: the memory of one GPU must be a positive number of GiB "
                     "(e.g. 80 for an 80 GB H100)")
        if self.cpu_mem_gb is not None and not self.cpu_mem_gb > 0:
            p.append(f"{self.cpu_key} {self.cpu_mem_gb}: the memory of one node must be a positive number of GiB")
        return p


@dataclass(frozen=True)
class ModelInfo:
    """What launcher.memory.count_params found: the parameter count, where from, the HF config."""
    n_params: Optional[int]
    source: str
    hf: dict

    @property
    def shape(self) -> Optional[ModelShape]:
        return model_shape(self.hf)


@dataclass(frozen=True)
class Part:
    name: str
    first: float  # bytes in the first phase (GPU: forward/backward; CPU: model load)
    second: float  # bytes in the second phase (GPU: optimizer step; CPU: training)
    how: str  # the formula with its numbers
    allocated: bool = True  # False: not in torch.cuda.max_memory_allocated (fragmentation, the CUDA context)


@dataclass(frozen=True)
class Layout:
    """The knobs the planner turns, in the order of expected speed (see :meth:`speed_key`)."""
    stage: int
    offload_optimizer: bool
    offload_param: bool
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool

    @classmethod
    def of(cls, cfg: RunConfig) -> "Layout":
        from launcher.batch import plan_batch

        t, z = cfg.train, cfg.zero
        accum = plan_batch(t.micro_batch_size, t.grad_accum, t.global_batch_size, cfg.world_size).grad_accum
        return cls(z.stage, z.offload_optimizer, z.offload_param, t.micro_batch_size, accum,
                   cfg.model.gradient_checkpointing)

    def speed_key(self) -> tuple:
        """No offload before offload, lower ZeRO stage before higher, bigger micro-batch first, no
        gradient checkpointing before checkpointing."""
        return (self.offload_optimizer + self.offload_param, self.stage, -self.micro_batch_size,
                self.gradient_checkpointing)

    def overrides(self, explicit_accum: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"zero.stage": self.stage, "zero.offload_optimizer": self.offload_optimizer,
                               "zero.offload_param": self.offload_param,
                               "train.micro_batch_size": self.micro_batch_size}
        if explicit_accum:  # no train.global_batch_size: keep the global batch through accumulation
            out["train.grad_accum"] = self.grad_accum
        out["model.gradient_checkpointing"] = self.gradient_checkpointing
        return out


def override_text(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


@dataclass(frozen=True)
class MemoryPlan:
    layout: Layout
    gpu: list[Part]
    cpu: list[Part]
    hw: Hardware
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_phases(self) -> tuple[float, float]:
        return sum(p.first for p in self.gpu), sum(p.second for p in self.gpu)

    @property
    def gpu_peak(self) -> float:
        return max(self.gpu_phases)

    @property
    def allocated_peak(self) -> float:
        """What torch.cuda.max_memory_allocated should show: the peak without slack and context."""
        return max(sum(p.first for p in self.gpu if p.allocated), sum(p.second for p in self.gpu if p.allocated))

    @property
    def cpu_peak(self) -> float:
        return max(sum(p.first for p in self.cpu), sum(p.second for p in self.cpu))

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_peak <= self.hw.gpu_mem_gb * GIB

    @property
    def fits_cpu(self) -> bool:
        return self.hw.cpu_mem_gb is None or self.cpu_peak <= self.hw.cpu_mem_gb * GIB

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def overflow(self) -> list[str]:
        """What does not fit, naming the part and the numbers."""
        out = []
        if not self.fits_gpu:
            out.append(_overflow("peak GPU memory per rank", self.gpu, self.gpu_phases,
                                 ("forward/backward", "optimizer step"), self.hw.gpu_mem_gb, self.hw.gpu_key))
        if not self.fits_cpu:
            out.append(_overflow(f"CPU memory per node ({self.hw.gpus_per_node} rank(s))", self.cpu,
                                 (sum(p.first for p in self.cpu), sum(p.second for p in self.cpu)),
                                 ("model load", "training"), self.hw.cpu_mem_gb, self.hw.cpu_key))
        return out


def _overflow(what: str, parts: list[Part], phases: tuple[float, float], names: tuple[str, str],
              capacity_gb: float, key: str) -> str:
    i = 0 if phases[0] >= phases[1] else 1
    total, cap = phases[i], capacity_gb * GIB
    biggest = max(parts, key=lambda p: (p.first, p.second)[i])
    size = (biggest.first, biggest.second)[i]
    alone = " (alone more than the whole memory)" if size > cap else ""
    return (f"{what} is {human(total)} (during the {names[i]}), more than {key} = {capacity_gb:g} GiB by "
            f"{human(total - cap)}; the largest part is {biggest.name}: {human(size)}{alone}")


# --------------------------------------------------------------------------- model states


def model_state(cfg: RunConfig, n_params: int, hf_config: dict) -> tuple[MemoryEstimate, str]:
    """The model-state estimate for this config's stage, offload, precision, optimizer and method."""
    z, m = cfg.zero, cfg.method
    params, trainable, note = n_params, n_params, ""
    if m.name in ("lora", "qlora", "adalora"):
        adapter = lora_params(hf_config, m.lora.r, m.lora.target_modules, m.lora.use_dora)
        if adapter is None:
            trainable, note = 0, "adapter parameters not counted for this architecture"
        else:
            params, trainable = n_params + adapter, adapter
    elif m.name != "full":
        trainable, note = 0, f"{m.name} adapter parameters not counted"
    elif m.freeze != type(m.freeze)() or m.unfreeze_every_steps:
        note = "partial freezing not counted: an upper bound"
    est = estimate(params, trainable, cfg.world_size, z.stage, cfg.precision.dtype, cfg.train.optimizer,
                   z.offload_optimizer, z.offload_param, frozen_bits=4 if m.name == "qlora" else None)
    return est, note


# --------------------------------------------------------------------------- the parts


def plan_memory(cfg: RunConfig, model: ModelInfo, hw: Hardware) -> MemoryPlan:
    """Every part of the GPU peak of one rank and of the CPU memory of one node, for ``cfg`` as it
    is (its world is dist.nodes x dist.procs_per_node; see :func:`for_hardware`)."""
    from launcher.ds_config import build_ds_config

    assert model.n_params is not None, "plan_memory needs a parameter count"
    ds = build_ds_config(cfg)
    zds = ds["zero_optimization"]
    z, t, stage, world = cfg.zero, cfg.train, cfg.zero.stage, cfg.world_size
    p = 4 if cfg.precision.dtype == "fp32" else 2  # bytes of a parameter, a gradient, an activation
    est, note = model_state(cfg, model.n_params, model.hf)
    shape = model.shape
    notes = [note] if note else []
    psi, trainable = est.params, est.trainable
    n_opt = world if stage >= 1 else 1
    per = f"/ {world} rank(s)"

    gpu = [
        Part(f"parameters ({cfg.precision.dtype})", est.gpu_params, est.gpu_params,
             f"{p} B x {psi:,} params" + (f" {per}" if stage == 3 else "") + (" -> CPU" if z.offload_param else "")),
        Part("gradients", est.gpu_grads, est.gpu_grads,
             f"{p} B x {trainable:,} trainable" + (f" {per}" if stage >= 2 else "")
             + (" -> CPU" if z.offload_optimizer and stage >= 2 else "")),
        Part("optimizer states", est.gpu_optim, est.gpu_optim,
             ("-> CPU" if z.offload_optimizer else f"(fp32 master + {t.optimizer} moments) x {trainable:,}"
              + (f" {per}" if stage >= 1 else ""))),
        Part("fp32 gradients at the step", 0.0, est.gpu_step_grads,
             "-> CPU" if z.offload_optimizer else f"4 B x {trainable:,}" + (f" {per}" if stage >= 1 else "")),
    ]
    temp = 4 * trainable / n_opt if t.optimizer == "adamw" and not z.offload_optimizer else 0.0
    gpu.append(Part("optimizer temporaries", 0.0, temp,
                    "torch AdamW (foreach): one fp32 sqrt(v) per partition" if temp else
                    "the step runs on the CPU" if z.offload_optimizer else f"none for {t.optimizer}"))

    if stage == 3:
        gpu.append(_zero3_gathered(zds, psi, p, shape, notes))
    gpu.append(_buckets(zds, stage, world, trainable, p))

    seq, micro = cfg.data.max_length, t.micro_batch_size
    tokens = micro * seq
    padded = not (cfg.data.packing and cfg.task.type == "causal_lm")
    if shape is not None:
        ckpt = cfg.model.gradient_checkpointing
        acts = activation_bytes(shape, micro, seq, p, padded, ckpt)
        gpu.append(Part("activations", acts, 0.0, f"{shape.family}-style, micro {micro} x seq {seq}, "
                        f"{'padded' if padded else 'packed'}: "
                        + ("every layer's input (checkpointing)" if ckpt else "every layer's saved tensors")))
        logits, how = 0, f"{cfg.task.type} head: negligible"
        if cfg.task.type == "causal_lm":
            logits, how = logits_bytes(shape, tokens, t.loss_chunk_tokens, cfg.model.liger, p, trainable == psi)
        gpu.append(Part("logits and loss", logits, 0.0, how))
        inside = layer_backward_bytes(shape, micro, seq, p, padded, ckpt)
        gpu.append(Part("layer backward", max(0, inside - logits), 0.0,
                        f"{human(inside)} ({'the recomputed layer + ' if ckpt else ''}gradients of the MLP inputs and "
                        f"one weight), after the logits ({human(logits)}) are freed: the excess counts"))
        if cfg.method.name != "full":
            notes.append(f"activations are modeled for full fine-tuning; {cfg.method.name} keeps about the same")
    else:
        notes.append(f"activations, logits and the ZeRO-3 gather are not modeled for model_type "
                     f"{model.hf.get('model_type')!r} (modeled: Llama-style llama, mistral; BERT-style bert, "
                     "roberta, xlm-roberta): the verdict counts model states, buckets and the CUDA context only, "
                     "a floor")
    alloc = (sum(x.first for x in gpu), sum(x.second for x in gpu))
    gpu.append(Part("allocator fragmentation", ALLOCATOR_SLACK * alloc[0], ALLOCATOR_SLACK * alloc[1],
                    f"{ALLOCATOR_SLACK:.0%} of the allocated peak (assumed)", allocated=False))
    gpu.append(Part("CUDA context", CUDA_CONTEXT_BYTES, CUDA_CONTEXT_BYTES,
                    "context + NCCL + kernels, outside the allocator (assumed)", allocated=False))
    return MemoryPlan(Layout.of(cfg), gpu, _cpu_parts(cfg, est, hw.gpus_per_node, zds), hw, notes)


def _zero3_gathered(zds: dict, psi: int, p: int, shape: Optional[ModelShape], notes: list[str]) -> Part:
    """ZeRO-3 keeps gathered: the modules in use and those reused within stage3_max_reuse_distance
    (at the turn from forward to backward the last ~distance/2 elements of forward come back first),
    the prefetch bucket, the persistent small tensors, and the full gradient of the layer being
    reduced (at most the largest layer) -- DeepSpeed's estimator counts the largest layer twice
    (params + grads, 4 B each element)."""
    if shape is None:
        notes.append("ZeRO-3: the largest layer is unknown for this architecture; gathered parameters not counted")
        return Part("ZeRO-3 gathered parameters", 0.0, 0.0, "not modeled (architecture unknown)")
    big = largest_layer(shape)
    prefetch = int(zds.get("stage3_prefetch_bucket_size", 50_000_000))
    reuse = int(zds.get("stage3_max_reuse_distance", 1_000_000_000))
    persist = persistent_params(shape, int(zds.get("stage3_param_persistence_threshold", 100_000)))
    live = min(psi, max(big, reuse // 2) + prefetch)
    return Part("ZeRO-3 gathered parameters", p * (live + persist + big), p * persist,
                f"{p} B x (live {live:,} = min(params, max(largest layer {big:,}, reuse distance/2) + prefetch "
                f"{prefetch:,}) + persistent {persist:,} + the largest layer's gradient {big:,})")


def _buckets(zds: dict, stage: int, world: int, trainable: int, p: int) -> Part:
    """Gradient reduction buffers. ZeRO-1/2 with contiguous gradients allocate reduce_bucket_size
    elements (twice with overlap_comm) at the first backward and free them at the step; ZeRO-3 keeps
    one bucket for good; stage 0 flattens the gradients into one all-reduce buffer (<= 5e8 elements)."""
    rbs = int(zds.get("reduce_bucket_size", 500_000_000))
    contiguous = bool(zds.get("contiguous_gradients", True))
    if stage == 0:
        flat = p * min(trainable, STAGE0_ALLREDUCE_ELEMENTS) if world > 1 else 0
        return Part("reduce buckets", 0.0, flat, f"stage 0 all-reduce: {p} B x min(trainable, 5e8)"
                    if world > 1 else "one rank: no all-reduce")
    if not contiguous:
        return Part("reduce buckets", 0.0, 0.0, "contiguous_gradients off: gradients reduced in place")
    if stage == 3:
        return Part("reduce buckets", p * rbs, p * rbs, f"{p} B x reduce_bucket_size {rbs:,}")
    copies = 2 if zds.get("overlap_comm") else 1
    return Part("reduce buckets", copies * p * rbs, 0.0,
                f"{copies} x {p} B x reduce_bucket_size {rbs:,}" + (" (overlap_comm)" if copies == 2 else ""))


def _cpu_parts(cfg: RunConfig, est: MemoryEstimate, ranks: int, zds: dict) -> list[Part]:
    """CPU memory of one node (``ranks`` ranks): the model as it loads, then offloaded states."""
    m = cfg.model
    from_pretrained = m.name_or_path is not None
    into_partitions = cfg.zero.stage == 3 and from_pretrained  # zero.Init loads straight into partitions
    load_bytes = (0.5 if cfg.method.name == "qlora" else 4 if cfg.precision.dtype == "fp32" else 2) \
        if from_pretrained else 4  # from_config builds in fp32
    load = 0.0 if into_partitions else ranks * est.params * load_bytes
    pinned = any(zds.get(k, {}).get("pin_memory") for k in ("offload_optimizer", "offload_param"))
    return [
        Part("model load", load, 0.0, "ZeRO-3 from_pretrained loads into partitions" if into_partitions else
             f"{ranks} ranks x {est.params:,} params x {load_bytes:g} B "
             f"({'from_pretrained' if from_pretrained else 'from_config, fp32'}), before DeepSpeed moves it"),
        Part("offloaded optimizer states", 0.0, ranks * est.cpu_optim,
             f"{ranks} ranks x {human(est.cpu_optim)}" if est.cpu_optim else "no optimizer offload"),
        Part("offloaded gradients", 0.0, ranks * est.cpu_grads,
             f"{ranks} ranks x {human(est.cpu_grads)}" if est.cpu_grads else "-"),
        Part("offloaded parameters", 0.0, ranks * est.cpu_params,
             f"{ranks} ranks x {human(est.cpu_params)}" if est.cpu_params else "no parameter offload"),
        Part("processes", ranks * PROCESS_CPU_BYTES, ranks * PROCESS_CPU_BYTES,
             f"{ranks} x {human(PROCESS_CPU_BYTES)} (Python, torch, CUDA libraries; assumed)"
             + ("; offload buffers pinned (page-locked)" if pinned else "")),
    ]


# --------------------------------------------------------------------------- layouts


def for_hardware(cfg: RunConfig, hw: Hardware) -> tuple[RunConfig, dict[str, Any]]:
    """``cfg`` on ``hw`` (dist.nodes x gpus per node), with the overrides that say so; ConfigError when
    the batch does not divide the new world."""
    over: dict[str, Any] = {}
    if cfg.dist.nodes != hw.nodes:
        over["dist.nodes"] = hw.nodes
    if cfg.dist.procs_per_node != hw.gpus_per_node:
        over["dist.procs_per_node"] = hw.gpus_per_node
        if cfg.slurm.gpus_per_node:
            over["slurm.gpus_per_node"] = hw.gpus_per_node
    return (_with(cfg, over) if over else cfg), over


def _with(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    from launcher.rules import apply_overrides, validate

    return validate(apply_overrides(to_dict(cfg), overrides), source=f"the layout {override_text(overrides)}")


def candidate_layouts(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every layout to try, as overrides: ZeRO stage x offload x micro-batch (the configured one and
    the powers of two below it, keeping the global batch) x gradient checkpointing."""
    t = cfg.train
    micros = sorted({t.micro_batch_size, *(1 << k for k in range(t.micro_batch_size.bit_length())
                                           if 1 << k < t.micro_batch_size)}, reverse=True)
    per_step = t.micro_batch_size * t.grad_accum  # sequences per rank per optimizer step, without a global batch
    out = []
    for stage, off_opt, off_param in ((0, False, False), (1, False, False), (2, False, False), (3, False, False),
                                      (1, True, False), (2, True, False), (3, True, False), (3, True, True)):
        for micro in micros:
            if t.global_batch_size is None and per_step % micro:
                continue
            for ckpt in (False, True):
                layout = Layout(stage, off_opt, off_param, micro, per_step // micro, ckpt)
                out.append(layout.overrides(explicit_accum=t.global_batch_size is None))
    return out


@dataclass(frozen=True)
class Option:
    overrides: dict[str, Any]  # hardware + layout, to paste or --apply
    plan: MemoryPlan

    @property
    def text(self) -> str:
        return override_text(self.overrides)


def fitting_layouts(cfg: RunConfig, model: ModelInfo, hw: Hardware, hw_overrides: Optional[dict] = None
                    ) -> list[Option]:
    """The layouts of :func:`candidate_layouts` that the rules allow and that fit, fastest first."""
    options = []
    for over in candidate_layouts(cfg):
        try:
            cand = _with(cfg, over)
            plan = plan_memory(cand, model, hw)
        except ConfigError:  # a combination the rules refuse (e.g. QLoRA at ZeRO-3) or the base JSON contradicts
            continue
        if plan.fits:
            options.append(Option({**(hw_overrides or {}), **over}, plan))
    return sorted(options, key=lambda o: o.plan.layout.speed_key())


# --------------------------------------------------------------------------- the report


def report(cfg: RunConfig, model: ModelInfo, hw: Hardware, top: int = 8, alternatives: bool = False
           ) -> tuple[list[str], list[str], list[Option]]:
    """(lines to print, problems, fitting options) for ``cfg`` on ``hw``: no problems = it fits. The
    options (fastest first) are searched when the layout does not fit, or with ``alternatives``."""
    problems = hw.problems()
    if problems:
        return [], problems, []
    if model.n_params is None:
        return [], [f"cannot plan memory: the parameter count is unknown ({model.source}); run where the model "
                    "folder is readable, or give its config.json with --model-config PATH"], []
    cfg, hw_over = for_hardware(cfg, hw)
    plan = plan_memory(cfg, model, hw)
    lines = render(cfg, model, plan)
    if plan.fits and not alternatives:
        return lines, [], []
    options = fitting_layouts(cfg, model, hw, hw_over)
    if plan.fits:
        return lines, [], options
    if options:
        listing = [f"  {i}. {o.text}   (GPU peak {human(o.plan.gpu_peak)}, CPU {human(o.plan.cpu_peak)} per node)"
                   for i, o in enumerate(options[:top], 1)]
        more = [f"  ... and {len(options) - top} more"] if len(options) > top else []
        tail = "\nlayouts that fit, fastest first (paste the overrides, or use plan --apply OUT.yaml):\n" + \
            "\n".join(listing + more)
    else:
        tail = ("\nno layout fits (ZeRO 0-3, offload, micro-batch down to 1, gradient checkpointing): use more "
                "GPUs (--nodes / --gpus-per-node), GPUs with more memory, a shorter data.max_length, "
                "train.loss_chunk_tokens, or a LoRA method")
    return lines, ["does not fit: " + "; ".join(plan.overflow()) + tail], options


def render(cfg: RunConfig, model: ModelInfo, plan: MemoryPlan) -> list[str]:
    hw, lay = plan.hw, plan.layout
    shape = model.shape
    lines = [
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {hw.gpu_mem_gb:g} GiB = world size "
        f"{cfg.world_size}; CPU {f'{hw.cpu_mem_gb:g} GiB' if hw.cpu_mem_gb else 'not given'} per node",
        f"model: {model.n_params:,} params ({model.source})" + (f"; {shape.describe()}" if shape else ""),
        f"layout: {override_text(lay.overrides(cfg.train.global_batch_size is None))} "
        f"({cfg.precision.dtype}, {cfg.train.optimizer}, max_length {cfg.data.max_length}, "
        f"loss_chunk_tokens {cfg.train.loss_chunk_tokens}{', liger' if cfg.model.liger else ''})",
    ]
    width = 30

    def row(name: str, first: str, second: str, how: str) -> str:
        return f"  {name:<{width}}{first:>18}{second:>16}   {how}"

    lines.append(row("", "forward/backward", "optimizer step", "").rstrip().replace("  " + " " * width,
                                                                                   "GPU memory per rank".ljust(width + 2), 1))
    for part in plan.gpu:
        lines.append(row(part.name, human(part.first), human(part.second), part.how))
    b, s = plan.gpu_phases
    verdict = "fits" if plan.fits_gpu else "DOES NOT FIT"
    lines.append(row("total", human(b), human(s), f"peak {human(plan.gpu_peak)} of {hw.gpu_mem_gb:g} GiB "
                     f"({hw.gpu_key}): {verdict}"))
    lines.append(row("", "model load", "training", "").rstrip().replace(
        "  " + " " * width, f"CPU memory per node ({hw.gpus_per_node} rank(s))".ljust(width + 2), 1))
    for part in plan.cpu:
        lines.append(row(part.name, human(part.first), human(part.second), part.how))
    cap = (f"of {hw.cpu_mem_gb:g} GiB ({hw.cpu_key}): {'fits' if plan.fits_cpu else 'DOES NOT FIT'}"
           if hw.cpu_mem_gb else f"(no CPU memory given: {hw.cpu_key} or slurm.mem_gb)")
    lines.append(row("total", human(sum(p.first for p in plan.cpu)), human(sum(p.second for p in plan.cpu)),
                     f"peak {human(plan.cpu_peak)} {cap}"))
    lines += [f"note: {n}" for n in plan.notes]
    return lines
