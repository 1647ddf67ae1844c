"""Model-state memory per GPU under ZeRO (parameters, gradients, optimizer states).

The ZeRO paper's formulas (Rajbhandari et al. 2020, section 5.1) for mixed-precision Adam
(2-byte params and grads, K = 12 bytes of fp32 master weights + momentum + variance per param),
with Psi parameters on N data-parallel ranks:

    stage 0: 16 Psi     stage 1: 4 Psi + 12 Psi/N     stage 2: 2 Psi + 14 Psi/N     stage 3: 16 Psi/N

generalised here to fp32 training (4-byte params and grads, K = 8: no master copy), 8-bit
optimizers (1 byte per moment), frozen parameters (no gradient, no optimizer state: LoRA), and
ZeRO-Offload (optimizer states -> CPU; with offload_param also the parameters). Activations,
buffers and fragmentation come on top: this is a floor, not a guarantee.

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


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    trainable: int
    world: int
    gpu_params: float  # bytes per GPU
    gpu_grads: float
    gpu_optim: float
    cpu_per_rank: float  # bytes per rank held in CPU memory by offload

    @property
    def gpu_total(self) -> float:
        return self.gpu_params + self.gpu_grads + self.gpu_optim

    def describe(self) -> str:
        text = (f"{human(self.gpu_total)} per rank/GPU (params {human(self.gpu_params)} + grads {human(self.gpu_grads)} + "
                f"optimizer states {human(self.gpu_optim)}) for {self.params:,} params "
                f"({self.trainable:,} trainable) on {self.world} rank(s)")
        if self.cpu_per_rank:
            text += f"; offloaded to CPU memory: {human(self.cpu_per_rank)} per rank"
        return text


def human(n_bytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def optimizer_state_bytes(optimizer: str, mixed_precision: bool) -> int:
    """Bytes of optimizer state per trainable parameter (K in the ZeRO paper)."""
    moments = 2 if "8bit" in optimizer.lower() else 8  # Adam's m and v: 1 or 4 bytes each
    return moments + (4 if mixed_precision else 0)  # + the fp32 master copy


def estimate(params: int, trainable: int, world: int, stage: int, dtype: str = "bf16",
             optimizer: str = "adamw", offload_optimizer: bool = False, offload_param: bool = False,
             frozen_bits: Optional[int] = None) -> MemoryEstimate:
    """Bytes per GPU. ``frozen_bits`` = storage of frozen params (4 for QLoRA); default = dtype."""
    mixed = dtype in ("bf16", "fp16")
    p = g = 2 if mixed else 4
    k = optimizer_state_bytes(optimizer, mixed)
    n = world
    frozen = (params - trainable) * (p if frozen_bits is None else frozen_bits / 8)
    params_b = (p * trainable + frozen) / (n if stage == 3 else 1)
    grads_b = g * trainable / (n if stage >= 2 else 1)
    optim_b = k * trainable / (n if stage >= 1 else 1)
    cpu = 0.0
    if offload_optimizer:
        cpu += optim_b
        optim_b = 0.0
    if offload_param:
        cpu += params_b
        params_b = 0.0
    return MemoryEstimate(params, trainable, world, params_b, grads_b, optim_b, cpu)


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
