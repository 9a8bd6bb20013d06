"""Shared fixtures. One local Ray instance serves the whole test session: worker start-up
is the slow part of Ray on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def ml100k_prepared(ray_session, tmp_path_factory):
    """The embedded MovieLens-100k prepared with the default config, once per session."""
    from recray.config import DataConfig
    from recray.data.loaders import load
    from recray.data.prepare import prepare
    out = tmp_path_factory.mktemp("prepared") / "ml100k"
    stats = prepare(load(DataConfig()), DataConfig(), out)
    return out, stats


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama with the real SmolLM2 tokenizer, saved as safetensors: loop mechanics
    without the cost of the real model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recray.assets import model_dir
    out = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_run_overrides(tiny_model) -> list[str]:
    """A whole SPRec run (T=1) small enough for CI: one training worker, greedy decoding."""
    return [f"loop.base_model={tiny_model}", "loop.iterations=1", "loop.samples_per_iteration=8",
            "data.n_train=16", "data.n_valid=4", "data.n_test=4", "data.history_len=2",
            "train.scaling.num_workers=1", "train.per_device_batch_size=8", "train.save_steps=1",
            "train.sft.epochs=1", "generate.backend=hf", "evaluate.decoding.mode=greedy",
            "generate.decoding.max_new_tokens=8", "evaluate.decoding.max_new_tokens=8"]


@pytest.fixture(scope="session")
def tiny_pi0_run(ray_session, tiny_run_overrides, tmp_path_factory) -> Path:
    """One BIGRec run of the tiny model, trained once per session: loop tests start from its
    π_0 (loop.init_from) and its prepared split instead of each paying for their own."""
    from recray.config import load_config
    from recray.job import run_job
    cfg = load_config(None, [*tiny_run_overrides, "loop.method=bigrec", "tracking.mlflow=false"])
    return run_job(cfg, tmp_path_factory.mktemp("pi0") / "bigrec").root


@pytest.fixture(scope="session")
def tiny_pi0(tiny_pi0_run, tiny_run_overrides) -> list[str]:
    """tiny_run_overrides starting from tiny_pi0_run's π_0."""
    return [*tiny_run_overrides, f"loop.init_from={tiny_pi0_run}"]
