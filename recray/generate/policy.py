"""A policy to generate with: a model folder and, optionally, a LoRA adapter on top.

`check_policy` finds what would otherwise fail deep inside an engine: a missing folder, an
adapter whose matrices do not match the model's layers, a rank above what the vLLM engine
was started for. It reads only file headers, never the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from recray.errors import ConfigError, RecrayError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Policy:
    model: str                  # HF safetensors folder (base or merged)
    adapter: str | None = None  # PEFT LoRA adapter folder


def generation_dtype(cfg, on_gpu: bool) -> str:
    """generate.dtype resolved on the engine's own machine: auto is bf16 on a GPU and on a
    CPU with bf16 in hardware (half the time of fp32 there), fp32 on other CPUs."""
    if cfg.dtype != "auto":
        return cfg.dtype
    from recray.runtime import native_bf16
    return "bfloat16" if on_gpu or native_bf16() else "float32"


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_model(folder: str | Path) -> None:
    path = Path(folder)
    if not (path / "config.json").exists() or not list(path.glob("*.safetensors")):
        raise RecrayError(f"model folder {path} must hold config.json and *.safetensors "
                          f"(a Hugging Face folder saved with safe_serialization)")


def _base_key(adapter_key: str) -> tuple[str, str] | None:
    """('model.layers.0.self_attn.q_proj.weight', 'A'|'B') for a PEFT LoRA key, else None."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if adapter_key.endswith(suffix):
            module = adapter_key[: -len(suffix)].removeprefix("base_model.model.")
            return f"{module}.weight", part
    return None


def check_adapter(adapter: str | Path, model: str | Path, max_rank: int | None) -> int:
    """The adapter's rank, after checking that every LoRA matrix fits the model's layer."""
    path = Path(adapter)
    if not (path / "adapter_config.json").exists() or not (path / ADAPTER_WEIGHTS).exists():
        raise RecrayError(f"adapter folder {path} must hold adapter_config.json and "
                          f"{ADAPTER_WEIGHTS} (PEFT save_pretrained with safe_serialization)")
    rank = int(json.loads((path / "adapter_config.json").read_text()).get("r", 0))
    base = _shapes(sorted(Path(model).glob("*.safetensors")))
    for key, shape in _shapes([path / ADAPTER_WEIGHTS]).items():
        found = _base_key(key)
        if found is None:
            continue
        base_key, part = found
        if base_key not in base:
            raise RecrayError(f"adapter {path} does not fit model {model}: it adapts "
                              f"{base_key}, which the model does not have; use the base model "
                              f"the adapter was trained on")
        out_dim, in_dim = base[base_key][0], base[base_key][-1]
        fits = shape[-1] == in_dim if part == "A" else shape[0] == out_dim
        if not fits:
            raise RecrayError(f"adapter {path} does not fit model {model}: {key} has shape "
                              f"{list(shape)} but {base_key} is {list(base[base_key])}; use the "
                              f"base model the adapter was trained on")
        rank = max(rank, shape[0] if part == "A" else shape[-1])
    if max_rank is not None and rank > max_rank:
        raise ConfigError(f"adapter {path} has LoRA rank {rank} > generate.max_lora_rank="
                          f"{max_rank}; set generate.max_lora_rank={rank}")
    return rank


def check_policy(policy: Policy, max_rank: int | None) -> None:
    check_model(policy.model)
    if policy.adapter is not None:
        check_adapter(policy.adapter, policy.model, max_rank)
