"""DeepSpeed ZeRO config from the run config, checked against the Ray scaling config.

The dict goes to TRL/transformers through `deepspeed=`; "auto" values are filled in by
transformers from the training arguments, so batch sizes and precision have one source.
CPU workers talk over the gloo group Ray Train creates, GPU workers over NCCL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from recray.config import TrainConfig
from recray.errors import ConfigError


def precision(cfg: TrainConfig) -> str:
    """fp32 or bf16: "auto" is bf16 on GPU workers and on CPUs with bf16 in hardware, fp32
    on other CPUs (where bf16 is emulated, slowly). A CPU cluster's workers are assumed to
    have the driver's CPU."""
    if cfg.precision == "auto":
        from recray.runtime import native_bf16
        return "bf16" if cfg.scaling.use_gpu or native_bf16() else "fp32"
    return cfg.precision


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_file(path: str) -> dict:
    try:
        tree = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed.config_file: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed.config_file: {path} is not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"train.deepspeed.config_file: {path} must hold a JSON object")
    return tree


def deepspeed_config(cfg: TrainConfig) -> dict | None:
    """The DeepSpeed dict for `deepspeed=`, or None for plain DDP. Raises ConfigError when
    it contradicts the scaling, batch or precision settings."""
    ds = cfg.deepspeed
    if ds.stage is None and ds.config_file is None:
        if ds.offload_optimizer:
            raise ConfigError("train.deepspeed.offload_optimizer needs train.deepspeed.stage 1, 2 or 3")
        return None
    zero: dict = {"stage": ds.stage if ds.stage is not None else 0}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if zero["stage"] == 3:
        # ZeRO-3 shards the weights: gather them so save_model writes whole safetensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    generated = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
    }
    if ds.config_file is not None:
        user = _read_file(ds.config_file)
        user_stage = user.get("zero_optimization", {}).get("stage")
        if ds.stage is not None and user_stage is not None and user_stage != ds.stage:
            raise ConfigError(f"train.deepspeed.stage is {ds.stage} but {ds.config_file} sets "
                              f"zero_optimization.stage {user_stage}")
        generated = _merge(generated, user)
    check(generated, cfg)
    return generated


def check(ds: dict, cfg: TrainConfig) -> None:
    """A DeepSpeed dict must agree with the batch, worker and precision settings."""
    world = cfg.scaling.num_workers
    expected = {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world,
    }
    for key, want in expected.items():
        got = ds.get(key, "auto")
        if got != "auto" and got != want:
            raise ConfigError(
                f"DeepSpeed {key}={got} contradicts the training config: per_device_batch_size "
                f"{cfg.per_device_batch_size} x gradient_accumulation_steps "
                f"{cfg.gradient_accumulation_steps} x scaling.num_workers {world} gives {want}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None) and stage == 0:
        raise ConfigError("DeepSpeed offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
    want_bf16 = precision(cfg) == "bf16"
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != want_bf16:
        raise ConfigError(f"DeepSpeed bf16.enabled={bf16} contradicts train.precision "
                          f"({precision(cfg)})")
    if ds.get("fp16", {}).get("enabled") not in (False, None, "auto"):
        raise ConfigError("DeepSpeed fp16 is not supported: use train.precision=bf16 or fp32")
    if not cfg.scaling.use_gpu and offload not in ("none", None, "cpu"):
        raise ConfigError(f"DeepSpeed offload_optimizer.device={offload} needs GPU workers "
                          f"(train.scaling.use_gpu is false)")


def extensions_dir() -> str:
    """Where DeepSpeed caches its JIT-compiled ops (deepspeed_shm_comm takes about 70 s once)."""
    from recray.assets import home
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(home() / "torch_extensions")
