"""Model and adapter folders: checks before any worker starts, loading inside workers,
and merging an adapter into its base (a separate Ray task, so that ZeRO-3 workers never
have to load a model after training).

A model folder is an HF causal LM saved as safetensors with its tokenizer; an adapter
folder is a PEFT adapter (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import ray

from recray.errors import RecrayError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def check_model_dir(path: str | Path, trust_remote_code: bool = False):
    """The model's config, after checking the folder is a safetensors causal LM with a tokenizer."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not path.is_dir():
        raise RecrayError(f"model folder {path} does not exist")
    if not (path / "config.json").exists():
        raise RecrayError(f"model folder {path} has no config.json (not a transformers model)")
    if not list(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise RecrayError(f"model folder {path} has no *.safetensors weights"
                          + (f" (found {', '.join(found)}; only safetensors are loaded)" if found else ""))
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise RecrayError(f"model folder {path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise RecrayError(f"model folder {path}: config.json cannot be read: {e}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise RecrayError(f"model folder {path}: model_type '{config.model_type}' is not a causal LM")
    return config


def _linear_shapes(config, trust_remote_code: bool) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every Linear module, from a weightless (meta) model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def check_adapter_dir(path: str | Path, model_config, trust_remote_code: bool = False) -> None:
    """Raise unless `path` is a LoRA adapter whose every matrix fits a module of the model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise RecrayError(f"adapter folder {path} does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).exists():
            raise RecrayError(f"adapter folder {path} has no {name} (not a PEFT adapter saved "
                              f"as safetensors)")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise RecrayError(f"adapter {path}: peft_type {config.get('peft_type')!r} is not LORA")
    shapes = _linear_shapes(model_config, trust_remote_code)
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            match = _LORA_KEY.match(key)
            if match is None:
                continue
            module, ab = match["module"], match["ab"]
            if module not in shapes:
                raise RecrayError(f"adapter {path} does not match the model: it adapts "
                                  f"'{module}', which the model does not have")
            in_f, out_f = shapes[module]
            shape = f.get_slice(key).get_shape()
            dim, want = (shape[1], in_f) if ab == "A" else (shape[0], out_f)
            if dim != want:
                raise RecrayError(f"adapter {path} does not match the model: {key} has shape "
                                  f"{tuple(shape)}, but '{module}' is {in_f} -> {out_f}")
    if not any(_LORA_KEY.match(k) for k in keys):
        raise RecrayError(f"adapter {path}: {ADAPTER_WEIGHTS} holds no LoRA matrices")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def load_model(model_dir: str, dtype: str, trust_remote_code: bool):
    """A causal LM from a safetensors folder (never pickle files)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), use_safetensors=True,
        trust_remote_code=trust_remote_code)


def compact_lm_head(enabled: bool) -> None:
    """Whether TRL's fused LM head projects only the positions that carry a label on a CPU
    too (train.compact_lm_head), for this process.

    TRL (pinned 1.16) compacts to the labelled positions only where its Triton kernels run
    (CUDA, XPU) and elsewhere scores every position, to keep tile shapes fixed for
    compilers such as Neuron's. A CPU runs eagerly, so that is waste: a recray row is a
    ~130-token prompt with no labels and a ~15-token answer, and ~90% of the vocabulary
    projection (forward and backward) is thrown away. Compacting gives the same loss and
    gradients (tests/test_train_units.py) and halves a LoRA step here (docs/training.md)."""
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_use_triton", None)
    if current is None:      # the pin moved: say so rather than silently train slower
        raise RecrayError("trl.trainer.utils has no _use_triton: train.compact_lm_head needs "
                          "the TRL pinned in pyproject.toml (set it false to train without)")
    original = getattr(current, "recray_original", current)
    if not enabled:
        trl_utils._use_triton = original
        return

    def compact(device) -> bool:       # in trl.trainer.utils only add_fused_lm_head reads it
        return device.type == "cpu" or original(device)
    compact.recray_original = original
    trl_utils._use_triton = compact


def lora_config(cfg):
    """peft.LoraConfig from recray's train.lora section."""
    from peft import LoraConfig as PeftLoraConfig
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM", bias="none")


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str,
                  trust_remote_code: bool = False) -> str:
    """base + adapter -> a plain transformers folder (safetensors + tokenizer) in out_dir."""
    from peft import PeftModel
    from transformers import AutoConfig

    dtype = str(getattr(AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code),
                        "dtype", None) or "float32").replace("torch.", "")
    model = load_model(base_dir, dtype, trust_remote_code)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    staging = Path(str(out_dir) + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    copy_tokenizer(adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists()
                   else base_dir, staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return str(out_dir)


@ray.remote(num_cpus=1, max_retries=1)
def merge_task(base_dir: str, adapter_dir: str, out_dir: str, trust_remote_code: bool = False) -> str:
    return merge_adapter(base_dir, adapter_dir, out_dir, trust_remote_code)
