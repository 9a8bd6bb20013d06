"""Negatives for DPO (spec §3): self-play answers of the policy, random catalog items, or a
mix; or, for RosePO, the catalog titles nearest the target (`semantic`).

    2N candidates (beam/sample; greedy when N = 1) -> parse each quoted title -> drop
    unparsable ones -> [ground to the nearest catalog title] -> drop the positive ->
    deduplicate -> the N best by score

then, by config: a share ρ (`random_ratio`) of all self-play negatives is replaced by
random catalog items, and rows left with fewer than N are topped up with random items
(`fill_short`; else they keep fewer, and rows with none are dropped). Random items are
uniform over the catalog's distinct titles, never the positive nor a title the row
already has, drawn from a generator keyed by (seed, sample id): the same seed gives the
same negatives whatever the batching. Semantic negatives are the N catalog titles
nearest the target title by the grounding embedder (L2, as grounding ranks), skipping the
target itself and the sample's history titles (counted). Every drop is counted in
negatives_stats.json.

Titles are compared case- and whitespace-insensitively. `chosen` and `rejected` are
completions in the training format (recray.data.prompts.build_completion).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recray.config import DecodingConfig, GenerateConfig
from recray.data.prompts import build_completion, parse_title
from recray.errors import ConfigError, RecrayError
from recray.generate.policy import Policy
from recray.generate.pool import write_parquet
from recray.generate.seeding import keyed_rng


NEGATIVES_FILE = "negatives.parquet"
STATS_FILE = "negatives_stats.json"

NEGATIVES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())),
    ("rejected_scores", pa.list_(pa.float64())),   # log-prob under the policy; null if random
    ("rejected_sources", pa.list_(pa.string())),   # "self" | "random" | "semantic", per negative
    ("source", pa.string()),                       # one of those, or "mixed"
])


def same_title(title: str) -> str:
    """The key titles are compared by: case-folded, whitespace collapsed."""
    return " ".join(title.split()).casefold()


@dataclass
class Negative:
    title: str
    score: float | None         # None: not generated (random or semantic)
    source: str                 # "self" | "random" | "semantic"


def select_negatives(candidates: list[str], scores: list[float], positive: str, n: int,
                     ground: dict[str, str] | None = None) -> tuple[list[Negative], Counter]:
    """The n best distinct parsed titles that are not the positive, and what was dropped."""
    counts: Counter = Counter()
    picked: list[Negative] = []
    seen = set()
    for i in sorted(range(len(candidates)), key=lambda i: -scores[i]):
        title, status = parse_title(candidates[i])
        if status != "quoted":          # neither a line without quotes nor a cut-off title
            counts[status if status in ("unparsable", "cut") else "unquoted"] += 1
            continue
        if ground is not None:
            counts["grounded_changed"] += ground[title] != title
            title = ground[title]
        key = same_title(title)
        if key == same_title(positive):
            counts["dropped_positive"] += 1
        elif key in seen:
            counts["duplicates"] += 1
        elif len(picked) == n:
            counts["beyond_n"] += 1
        else:
            seen.add(key)
            picked.append(Negative(title, scores[i], "self"))
    return picked, counts


def random_titles(rng: np.random.Generator, titles: list[str], k: int,
                  exclude: set[str]) -> list[str]:
    """k distinct titles drawn uniformly from `titles`, none of whose keys is in `exclude`."""
    out, taken = [], set(exclude)
    if len({same_title(t) for t in titles} - taken) < k:
        raise RecrayError(f"the catalog has too few titles to draw {k} random negatives")
    while len(out) < k:
        title = titles[int(rng.integers(len(titles)))]
        if same_title(title) not in taken:
            taken.add(same_title(title))
            out.append(title)
    return out


def negatives_decoding(d: DecodingConfig, n: int, seed: int) -> DecodingConfig:
    """Decoding for 2N candidates: greedy (N = 1 only), 2N beams, or 2N samples."""
    if d.mode == "greedy":
        if n > 1:
            raise ConfigError(f"generate.n_negatives={n} needs 2N candidates: set "
                              f"generate.decoding.mode to beam (the paper's) or sample")
        return d
    if d.mode == "beam":
        return d.model_copy(update={"num_beams": max(d.num_beams, 2 * n), "num_return": 2 * n})
    return d.model_copy(update={"n": 2 * n, "seed": seed})


def _read(table_or_path, what: str) -> pa.Table:
    if isinstance(table_or_path, pa.Table):
        return table_or_path
    if isinstance(table_or_path, (str, Path)):
        return pq.read_table(table_or_path)
    if hasattr(table_or_path, "to_arrow_refs"):
        import ray
        return pa.concat_tables(ray.get(table_or_path.to_arrow_refs()))
    raise TypeError(f"{what} must be a pa.Table, Parquet path or Ray Dataset")


def _catalog_space(catalog_titles: list[str]):
    """(embedder, catalog embeddings): grounding's (sentence embedder, cached per catalog)."""
    from recray.assets import embedder_dir, home
    from recray.evaluate.grounding import SentenceEmbedder, catalog_embeddings
    embedder = SentenceEmbedder(embedder_dir())
    return embedder, catalog_embeddings(embedder, catalog_titles, home() / "cache" / "embeddings")


def _ground_map(parsed: set[str], catalog_titles: list[str]) -> dict[str, str]:
    """Each title -> its nearest catalog title (sentence embedder, L2, spec §4)."""
    from recray.evaluate.grounding import rank_catalog
    if not parsed:
        return {}
    queries = sorted(parsed)
    embedder, items = _catalog_space(catalog_titles)
    top, _ = rank_catalog(embedder.embed(queries), items, np.full(len(queries), -1), topk=1)
    return {q: catalog_titles[row[0]] for q, row in zip(queries, top)}


def semantic_negatives(positives: list[str], histories: list[list[str]], titles: list[str],
                       n: int) -> tuple[list[list[Negative]], int]:
    """Per sample, the n catalog titles nearest its target (RosePO's negatives), skipping
    the target and its history titles; and how many history titles were skipped."""
    from recray.evaluate.grounding import rank_catalog
    index = {same_title(t): i for i, t in enumerate(titles)}
    _, items = _catalog_space(titles)
    targets = [index.get(same_title(p)) for p in positives]
    missing = [p for p, i in zip(positives, targets) if i is None]
    if missing:
        raise RecrayError(f"{len(missing)} target title(s) are not catalog titles, e.g. "
                          f"{missing[0]!r}: semantic negatives are the catalog's nearest titles")
    longest = max((len(h) for h in histories), default=0)
    top, _ = rank_catalog(items[targets], items, np.full(len(targets), -1),
                          topk=min(len(titles), n + 1 + longest))
    rows, skipped = [], 0
    for positive, history, near in zip(positives, histories, top):
        own = {same_title(positive)}
        seen = {same_title(h) for h in history} - own
        picked = []
        for i in near:
            key = same_title(titles[i])
            if key in own:
                continue
            if key in seen:
                skipped += 1
                continue
            picked.append(Negative(titles[i], None, "semantic"))
            if len(picked) == n:
                break
        rows.append(picked)
    return rows, skipped


def _contaminate(rows: list[list[Negative]], positives: list[str], sample_ids: list[str],
                 titles: list[str], ratio: float, seed: int) -> int:
    """Replace round(ratio * #self negatives) of them, chosen uniformly, by random items."""
    where = [(r, j) for r, negs in enumerate(rows) for j, neg in enumerate(negs)
             if neg.source == "self"]
    k = int(round(ratio * len(where)))
    chosen = keyed_rng(seed, "contamination").choice(len(where), size=k, replace=False)
    for r, j in sorted(where[i] for i in chosen):
        exclude = {same_title(positives[r])} | {same_title(n.title) for n in rows[r]}
        rng = keyed_rng(seed, f"contamination:{sample_ids[r]}:{j}")
        rows[r][j] = Negative(random_titles(rng, titles, 1, exclude)[0], None, "random")
    return k


def _fill(negs: list[Negative], positive: str, sample_id: str, titles: list[str], n: int,
          seed: int) -> list[Negative]:
    exclude = {same_title(positive)} | {same_title(x.title) for x in negs}
    extra = random_titles(keyed_rng(seed, f"random:{sample_id}"), titles, n - len(negs), exclude)
    return negs + [Negative(t, None, "random") for t in extra]


def _row_source(negs: list[Negative]) -> str:
    kinds = {x.source for x in negs}
    return kinds.pop() if len(kinds) == 1 else "mixed"


@dataclass
class NegativesResult:
    table: pa.Table
    stats: dict
    path: Path


def make_negatives(pool, train_samples, policy: Policy | None, catalog, cfg: GenerateConfig,
                   output_dir: str | Path, seed: int) -> NegativesResult:
    """Write output_dir/negatives.parquet and negatives_stats.json; return both.

    `pool` (a GenerationPool) and `policy` are used only when cfg.source is "self".
    `train_samples` needs sample_id, prompt, target_title (history_titles to shorten long
    prompts); `catalog` needs title.
    """
    started = time.time()
    samples, n = _read(train_samples, "train_samples"), cfg.n_negatives
    titles = sorted({t for t in _read(catalog, "catalog").column("title").to_pylist() if t})
    missing = [c for c in ("sample_id", "prompt", "target_title") if c not in samples.column_names]
    if missing:
        raise RecrayError(f"train samples lack column(s) {missing} (a `recray prepare` split has them)")
    ids = samples.column("sample_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise RecrayError("train samples hold duplicate sample_id values")
    positives = samples.column("target_title").to_pylist()
    counts: Counter = Counter()
    run: dict = {}
    if cfg.source == "self":
        if pool is None or policy is None:
            raise RecrayError("self-play negatives need a generation pool and a policy")
        generated = pool.generate(samples, policy, negatives_decoding(cfg.decoding, n, seed),
                                  catalog_titles=titles if cfg.constrain_to_catalog else None)
        run = dict(pool.last_run)
        found = dict(zip(generated.column("sample_id").to_pylist(),
                         zip(generated.column("candidates").to_pylist(),
                             generated.column("scores").to_pylist())))
        ground = None
        if cfg.ground:
            parsed = {t for cands, _ in found.values() for t, s in map(parse_title, cands)
                      if s == "quoted"}
            ground = _ground_map(parsed, titles)
        rows = []
        for sid, positive in zip(ids, positives):
            cands, scores = found[sid]
            counts["candidates"] += len(cands)
            picked, c = select_negatives(cands, scores, positive, n, ground)
            counts.update(c)
            counts["short_of_n"] += len(picked) < n
            rows.append(picked)
        counts["contaminated"] = _contaminate(rows, positives, ids, titles, cfg.random_ratio, seed)
    elif cfg.source == "semantic":
        if "history_titles" not in samples.column_names:
            raise RecrayError("semantic negatives skip each sample's history titles: the train "
                              "samples need a history_titles column (a `recray prepare` split has it)")
        rows, counts["skipped_history"] = semantic_negatives(
            positives, samples.column("history_titles").to_pylist(), titles, n)
        counts["short_of_n"] = sum(len(r) < n for r in rows)
    else:
        rows = [[] for _ in ids]
    if cfg.source == "random" or cfg.fill_short:
        for r, (sid, positive) in enumerate(zip(ids, positives)):
            missing = n - len(rows[r])
            if missing > 0:
                counts["filled_random"] += missing if cfg.source != "random" else 0
                rows[r] = _fill(rows[r], positive, sid, titles, n, seed)
    keep = [r for r, negs in enumerate(rows) if negs]
    counts["rows_dropped_no_negative"] = len(ids) - len(keep)
    table = _negatives_table(samples, rows, keep)
    stats = {"samples": len(ids), "rows": table.num_rows, "n_negatives": n, "source": cfg.source,
             "random_ratio": cfg.random_ratio, "ground": cfg.ground, "fill_short": cfg.fill_short,
             "constrain_to_catalog": cfg.constrain_to_catalog,
             "seed": seed, "policy": None if policy is None else vars(policy),
             "decoding": (negatives_decoding(cfg.decoding, n, seed).model_dump()
                          if cfg.source == "self" else None),
             **{k: int(counts.get(k, 0)) for k in COUNTS},
             "generation": run, "seconds": round(time.time() - started, 1)}
    path = _write(table, stats, Path(output_dir))
    return NegativesResult(table, stats, path)


COUNTS = ("candidates", "unparsable", "unquoted", "cut", "dropped_positive", "duplicates",
          "beyond_n", "grounded_changed", "short_of_n", "contaminated", "filled_random",
          "skipped_history", "rows_dropped_no_negative")


def _negatives_table(samples: pa.Table, rows: list[list[Negative]], keep: list[int]) -> pa.Table:
    col = {name: samples.column(name).to_pylist() for name in ("sample_id", "prompt", "target_title")}
    return pa.table({
        "sample_id": [col["sample_id"][r] for r in keep],
        "prompt": [col["prompt"][r] for r in keep],
        "chosen": [build_completion(col["target_title"][r]) for r in keep],
        "rejected": [[build_completion(x.title) for x in rows[r]] for r in keep],
        "rejected_scores": [[x.score for x in rows[r]] for r in keep],
        "rejected_sources": [[x.source for x in rows[r]] for r in keep],
        "source": [_row_source(rows[r]) for r in keep],
    }, schema=NEGATIVES_SCHEMA)


def _write(table: pa.Table, stats: dict, output_dir: Path) -> Path:
    """Stats first, then the Parquet file: a negatives.parquet always has its stats beside it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{STATS_FILE}.tmp"
    tmp.write_text(json.dumps(stats, indent=1, default=str))
    tmp.replace(output_dir / STATS_FILE)
    return write_parquet(table, output_dir / NEGATIVES_FILE)
