"""Negative selection rules (spec §3), with a scripted stand-in for the generation pool so
every rule is checked on answers whose right outcome is known."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.config import DecodingConfig, GenerateConfig
from recray.errors import ConfigError, RecrayError
from recray.generate import Policy
from recray.generate.negatives import (
    NEGATIVES_SCHEMA,
    make_negatives,
    negatives_decoding,
    random_titles,
    same_title,
    select_negatives,
)

CATALOG = pa.table({"item_id": [f"i{k}" for k in range(40)],
                    "title": [f"Movie {k} (19{50 + k})" for k in range(40)]})


def q(title):
    return f'"{title}"\n'


def test_selection_drops_positive_unparsable_duplicates_and_keeps_n_best():
    cands = [q("B"), "no quotes at all", q("a"), "   ", q("Pos"), q(" b "), q("C"), '"cut off']
    scores = [-2.0, -0.1, -3.0, -0.2, -0.5, -1.0, -4.0, -0.3]
    picked, counts = select_negatives(cands, scores, "pos", n=2)
    # Best first by score: "pos" (positive, case-insensitive), " b " (kept as "b"), "B"
    # (duplicate of b), "a"; "C" is beyond N.
    assert [(x.title, x.score, x.source) for x in picked] == [("b", -1.0, "self"),
                                                              ("a", -3.0, "self")]
    assert counts == {"unquoted": 1, "cut": 1, "unparsable": 1, "dropped_positive": 1,
                      "duplicates": 1, "beyond_n": 1}


def test_selection_short_of_n_and_grounding():
    ground = {"Toy Stroy": "Toy Story (1995)", "Heat": "Heat (1995)", "toy story": "Toy Story (1995)"}
    picked, counts = select_negatives([q("Toy Stroy"), q("toy story"), q("Heat")], [-1, -2, -3],
                                      "Heat (1995)", n=2, ground=ground)
    assert [x.title for x in picked] == ["Toy Story (1995)"]
    assert counts["grounded_changed"] == 3 and counts["duplicates"] == 1
    assert counts["dropped_positive"] == 1


def test_random_titles_are_distinct_uniform_excluding_and_seeded():
    titles = CATALOG["title"].to_pylist()
    exclude = {same_title(titles[0])}
    draws = [random_titles(np.random.default_rng(s), titles, 5, exclude) for s in range(400)]
    assert all(len(set(d)) == 5 and titles[0] not in d for d in draws)
    counts = np.bincount([titles.index(t) for d in draws for t in d], minlength=40)
    assert counts[0] == 0 and counts[1:].min() > 20          # every other title is drawn
    assert random_titles(np.random.default_rng(7), titles, 5, exclude) == draws[7]
    with pytest.raises(RecrayError, match="too few titles"):
        random_titles(np.random.default_rng(0), titles[:3], 3, exclude)


def test_negatives_decoding():
    greedy = DecodingConfig()
    assert negatives_decoding(greedy, 1, 0) == greedy
    with pytest.raises(ConfigError, match="mode to beam"):
        negatives_decoding(greedy, 2, 0)
    beam = negatives_decoding(DecodingConfig(mode="beam", num_beams=4), 4, 0)
    assert (beam.num_beams, beam.num_return, beam.num_candidates) == (8, 8, 8)
    sample = negatives_decoding(DecodingConfig(mode="sample"), 3, 5)
    assert (sample.n, sample.seed) == (6, 5)


class ScriptedPool:
    """Answers scripted per sample id, in the GenerationPool output format."""

    def __init__(self, answers: dict[str, list[tuple[str, float]]]):
        self.answers, self.calls, self.last_run = answers, [], {"prompts": len(answers)}
        self.catalogs = []

    def generate(self, prompts, policy, decoding=None, catalog_titles=None):
        self.calls.append(decoding)
        self.catalogs.append(catalog_titles)
        ids = sorted(prompts["sample_id"].to_pylist())
        return pa.table({"sample_id": ids,
                         "candidates": [[a for a, _ in self.answers[i]] for i in ids],
                         "scores": [[s for _, s in self.answers[i]] for i in ids]})


def samples_table(n):
    titles = CATALOG["title"].to_pylist()
    return pa.table({"sample_id": [f"s{k:02d}" for k in range(n)],
                     "prompt": [f"prompt {k}" for k in range(n)],
                     "target_title": [titles[k] for k in range(n)]})


def scripted(n, per_row=4):
    """Row k answers titles k+1..k+per_row, with descending scores: all parsable, distinct."""
    titles = CATALOG["title"].to_pylist()
    return {f"s{k:02d}": [(q(titles[(k + j) % 40]), -float(j)) for j in range(1, per_row + 1)]
            for k in range(n)}


def test_make_negatives_self_play_files_and_format(tmp_path):
    samples = samples_table(10)
    answers = scripted(10)
    answers["s03"] = [(q(samples["target_title"][3].as_py()), -0.1), ("garbage", -0.2)]
    pool = ScriptedPool(answers)
    cfg = GenerateConfig(n_negatives=2, decoding=DecodingConfig(mode="beam"))
    result = make_negatives(pool, samples, Policy("m"), CATALOG, cfg, tmp_path / "it1", seed=3)
    assert pool.calls[0].num_return == 4                         # 2N candidates decoded
    table = pq.read_table(tmp_path / "it1" / "negatives.parquet")
    assert table.schema == NEGATIVES_SCHEMA and table.equals(result.table)
    stats = json.loads((tmp_path / "it1" / "negatives_stats.json").read_text())
    assert stats == json.loads(json.dumps(result.stats))
    assert (stats["samples"], stats["rows"], stats["candidates"]) == (10, 10, 38)
    assert (stats["dropped_positive"], stats["unquoted"], stats["short_of_n"]) == (1, 1, 1)
    assert stats["filled_random"] == 2 and stats["beyond_n"] == 18
    rows = table.to_pylist()
    titles = CATALOG["title"].to_pylist()
    for k, row in enumerate(rows):
        assert row["chosen"] == q(titles[k])
        assert len(row["rejected"]) == 2 and row["chosen"] not in row["rejected"]
        assert all(r.startswith('"') and r.endswith('"\n') for r in row["rejected"])
    assert rows[0]["rejected"] == [q(titles[1]), q(titles[2])]
    assert rows[0]["rejected_scores"] == [-1.0, -2.0] and rows[0]["source"] == "self"
    assert rows[3]["source"] == "random" and rows[3]["rejected_scores"] == [None, None]
    assert pool.catalogs == [None]                               # unconstrained by default


def test_constrained_negatives_ask_the_pool_for_catalog_titles(tmp_path):
    pool = ScriptedPool(scripted(4))
    cfg = GenerateConfig(n_negatives=1, constrain_to_catalog=True)
    result = make_negatives(pool, samples_table(4), Policy("m"), CATALOG, cfg, tmp_path / "c", seed=0)
    assert pool.catalogs == [sorted(CATALOG["title"].to_pylist())]
    assert result.stats["constrain_to_catalog"] is True


def test_contamination_ratio_is_exact_and_seeded(tmp_path):
    samples, cfg = samples_table(20), GenerateConfig(n_negatives=2, random_ratio=0.25,
                                                     decoding=DecodingConfig(mode="beam"))
    runs = [make_negatives(ScriptedPool(scripted(20)), samples, Policy("m"), CATALOG, cfg,
                           tmp_path / str(i), seed=seed).table for i, seed in enumerate((1, 1, 2))]
    sources = [x for row in runs[0]["rejected_sources"].to_pylist() for x in row]
    assert sources.count("random") == 10 and sources.count("self") == 30   # 0.25 of 40
    assert runs[0].equals(runs[1]) and not runs[0].equals(runs[2])
    for row in runs[0].to_pylist():
        assert row["chosen"] not in row["rejected"] and len(set(row["rejected"])) == 2
        for source, score in zip(row["rejected_sources"], row["rejected_scores"]):
            assert (score is None) == (source == "random")
    assert {r["source"] for r in runs[0].to_pylist()} <= {"self", "random", "mixed"}


def test_random_source_needs_no_pool(tmp_path):
    cfg = GenerateConfig(n_negatives=3, source="random")
    result = make_negatives(None, samples_table(8), None, CATALOG, cfg, tmp_path, seed=0)
    assert result.table.num_rows == 8 and set(result.table["source"].to_pylist()) == {"random"}
    assert result.stats["filled_random"] == 0 and result.stats["decoding"] is None


def test_without_fill_rows_keep_fewer_and_empty_rows_are_dropped(tmp_path):
    samples = samples_table(3)
    answers = scripted(3)
    answers["s01"] = [("no title", -1.0)]
    answers["s02"] = [(q("Movie 30 (1980)"), -1.0)]
    cfg = GenerateConfig(n_negatives=2, fill_short=False, decoding=DecodingConfig(mode="beam"))
    result = make_negatives(ScriptedPool(answers), samples, Policy("m"), CATALOG, cfg, tmp_path, 0)
    assert result.table["sample_id"].to_pylist() == ["s00", "s02"]
    assert [len(r) for r in result.table["rejected"].to_pylist()] == [2, 1]
    assert result.stats["rows_dropped_no_negative"] == 1 and result.stats["short_of_n"] == 2


def test_bad_inputs(tmp_path):
    cfg = GenerateConfig()
    with pytest.raises(RecrayError, match="target_title"):
        make_negatives(None, samples_table(2).drop_columns(["target_title"]), None, CATALOG,
                       cfg.model_copy(update={"source": "random"}), tmp_path, 0)
    with pytest.raises(RecrayError, match="need a generation pool"):
        make_negatives(None, samples_table(2), None, CATALOG, cfg, tmp_path, 0)


def test_semantic_negatives_are_the_nearest_catalog_titles_skipping_target_and_history(tmp_path):
    """RosePO's negatives: the catalog titles nearest each target by the grounding embedder,
    checked against a brute-force L2 order of the same embeddings; a history title that
    would be among them is skipped (and counted)."""
    from recray.assets import embedder_dir
    from recray.evaluate.grounding import SentenceEmbedder

    titles = ["Toy Story (1995)", "Toy Story 2 (1999)", "Toy Soldiers (1991)", "Heat (1995)",
              "Heat and Dust (1983)", "Alien (1979)", "Aliens (1986)", "Fargo (1996)",
              "Casablanca (1942)", "Clueless (1995)"]
    catalog = pa.table({"item_id": [f"i{k}" for k in range(len(titles))], "title": titles})
    samples = pa.table({"sample_id": ["a", "b", "c"], "prompt": ["p a", "p b", "p c"],
                        "target_title": ["Toy Story (1995)", "Alien (1979)", "Heat (1995)"],
                        "history_titles": [["Fargo (1996)"], ["Aliens (1986)"], []]})
    cfg = GenerateConfig(n_negatives=2, source="semantic")
    result = make_negatives(None, samples, None, catalog, cfg, tmp_path, seed=0)

    ordered = sorted(titles)
    emb = SentenceEmbedder(embedder_dir()).embed(ordered)
    expected = []
    for target, history in zip(samples["target_title"].to_pylist(),
                                samples["history_titles"].to_pylist()):
        dist = ((emb - emb[ordered.index(target)]) ** 2).sum(axis=1)
        near = [ordered[i] for i in np.argsort(dist, kind="stable")]
        expected.append([q(t) for t in near if t != target and t not in history][:2])
    rows = result.table.to_pylist()
    assert [r["rejected"] for r in rows] == expected
    assert rows[0]["rejected"][0] == q("Toy Story 2 (1999)")
    assert q("Aliens (1986)") not in rows[1]["rejected"]          # in b's history
    assert result.stats["skipped_history"] >= 1
    assert all(r["source"] == "semantic" and r["rejected_scores"] == [None, None] for r in rows)
    assert result.stats["filled_random"] == 0


def test_semantic_negatives_need_history_titles_and_catalog_targets(tmp_path):
    cfg = GenerateConfig(n_negatives=1, source="semantic")
    with pytest.raises(RecrayError, match="history_titles"):
        make_negatives(None, samples_table(2), None, CATALOG, cfg, tmp_path / "a", seed=0)
    samples = samples_table(2).append_column("history_titles", pa.array([[], []], pa.list_(pa.string())))
    samples = samples.set_column(2, "target_title", pa.array(["Movie 1 (1951)", "Not A Title"]))
    with pytest.raises(RecrayError, match="Not A Title"):
        make_negatives(None, samples, None, CATALOG, cfg, tmp_path / "b", seed=0)
