"""Benchmark: `recray prepare` (Ray Data) against a single-process pandas implementation
of the same protocol (spec §1), on synthetic logs with Zipf item popularity.

    python bench/prepare.py --sizes 1000000 10000000

Both run as child processes, one at a time; a sampler in this process records the
machine's peak memory in use above the idle baseline (Ray's object store lives in
shared memory, so per-process RSS would miss it). The two implementations must pick
exactly the same samples: the benchmark fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
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


def pandas_prepare(log_dir: Path, catalog_file: Path, out: Path) -> None:
    """The same protocol in one process: one big frame, sort, window, split."""
    from recray.config import DataConfig
    from recray.data.prepare import assign_splits, choose_subset, sample_hash

    cfg = DataConfig()
    df = pd.read_parquet(log_dir)
    catalog = pd.read_parquet(catalog_file)
    titled = catalog.loc[catalog["title"].fillna("").str.strip() != "", "item_id"]
    df = df[df["item_id"].isin(titled)]
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    df = df.drop_duplicates(["user_id", "item_id", "timestamp"])
    size = df.groupby("user_id")["item_id"].transform("size")
    df = df[size >= cfg.min_interactions].reset_index(drop=True)
    position = df.groupby("user_id").cumcount().to_numpy()
    items = df["item_id"].to_numpy(dtype=object)
    rows = np.flatnonzero(position >= 1)
    sample_ids = (df["user_id"].to_numpy(dtype=object)[rows] + ":"
                  + position[rows].astype(str).astype(object))
    split = assign_splits(df["timestamp"].to_numpy()[rows], sample_ids, cfg.split)
    hashes = sample_hash(sample_ids, cfg.seed)
    chosen = {}
    for i, (name, n) in enumerate((("train", cfg.n_train), ("valid", cfg.n_valid),
                                   ("test", cfg.n_test))):
        picked = choose_subset(hashes, split == i, n)
        chosen[name] = sorted(sample_ids[picked].tolist())
        _ = [items[max(r - position[r], r - cfg.history_len):r] for r in rows[picked]]  # histories
    out.mkdir(parents=True)
    (out / "chosen.json").write_text(json.dumps(chosen))


def recray_chosen(out: Path) -> dict[str, list[str]]:
    return {name: sorted(pq.read_table(out / name).column("sample_id").to_pylist())
            for name in ("train", "valid", "test")}


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--pandas-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pandas_only:
        pandas_prepare(Path(args.log) / "log", Path(args.log) / "catalog.parquet", Path(args.out))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recray-bench-"))
    rows = []
    for n in args.sizes:
        data = synthetic_log(n, work / f"log-{n}")
        pandas_s, pandas_gb = timed([sys.executable, __file__, "--pandas-only",
                                     "--log", str(data), "--out", str(work / f"pandas-{n}")])
        recray_out = work / f"recray-{n}"
        ray_s, ray_gb = timed(["recray", "prepare", "--format", "table",
                               "--input", str(data / "log"), "--output", str(recray_out),
                               f"data.catalog={data / 'catalog.parquet'}"])
        same = json.loads((work / f"pandas-{n}" / "chosen.json").read_text()) == recray_chosen(recray_out)
        if not same:
            raise SystemExit(f"{n} rows: recray and pandas chose different samples")
        rows.append((n, pandas_s, pandas_gb, ray_s, ray_gb))
        print(f"done {n:,} rows", flush=True)

    print(f"\nmachine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          "memory = peak machine memory in use above idle")
    print("| rows | pandas s | pandas rows/s | pandas peak GiB | recray (Ray Data) s "
          "| recray rows/s | recray peak GiB | time ratio recray/pandas | same samples |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, ps, pg, rs, rg in rows:
        print(f"| {n:,} | {ps:.1f} | {n / ps:,.0f} | {pg:.2f} | {rs:.1f} | {n / rs:,.0f} "
              f"| {rg:.2f} | {rs / ps:.2f} | yes |")


if __name__ == "__main__":
    main()
