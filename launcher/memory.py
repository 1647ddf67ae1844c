"""GPU and CPU memory of a training rank: the formulas (launcher/planner.py puts them together).

Model states per rank, as DeepSpeed 0.19 allocates them (Psi parameters, T of them trainable, N
data-parallel ranks, N' = N for ZeRO stage >= 1 and 1 for stage 0; p = 2 bytes in bf16/fp16, 4 in fp32):

    16-bit parameters          p Psi              (ZeRO-3: / N)
    gradients                  p T                (ZeRO-2/3: / N; with optimizer offload they go to CPU)
    optimizer states           (4 + K) T / N'     fp32 master copy (none for fp32 at stage 0) + K bytes
                                                  of moments (Adam 8, 8-bit Adam 2, 8-bit Lion 1)
    fp32 gradient partition    4 T / N'           built at the optimizer step (none for fp32 at stage 0)

With mixed-precision Adam this is the ZeRO paper's 2 + 2 + 12 bytes (Rajbhandari et al. 2020, 5.1)
plus the 4-byte fp32 gradient DeepSpeed builds for the step: 2 Psi + 18 Psi / N at ZeRO-2, as
DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` says. Optimizer offload moves optimizer
states and the fp32 gradients to CPU memory (ZeRO-3 also its 16-bit gradient partition); parameter
offload (ZeRO-3) the 16-bit parameters. Frozen parameters (LoRA) have no gradient and no state.

Activations (:func:`activation_bytes`), logits (:func:`logits_bytes`) and the ZeRO-3 gather
(:func:`largest_layer`, :func:`persistent_params`) come from the layer shapes of the Hugging Face
config (:func:`model_shape`); each function documents its formula.

Parameter counts come from the model folder's safetensors headers (exact) or, for Llama-style
configs, from the config dict (:func:`params_from_hf_config`). ``count_params`` is the only
function here that reads files.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.errors import ConfigError

GIB = 2**30
LLAMA_LIKE = ("llama", "mistral")
BERT_LIKE = ("bert", "roberta", "xlm-roberta")


@dataclass(frozen=True)
class MemoryEstimate:
    """Model states of one rank, in bytes (GPU, and CPU under offload)."""
    params: int
    trainable: int
    world: int
    gpu_params: float  # 16-bit (or fp32) parameters
    gpu_grads: float  # 16-bit gradients
    gpu_optim: float  # fp32 master copy + optimizer moments
    gpu_step_grads: float  # fp32 gradient partition, alive during the optimizer step
    cpu_params: float = 0.0  # offload_param
    cpu_grads: float = 0.0  # offload_optimizer: the gradients (fp32, and ZeRO-3's 16-bit partition)
    cpu_optim: float = 0.0  # offload_optimizer: master copy + moments

    @property
    def gpu_total(self) -> float:
        """Every model state at once, as DeepSpeed's estimators count them."""
        return self.gpu_params + self.gpu_grads + self.gpu_optim + self.gpu_step_grads

    @property
    def cpu_per_rank(self) -> float:
        return self.cpu_params + self.cpu_grads + self.cpu_optim

    def describe(self) -> str:
        text = (f"{human(self.gpu_total)} per rank/GPU (params {human(self.gpu_params)} + grads {human(self.gpu_grads)} + "
                f"optimizer states {human(self.gpu_optim)} + fp32 grads at the step {human(self.gpu_step_grads)}) "
                f"for {self.params:,} params ({self.trainable:,} trainable) on {self.world} rank(s)")
        if self.cpu_per_rank:
            text += f"; offloaded to CPU memory: {human(self.cpu_per_rank)} per rank"
        return text


def human(n_bytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def moment_bytes(optimizer: str) -> int:
    """Bytes of optimizer moments per trainable parameter: Adam's m and v in fp32 (8), in 8 bits
    (2; measured 2.03-2.05 with the block scales, REPORT 5), 8-bit Lion's one moment (1)."""
    if optimizer == "lion8bit":
        return 1
    return 2 if optimizer.endswith("8bit") else 8


def estimate(params: int, trainable: int, world: int, stage: int, dtype: str = "bf16",
             optimizer: str = "adamw", offload_optimizer: bool = False, offload_param: bool = False,
             frozen_bits: Optional[int] = None) -> MemoryEstimate:
    """Model-state bytes per rank (see the module docstring). ``frozen_bits`` = storage of frozen
    params (4 for QLoRA); default = dtype."""
    mixed = dtype in ("bf16", "fp16")
    p = 2 if mixed else 4
    n = world if stage >= 1 else 1  # optimizer states and fp32 grads are partitioned from stage 1
    wrapped = mixed or stage >= 1  # fp32 at stage 0 runs the bare optimizer: no master copy, no fp32 grads
    frozen = (params - trainable) * (p if frozen_bits is None else frozen_bits / 8)
    params_b = (p * trainable + frozen) / (world if stage == 3 else 1)
    grads_b = p * trainable / (world if stage >= 2 else 1)
    optim_b = ((4 if wrapped else 0) + moment_bytes(optimizer)) * trainable / n
    step_b = 4 * trainable / n if wrapped else 0.0
    cpu_params = cpu_grads = cpu_optim = 0.0
    if offload_optimizer:
        cpu_optim, optim_b = optim_b, 0.0
        cpu_grads, step_b = step_b, 0.0  # the fp32 gradient partition lives on the CPU for good
        if stage >= 2:  # gradients are reduced straight into CPU buffers (ZeRO-3 keeps a 16-bit one there)
            cpu_grads += grads_b if stage == 3 else 0.0
            grads_b = 0.0
    if offload_param:
        cpu_params, params_b = params_b, 0.0
    return MemoryEstimate(params, trainable, world, params_b, grads_b, optim_b, step_b, cpu_params, cpu_grads,
                          cpu_optim)


# --------------------------------------------------------------------------- layer shapes


@dataclass(frozen=True)
class ModelShape:
    """The layer shapes the activation model needs, read from a Hugging Face config dict."""
    family: str  # "llama" (pre-norm RMSNorm, SwiGLU, rotary, GQA) or "bert" (post-LayerNorm, GELU)
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # input embedding and output head share one matrix
    hidden_dropout: float  # BERT: dropout after the embeddings, attention output and MLP output
    positions: int = 0  # BERT: rows of the learned position embedding

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def describe(self) -> str:
        kv = f" ({self.kv_heads} kv)" if self.kv_heads != self.heads else ""
        return (f"{self.family}-style: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads{kv} of {self.head_dim}, vocab {self.vocab:,}")


def model_shape(c: dict[str, Any]) -> Optional[ModelShape]:
    """The shapes of a Llama-style or BERT-style config; None for an architecture not modeled."""
    family = "llama" if c.get("model_type") in LLAMA_LIKE else "bert" if c.get("model_type") in BERT_LIKE else None
    if family is None:
        return None
    try:
        h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        shape = ModelShape(
            family=family, vocab=int(c["vocab_size"]), hidden=h, intermediate=int(c["intermediate_size"]),
            layers=int(c["num_hidden_layers"]), heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or h // heads),
            tied=bool(c.get("tie_word_embeddings", family == "bert")),
            hidden_dropout=float(c.get("hidden_dropout_prob", 0.1) if family == "bert" else 0.0),
            positions=int(c.get("max_position_embeddings", 512)) if family == "bert" else 0)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return shape


def largest_layer(s: ModelShape) -> int:
    """Elements of the largest module's own parameters (what ZeRO-3 gathers at once; DeepSpeed's
    ``model_to_params`` counts the same): the embedding / output head, one MLP matrix, or BERT's
    position embedding."""
    return max(s.vocab * s.hidden, s.hidden * s.intermediate, s.hidden * s.q_dim, s.positions * s.hidden)


def persistent_params(s: ModelShape, threshold: int) -> int:
    """Elements ZeRO-3 keeps gathered on every rank (tensors below stage3_param_persistence_threshold
    elements): Llama's norm weights (2 per layer + the final one); BERT's LayerNorm weights and
    biases (4 per layer + 2) and linear biases (5 of size h and 1 of size i per layer)."""
    if s.family == "llama":
        tensors = [(s.hidden, 2 * s.layers + 1)]  # (elements of one tensor, how many)
    else:
        tensors = [(s.hidden, 9 * s.layers + 2), (s.intermediate, s.layers)]
    return sum(n * k for n, k in tensors if n < threshold)


# --------------------------------------------------------------------------- activations


def layer_activation_bytes(s: ModelShape, micro: int, seq: int, act_bytes: int, padded: bool,
                           mask_bytes: int = 1) -> int:
    """Bytes one transformer layer saves for backward (what autograd keeps), with sdpa attention
    (flash / memory-efficient kernels keep the output and the log-sum-exp, never the S x S scores).

    t = micro x seq tokens, a = activation bytes (2 bf16/fp16, 4 fp32), h hidden, i intermediate,
    q = heads x head_dim, kv = kv_heads x head_dim.

    Llama: 2 RMSNorms x (4 + 2a) t h  (fp32 copy of the input, normalised input, output)
         + a t (2q + 2kv)             (q and k after rotary, v, attention output = o_proj input)
         + 4 a t i                    (gate, SiLU(gate), up, their product = down_proj input)
         + 4 micro heads seq          (fp32 log-sum-exp) + 8 t (two fp32 rsqrt)
    BERT:  8 a t h                    (layer input, q, k, v, attention output, both LayerNorms' inputs,
                                       the first one's output)
         + 2 a t i                    (GELU input and output) + 2 m t h (dropout masks, m = 1 byte on CUDA)
         + 4 micro heads seq + 4 a t  (LayerNorm mean / rstd)
    Padded batches (a padding mask; data.packing=false) add the mask as an additive bias, a micro
    seq^2 per layer, and k, v repeated to every head (kv -> q, transformers' repeat_kv).
    Checked against the bytes autograd saves on a CPU model in tests/test_planner.py.
    """
    t, a, h, i = micro * seq, act_bytes, s.hidden, s.intermediate
    kv = s.q_dim if padded else s.kv_dim
    bias = a * micro * seq * seq if padded else 0
    lse = 4 * micro * s.heads * seq
    if s.family == "llama":
        return 2 * (4 + 2 * a) * t * h + a * t * (2 * s.q_dim + 2 * kv) + 4 * a * t * i + lse + 8 * t + bias
    masks = 2 * mask_bytes * t * h if s.hidden_dropout > 0 else 0
    return 8 * a * t * h + 2 * a * t * i + masks + lse + 4 * a * t + bias


def activation_bytes(s: ModelShape, micro: int, seq: int, act_bytes: int, padded: bool, checkpointing: bool,
                     mask_bytes: int = 1) -> int:
    """Saved activations of the whole model at the top of backward.

    Without checkpointing: layers x :func:`layer_activation_bytes` + the embedding (8 t for the
    int64 ids) + Llama's final norm ((4 + 2a) t h + 4 t) and the rotary cos / sin every layer
    shares (2 a seq head_dim); BERT's embedding LayerNorm (a t h + 2 a t) and dropout mask, its
    token-type and position ids (8 seq + 8 max_position_embeddings), and the head's input, the
    last layer's output (a t h).
    With (non-reentrant) gradient checkpointing every layer keeps only its input: layers x a t h
    (the layer recomputed in backward is :func:`layer_backward_bytes`).
    """
    t, a, h = micro * seq, act_bytes, s.hidden
    if s.family == "llama":
        outside = 8 * t + (4 + 2 * a) * t * h + 4 * t + (0 if checkpointing else 2 * a * seq * s.head_dim)
    else:
        outside = (8 * t + 8 * seq + 8 * s.positions + 2 * a * t * h + 2 * a * t
                   + (mask_bytes * t * h if s.hidden_dropout > 0 else 0))
    per_layer = a * t * h if checkpointing else layer_activation_bytes(s, micro, seq, a, padded, mask_bytes)
    return s.layers * per_layer + outside


def layer_backward_bytes(s: ModelShape, micro: int, seq: int, act_bytes: int, padded: bool, checkpointing: bool,
                         mask_bytes: int = 1) -> int:
    """Working memory inside one layer's backward, on top of the saved activations: the gradients of
    the MLP's inputs (2 a t i) and of one weight (a h i); with checkpointing also the layer's
    recomputed activations. It comes after the loss's backward has freed the logits, so a rank's
    peak holds the larger of the two."""
    t, a = micro * seq, act_bytes
    work = 2 * a * t * s.intermediate + a * s.hidden * s.intermediate
    return work + (layer_activation_bytes(s, micro, seq, a, padded, mask_bytes) if checkpointing else 0)


# Bytes per logit alive at the top of backward for the plain loss: the saved fp32 log-softmax (4),
# the gradient of the log-softmax output (4) and of its input (4). Forward holds a (logits) + 4 (the
# fp32 copy) + 4 (log-softmax) <= 12 for a <= 4 bytes.
LOGIT_BYTES = 12


def liger_chunk_tokens(tokens: int, s: ModelShape) -> int:
    """Liger's fused linear cross-entropy chunk: next_power_of_2(ceil(tokens / ceil(vocab / hidden)))."""
    chunks = math.ceil(s.vocab / s.hidden)
    return 1 << max(0, math.ceil(tokens / chunks) - 1).bit_length()


def logits_bytes(s: ModelShape, tokens: int, chunk_tokens: int, liger: bool, act_bytes: int,
                 head_trains: bool = True) -> tuple[int, str]:
    """(bytes, formula) of the logits and the loss of a causal LM at their peak.

    plain (chunk_tokens 0):  12 t V        (LOGIT_BYTES: every token's logits at once)
    chunked:                 12 c V        (c = min(chunk_tokens, t): one chunk's logits at a time)
    Liger:                   a c V + a t h + a V h   (c = Liger's chunk; logits chunk with its
                             gradient written in place, grad of the hidden states, grad of the head)
    """
    v = s.vocab
    if liger:
        c = min(tokens, liger_chunk_tokens(tokens, s))
        head = act_bytes * v * s.hidden if head_trains else 0
        return (act_bytes * c * v + act_bytes * tokens * s.hidden + head,
                f"Liger: {act_bytes} x {c:,} x {v:,} + grad of hidden states + grad of the head")
    c = tokens if chunk_tokens == 0 else min(chunk_tokens, tokens)
    how = "plain fp32 loss" if chunk_tokens == 0 else f"chunks of {c:,} tokens"
    return LOGIT_BYTES * c * v, f"{how}: {LOGIT_BYTES} x {c:,} tokens x vocab {v:,}"


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_params(c: dict[str, Any], r: int, targets: Any, dora: bool = False) -> Optional[int]:
    """Adapter parameters of LoRA rank ``r`` on a Llama-style config: r x (in + out) per matrix."""
    if c.get("model_type") not in LLAMA_LIKE:
        return None
    try:
        h, i, heads = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        hd = int(c.get("head_dim") or h // heads)
        layers = int(c["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # a config leaning on transformers' defaults: not counted
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
              "o_proj": (heads * hd, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    names = LLAMA_LINEARS if targets == "all-linear" else [t for t in targets if t in shapes]
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) + (shapes[m][1] if dora else 0) for m in names)
    return layers * per_layer


def params_from_hf_config(c: dict[str, Any]) -> Optional[int]:
    """Parameter count of a Llama-style decoder from its config dict; None for other architectures."""
    if c.get("model_type") not in LLAMA_LIKE:
        return None
    try:
        v, h, i = int(c["vocab_size"]), int(c["hidden_size"]), int(c["intermediate_size"])
        layers, heads = int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if c.get("attention_bias"):
        attn += heads * hd + 2 * kv * hd + h
    mlp = 3 * h * i + (2 * i + h if c.get("mlp_bias") else 0)
    per_layer = attn + mlp + 2 * h  # two RMSNorm weights
    embed = v * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return embed + layers * per_layer + h  # + the final norm


def params_from_safetensors_header(header: dict[str, Any]) -> int:
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


HF_CONFIG = "config.json"  # a save_pretrained folder's model config
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the header


def _unreadable(path: Path, why: str) -> ConfigError:
    return ConfigError([f"{path.name} is not a readable safetensors file: {why}; save the model again "
                        "(save_pretrained) or remove the file"])


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON); ConfigError when
    the file is truncated or is not safetensors."""
    try:
        size_on_disk = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _unreadable(path, f"it has {len(head)} bytes, fewer than the 8-byte header length")
            (size,) = struct.unpack("<Q", head)
            if size > min(size_on_disk - 8, SAFETENSORS_MAX_HEADER):
                raise _unreadable(path, f"its header says {size:,} bytes but only {size_on_disk - 8:,} follow "
                                        "(truncated?)")
            header = json.loads(f.read(size).decode("utf-8"))
    except OSError as e:
        raise _unreadable(path, f"{e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _unreadable(path, "its header is not JSON (truncated, or not a safetensors file)") from None
    ok = isinstance(header, dict) and all(
        name == "__metadata__" or (isinstance(t, dict) and isinstance(t.get("shape"), list)
                                   and all(type(d) is int and d >= 0 for d in t["shape"]))
        for name, t in header.items())
    if not ok:
        raise _unreadable(path, "its header does not list tensors with shapes")
    return header


def read_hf_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json: one JSON object; ConfigError otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError([f"{path.name} cannot be read ({e.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path.name} is not UTF-8 text; save the model again (save_pretrained)"]) from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConfigError([f"{path.name} is not valid JSON ({e}); save the model again (save_pretrained)"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path.name} holds a JSON {type(data).__name__}, not an object; save the model again "
                           "(save_pretrained)"])
    return data


def read_model_folder(folder: Path) -> tuple[dict[str, Any], Optional[int]]:
    """(config.json, parameter count from the safetensors headers or None) of a from_pretrained folder;
    ConfigError when from_pretrained could not read it either."""
    cfg_file = folder / HF_CONFIG
    if not cfg_file.is_file():
        raise ConfigError([f"the folder has no {HF_CONFIG}, which from_pretrained needs (save_pretrained writes "
                           "it); point model.name_or_path at a saved model folder"])
    hf = read_hf_config(cfg_file)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return hf, None
    return hf, sum(params_from_safetensors_header(_read_safetensors_header(s)) for s in shards)


def count_params(name_or_path: Optional[str], config: Optional[dict[str, Any]]
                 ) -> tuple[Optional[int], str, dict[str, Any]]:
    """(parameter count or None, where it came from, the HF config dict or {}) for the model section.
    ConfigError for a folder whose config.json or safetensors headers cannot be read."""
    hf: dict[str, Any] = dict(config or {})
    if name_or_path is not None:
        folder = Path(name_or_path)
        if not (folder / HF_CONFIG).is_file():
            return None, f"{name_or_path!r} has no safetensors or config.json to count parameters from", hf
        try:
            hf, n = read_model_folder(folder)
        except ConfigError as e:
            raise ConfigError([f"'model.name_or_path' = {name_or_path!r}: {p}" for p in e.problems]) from None
        if n is not None:
            return n, f"safetensors headers in {folder}", hf
    n = params_from_hf_config(hf)
    where = f"{name_or_path}/config.json" if name_or_path is not None else "model.config"
    return n, (f"{where}, Llama-style formula" if n else f"{where}: architecture not counted"), hf
