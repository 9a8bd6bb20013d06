"""Benchmark: `recray prepare` (Ray Data) against a single-process pandas implementation
of the same protocol (spec §1) that writes the same files, on synthetic logs with Zipf
item popularity.

    python bench/prepare.py --sizes 1000000 10000000 --cpus 1 2

Both run as child processes, one at a time; a sampler in this process records the
machine's peak memory in use above the idle baseline (Ray's object store lives in
shared memory, so per-process RSS would miss it). The two implementations must write
the same output: the benchmark fails unless every split file (samples, histories,
prompts, completions), catalog.parquet, groups.json and the counts stats.json shares
with the baseline are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from recray.data.prompts import article_first, build_completion, build_prompt

DAY = 86_400


def synthetic_log(n_rows: int, out: Path, seed: int = 0, rows_per_file: int = 1_000_000) -> Path:
    """n_rows interactions: ~100 per user (log-normal), Zipf(1.0) items, daily-ish gaps."""
    rng = np.random.default_rng(seed)
    n_items = max(1_000, n_rows // 1_000)
    n_users = max(10, n_rows // 100)
    per_user = rng.lognormal(mean=np.log(60), sigma=0.9, size=n_users)
    per_user = np.maximum(1, np.round(per_user * n_rows / per_user.sum())).astype(np.int64)
    per_user[-1] += n_rows - per_user.sum()
    per_user = np.maximum(per_user, 1)
    popularity = 1.0 / np.arange(1, n_items + 1)
    popularity /= popularity.sum()
    out.mkdir(parents=True, exist_ok=True)
    (out / "log").mkdir()
    users = np.repeat(np.arange(n_users), per_user)[:n_rows]
    starts = rng.integers(1_000_000_000, 1_000_000_000 + 3 * 365 * DAY, size=n_users)
    for k, lo in enumerate(range(0, n_rows, rows_per_file)):
        u = users[lo:lo + rows_per_file]
        gaps = rng.exponential(DAY, size=len(u)).astype(np.int64)
        elapsed = np.cumsum(gaps)
        first = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])        # each user's first row
        run_lengths = np.diff(np.r_[first, len(u)])
        times = starts[u] + elapsed - np.repeat(elapsed[first], run_lengths)
        table = pa.table({
            "user_id": pa.array(u.astype(str)),
            "item_id": pa.array(rng.choice(n_items, size=len(u), p=popularity).astype(str)),
            "timestamp": pa.array(times, pa.int64()),
        })
        pq.write_table(table, out / "log" / f"part-{k:05d}.parquet")
    genres = np.array(["Drama", "Comedy", "Action", "Thriller", "Romance", "Horror", "Sci-Fi",
                       "War", "Crime", "Family", "Western", "Musical"])
    pq.write_table(pa.table({
        "item_id": pa.array(np.arange(n_items).astype(str)),
        "title": pa.array([f"Synthetic title {i} ({1950 + i % 70})" for i in range(n_items)]),
        "categories": pa.array([list(rng.choice(genres, size=1 + i % 3, replace=False))
                                for i in range(n_items)], pa.list_(pa.string())),
    }), out / "catalog.parquet")
    return out


def pandas_catalog(raw: pd.DataFrame, title_form: str) -> pd.DataFrame:
    """recray's catalog rules: first row per id, non-empty titles, titles in shown form."""
    catalog = raw.drop_duplicates("item_id")
    catalog = catalog[catalog["title"].fillna("").str.strip() != ""].reset_index(drop=True)
    stored = catalog["title"]
    shown = stored.map(article_first) if title_form == "article_first" else stored
    return pd.DataFrame({"item_id": catalog["item_id"], "title": shown,
                         "categories": catalog["categories"].map(list), "source_title": stored})


def split_frame(df: pd.DataFrame, rows: np.ndarray, sample_ids: np.ndarray,
                position: np.ndarray, titles: dict[str, str], cfg) -> pd.DataFrame:
    """One split's chosen samples (frame rows `rows`) as `recray prepare` writes them."""
    items = df["item_id"].to_numpy(dtype=object)
    histories = [items[max(r - position[r], r - cfg.history_len):r].tolist() for r in rows]
    frame = pd.DataFrame({
        "sample_id": sample_ids,
        "user_id": df["user_id"].to_numpy(dtype=object)[rows],
        "history_item_ids": histories,
        "target_item_id": items[rows],
        "target_time": df["timestamp"].to_numpy()[rows],
    }).sort_values(["target_time", "sample_id"], kind="stable", ignore_index=True)
    frame["history_titles"] = [[titles[i] for i in h] for h in frame["history_item_ids"]]
    frame["target_title"] = frame["target_item_id"].map(titles)
    frame["prompt"] = [build_prompt(h, cfg.noun) for h in frame["history_titles"]]
    frame["completion"] = frame["target_title"].map(build_completion)
    return frame


def assign_splits(times: np.ndarray, sample_ids: np.ndarray,
                  fractions: tuple[float, float, float]) -> np.ndarray:
    """0/1/2 for train/valid/test: one global sort by (target time, sample id), cut 8:1:1."""
    order = np.lexsort((sample_ids, times))
    cut_train = int(round(len(order) * fractions[0]))
    cut_valid = int(round(len(order) * (fractions[0] + fractions[1])))
    split = np.full(len(order), 2, dtype=np.int8)
    split[order[:cut_train]] = 0
    split[order[cut_train:cut_valid]] = 1
    return split


def choose_subset(hashes: np.ndarray, in_split: np.ndarray, size: int) -> np.ndarray:
    """Indices of the `size` samples of a split with the smallest hash (all when fewer)."""
    idx = np.flatnonzero(in_split)
    return idx[np.argsort(hashes[idx], kind="stable")[:size]]


def pandas_prepare(log_dir: Path, catalog_file: Path, out: Path) -> None:
    """The same protocol and outputs in one process: one big frame, sort, window, split,
    then the split files (prompts from recray.data.prompts), catalog.parquet with train
    counts, groups.json and the counts of stats.json. Group choice reuses recray's
    `choose_groups` (a pure function over train-target counts), so only the data
    handling differs."""
    from recray.config import DataConfig
    from recray.data.prepare import SPLITS, choose_groups, sample_hash

    started = time.time()
    cfg = DataConfig()
    raw_catalog = pd.read_parquet(catalog_file)
    catalog = pandas_catalog(raw_catalog, cfg.title_form)
    df = pd.read_parquet(log_dir)
    n_read, n_users_seen = len(df), df["user_id"].nunique()
    known = df["item_id"].isin(raw_catalog["item_id"])
    titled = df["item_id"].isin(catalog["item_id"])
    df = df[titled].sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    n_titled = len(df)
    df = df.drop_duplicates(["user_id", "item_id", "timestamp"])
    size = df.groupby("user_id")["item_id"].transform("size")
    n_valid, n_kept_users = len(df), int(df.loc[size >= cfg.min_interactions, "user_id"].nunique())
    df = df[size >= cfg.min_interactions].reset_index(drop=True)
    position = df.groupby("user_id").cumcount().to_numpy()
    rows = np.flatnonzero(position >= 1)
    sample_ids = (df["user_id"].to_numpy(dtype=object)[rows] + ":"
                  + position[rows].astype(str).astype(object))
    split = assign_splits(df["timestamp"].to_numpy()[rows], sample_ids, cfg.split)
    hashes = sample_hash(sample_ids, cfg.seed)
    titles = dict(zip(catalog["item_id"], catalog["title"]))
    sizes = (cfg.n_train, cfg.n_valid, cfg.n_test)
    picked = [choose_subset(hashes, split == i, n) for i, n in enumerate(sizes)]
    subsets = {name: split_frame(df, rows[p], sample_ids[p], position, titles, cfg)
               for name, p in zip(SPLITS, picked)}

    train_targets = df["item_id"].to_numpy(dtype=object)[rows[split == 0]]
    categories = dict(zip(catalog["item_id"], catalog["categories"]))
    counts = pd.Series(train_targets).value_counts()
    groups, dropped, freq = choose_groups(counts.to_dict(), categories, cfg.n_groups,
                                          cfg.exclude_categories)
    catalog["train_count"] = catalog["item_id"].map(counts).fillna(0).astype("int64")

    out.mkdir(parents=True)
    for name, frame in subsets.items():
        (out / name).mkdir()
        frame.to_parquet(out / name / "part-00000.parquet", index=False)
    catalog.to_parquet(out / "catalog.parquet", index=False)
    (out / "groups.json").write_text(json.dumps({
        "groups": groups, "dropped": dropped,
        "train_target_frequency": {g: freq[g] for g in groups}}, indent=1))
    (out / "stats.json").write_text(json.dumps({
        "catalog": {"items_in": len(raw_catalog), "items_kept": len(catalog),
                    "titles_article_first": int((catalog["title"] != catalog["source_title"]).sum())},
        "interactions": {"read": n_read,
                         "dropped_item_not_in_catalog": int((~known).sum()),
                         "dropped_item_empty_title": int((known & ~titled).sum()),
                         "dropped_duplicate": n_titled - n_valid, "valid": n_valid,
                         "dropped_short_user": n_valid - len(df), "used": len(df)},
        "users": {"seen": n_users_seen, "kept": n_kept_users},
        "samples": {"total": len(rows),
                    **{f"{name}_split": int((split == i).sum()) for i, name in enumerate(SPLITS)},
                    **{f"{name}_subset": len(subsets[name]) for name in SPLITS}},
        "seconds": round(time.time() - started, 1)}, indent=1))


def differences(pandas_out: Path, recray_out: Path) -> list[str]:
    """What the two outputs disagree on: each split's rows (ids, histories, prompts,
    completions), the catalog's rows, groups.json and the shared counts of stats.json."""
    def rows(path: Path) -> list[dict]:
        return pq.read_table(path).to_pylist()

    found = [name for name in ("train", "valid", "test")
             if rows(pandas_out / name) != rows(recray_out / name)]
    if rows(pandas_out / "catalog.parquet") != rows(recray_out / "catalog.parquet"):
        found.append("catalog.parquet")
    if json.loads((pandas_out / "groups.json").read_text()) != \
            json.loads((recray_out / "groups.json").read_text()):
        found.append("groups.json")
    ours = json.loads((pandas_out / "stats.json").read_text())
    theirs = json.loads((recray_out / "stats.json").read_text())
    found += [f"stats {part}.{key}" for part, counts in ours.items() if part != "seconds"
              for key, value in counts.items() if theirs[part].get(key) != value]
    return found


class MemorySampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.baseline = psutil.virtual_memory().used
        self.peak = 0
        self.running = True

    def run(self):
        while self.running:
            self.peak = max(self.peak, psutil.virtual_memory().used - self.baseline)
            time.sleep(0.2)


def timed(cmd: list[str]) -> tuple[float, float]:
    sampler = MemorySampler()
    sampler.start()
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - start
    sampler.running = False
    sampler.join()
    return seconds, sampler.peak / 2**30


def median(values) -> float:
    return float(np.median(list(values)))


def spread(runs: list[tuple[float, float]]) -> str:
    seconds = [s for s, _ in runs]
    return f"{median(seconds):.1f}" + (f" [{min(seconds):.1f}-{max(seconds):.1f}]" if len(seconds) > 1 else "")


def crossing(t1: float, t2: float, pandas_s: float) -> str:
    """Where recray would match pandas, by Amdahl's law fitted to its 1- and 2-CPU times:
    T(n) = serial + parallel / n."""
    parallel = 2 * (t1 - t2)
    serial = t1 - parallel
    if parallel <= 0:
        return "never (2 CPUs are no faster than 1)"
    if serial >= pandas_s:
        return f"never (its serial part, {serial:.0f} s, is already above pandas)"
    return f"~{parallel / (pandas_s - serial):.1f} CPUs (serial {serial:.0f} s + {parallel:.0f} s / n)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--cpus", type=int, nargs="+", default=[2],
                        help="Ray CPUs for recray (ray.num_cpus); e.g. --cpus 1 2")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row (the spread "
                        "of one run on a 2-core machine is tens of percent)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--pandas-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pandas_only:
        pandas_prepare(Path(args.log) / "log", Path(args.log) / "catalog.parquet", Path(args.out))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recray-bench-"))
    rows, phases = [], []
    for n in args.sizes:
        data = work / f"log-{n}"
        if not (data / "catalog.parquet").exists():
            synthetic_log(n, data)
        pandas_runs = []
        for _ in range(args.repeat):
            shutil.rmtree(work / f"pandas-{n}", ignore_errors=True)
            pandas_runs.append(timed([sys.executable, __file__, "--pandas-only",
                                      "--log", str(data), "--out", str(work / f"pandas-{n}")]))
        for cpus in args.cpus:
            recray_out = work / f"recray-{n}-{cpus}cpu"
            ray_runs = []
            for _ in range(args.repeat):
                shutil.rmtree(recray_out, ignore_errors=True)
                ray_runs.append(timed(["recray", "prepare", "--format", "table",
                                       "--input", str(data / "log"), "--output", str(recray_out),
                                       f"data.catalog={data / 'catalog.parquet'}",
                                       f"ray.num_cpus={cpus}"]))
                different = differences(work / f"pandas-{n}", recray_out)
                if different:
                    raise SystemExit(f"{n} rows: recray and pandas differ in {', '.join(different)}")
                stats = json.loads((recray_out / "stats.json").read_text())
                phases.append((n, cpus, ray_runs[-1][0], stats["seconds"], stats["timings"]))
            rows.append((n, cpus, pandas_runs, ray_runs))
            print(f"done {n:,} rows, {cpus} CPU(s), {args.repeat} run(s) each", flush=True)

    print(f"\nmachine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          "memory = peak machine memory in use above idle")
    print("| rows | recray CPUs | pandas s | pandas rows/s | pandas peak GiB | recray (Ray Data) s "
          "| recray rows/s | recray peak GiB | time ratio recray/pandas | same output |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, cpus, pandas_runs, ray_runs in rows:
        ps, rs = median(s for s, _ in pandas_runs), median(s for s, _ in ray_runs)
        pg, rg = max(g for _, g in pandas_runs), max(g for _, g in ray_runs)
        print(f"| {n:,} | {cpus} | {spread(pandas_runs)} | {n / ps:,.0f} | {pg:.2f} "
              f"| {spread(ray_runs)} | {n / rs:,.0f} | {rg:.2f} | {rs / ps:.2f} | yes |")
    if args.repeat > 1:
        print(f"(times: median of {args.repeat} runs [min-max]; rows/s and the ratio from the "
              f"medians; memory: the largest peak)")

    print("\nwhere recray's time goes (stats.json timings; 'outside prepare()': interpreter, "
          "imports, Ray start and shutdown, loader set-up, writing)")
    names = list(phases[0][4])
    print("| rows | CPUs | " + " | ".join(names) + " | outside prepare() | total s |")
    print("|---" * (len(names) + 4) + "|")
    for n, cpus, wall, inside, t in phases:
        print(f"| {n:,} | {cpus} | " + " | ".join(f"{t[k]:.1f}" for k in names)
              + f" | {wall - sum(t.values()):.1f} | {wall:.1f} |")
    by = {(n, c): median(s for s, _ in ray_runs) for n, c, _, ray_runs in rows}
    pandas_s = {n: median(s for s, _ in pandas_runs) for n, _, pandas_runs, _ in rows}
    for n in args.sizes:
        if (n, 1) in by and (n, 2) in by:
            print(f"{n:,} rows: recray would match pandas ({pandas_s[n]:.1f} s) at "
                  f"{crossing(by[n, 1], by[n, 2], pandas_s[n])}")


if __name__ == "__main__":
    main()
