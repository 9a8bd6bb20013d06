"""End to end on the real model: self-play negatives for 32 MovieLens-100k train prompts
from SmolLM2-135M with a LoRA adapter, on both backends; greedy answers agree."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from recray.config import GenerateConfig
from recray.data.prompts import build_completion
from recray.generate import GenerationPool, Policy
from recray.generate.negatives import make_negatives

N_PROMPTS = 32


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """LoRA r=16 on all projections; lora_B drawn small but non-zero, so answers change
    while staying titles."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recray.assets import model_dir
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir()),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    out = tmp_path_factory.mktemp("real-adapter")
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def runs(ml100k_prepared, adapter, tmp_path_factory):
    from recray.assets import model_dir
    data, _ = ml100k_prepared
    samples = pq.read_table(data / "train").slice(0, N_PROMPTS)
    base = str(model_dir())
    out = {}
    for backend in ("hf", "vllm"):
        # fp32: the backends agree there (bf16 kernels round differently)
        cfg = GenerateConfig(backend=backend, cpus_per_actor=0.5, threads_per_actor=2,
                             dtype="float32")
        with GenerationPool(cfg, base) as pool:
            result = make_negatives(pool, samples, Policy(base, adapter), data / "catalog.parquet",
                                    cfg, tmp_path_factory.mktemp(backend), seed=0)
            base_answers = (pool.generate(samples, Policy(base)) if backend == "vllm" else None)
            out[backend] = {"result": result, "base": base_answers}
    out["samples"] = samples
    return out


@pytest.mark.real
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_negatives_for_32_real_prompts(runs, backend):
    result, samples = runs[backend]["result"], runs["samples"]
    table = pq.read_table(result.path)
    stats = json.loads((result.path.parent / "negatives_stats.json").read_text())
    assert table.num_rows == N_PROMPTS and stats["candidates"] == N_PROMPTS   # greedy: 1 each
    assert table["sample_id"].to_pylist() == samples["sample_id"].to_pylist()
    titles = samples["target_title"].to_pylist()
    assert table["chosen"].to_pylist() == [build_completion(t) for t in titles]
    self_rows = 0
    for row in table.to_pylist():
        assert len(row["rejected"]) == 1 and row["rejected"][0] != row["chosen"]
        assert row["rejected"][0].startswith('"') and row["rejected"][0].endswith('"\n')
        self_rows += row["source"] == "self"
        assert (row["rejected_scores"][0] is None) == (row["source"] == "random")
    # Every prompt either gave a usable self-play negative or is counted as short and filled.
    lost = stats["unparsable"] + stats["unquoted"] + stats["dropped_positive"]
    assert self_rows == N_PROMPTS - lost == N_PROMPTS - stats["filled_random"]
    assert stats["short_of_n"] == stats["filled_random"] and self_rows >= N_PROMPTS // 2


@pytest.mark.real
def test_backends_agree_on_real_greedy_negatives(runs):
    hf, vl = (runs[b]["result"].table.to_pylist() for b in ("hf", "vllm"))
    same = sum(a["rejected"] == b["rejected"] for a, b in zip(hf, vl))
    assert same >= N_PROMPTS - 2, f"only {same}/{N_PROMPTS} greedy negatives agree"
    for a, b in zip(hf, vl):
        if a["rejected"] == b["rejected"] and a["source"] == "self":
            assert a["rejected_scores"][0] == pytest.approx(b["rejected_scores"][0], abs=0.05)


@pytest.mark.real
def test_adapter_changes_real_answers(runs):
    """The same vLLM engine served the adapter, then the base model (no restart)."""
    base = runs["vllm"]["base"]
    assert base.num_rows == N_PROMPTS
    adapted = {r["sample_id"]: r["rejected"][0] for r in runs["vllm"]["result"].table.to_pylist()
               if r["source"] == "self"}
    differ = sum(adapted[s] != build_completion_of(c[0])
                 for s, c in zip(base["sample_id"].to_pylist(), base["candidates"].to_pylist())
                 if s in adapted)
    assert differ >= 1


def build_completion_of(answer: str) -> str | None:
    from recray.data.prompts import parse_title
    title, status = parse_title(answer)
    return build_completion(title) if status == "quoted" else None
