"""Grounding throughput: recray's `rank_catalog` against two baselines.

- batched: what a user would write with torch: `torch.cdist` per batch of queries (as
  many as rank_catalog scores at once), then `torch.topk` over the whole batch and each
  target's rank counted vectorised (items closer than it, ties by index as recray);
- SPRec loop: the SPRec reference code's ranking (RegionCh/SPRec, eval/evaluate.py at
  5fec95b): `torch.cdist`, then per query (its `batch_size = 1` loop) a double argsort
  giving every item's rank, the target's rank read off it, and the top-k ids found by
  `torch.argwhere(rank == i)` for each i < k (the reference does this in its metric
  loops). The reference takes cdist over all queries at once; here it is per batch to
  bound memory, which leaves the per-query work unchanged.

Embeddings are random float32, d = 384 (MiniLM's width), for catalogs of 1,682
(MovieLens-100k) and 32,000 items and 1k / 10k queries.

    python bench/evaluate.py [--cases 1682x1000,32000x10000] [--budget-s 60]

A baseline case that would take more than --budget-s runs on fewer queries and its
rate is extrapolated (marked in the table). Memory: the extra resident memory seen
during each rank_catalog call (sampled every 5 ms) and the process's peak RSS after
each case.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import threading
import time

import numpy as np
import psutil
import torch

from recray.evaluate.grounding import SCORE_BUDGET, rank_catalog

DIM, TOPK = 384, 20
CASES = "1682x1000,1682x10000,32000x1000,32000x10000"
PILOT_QUERIES = 100


def batched(queries: np.ndarray, items: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cdist per batch, then top-k and target ranks for the whole batch at once."""
    items_t, index = torch.from_numpy(items), torch.arange(len(items))
    batch = max(1, SCORE_BUDGET // len(items))     # rank_catalog's batch: same memory bound
    tops, ranks = [], []
    for start in range(0, len(queries), batch):
        dist = torch.cdist(torch.from_numpy(queries[start:start + batch]), items_t)
        target = torch.from_numpy(targets[start:start + batch])[:, None]
        own = dist.gather(1, target)
        tops.append(torch.topk(dist, TOPK, dim=1, largest=False).indices)
        ranks.append(((dist < own) | ((dist == own) & (index < target))).sum(1))
    return torch.cat(tops).numpy(), torch.cat(ranks).numpy()


def sprec_loop(queries: np.ndarray, items: np.ndarray, targets: np.ndarray,
               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """RegionCh/SPRec eval/evaluate.py: per query, rank = argsort of argsort, then
    argwhere(rank == i) for each of the top k."""
    items_t = torch.from_numpy(items)
    tops, ranks = [], []
    for start in range(0, len(queries), batch_size):
        dist = torch.cdist(torch.from_numpy(queries[start:start + batch_size]), items_t, p=2)
        for row, target in zip(dist, targets[start:start + batch_size]):
            rank = row.argsort(dim=-1).argsort(dim=-1)
            ranks.append(int(rank[int(target)]))
            tops.append([torch.argwhere(rank == i).item() for i in range(TOPK)])
    return np.array(tops), np.array(ranks)


BASELINES = {"batched torch": batched, "SPRec loop": sprec_loop}


@contextlib.contextmanager
def rss_peak(sample: dict):
    """Record in sample["extra_mib"] the largest RSS growth seen while the block runs."""
    proc, stop = psutil.Process(), threading.Event()
    start = proc.memory_info().rss
    peak = [start]

    def watch():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sample["extra_mib"] = (max(peak[0], proc.memory_info().rss) - start) / 2**20


def timed(fn, *args) -> tuple[float, tuple]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run_baseline(fn, queries, items, targets, budget_s: float) -> dict:
    """Rate of fn over all queries, or over as many as fit budget_s (from a pilot run)."""
    pilot_s, _ = timed(fn, queries[:PILOT_QUERIES], items, targets[:PILOT_QUERIES])
    n = min(len(queries), max(PILOT_QUERIES, int(budget_s * PILOT_QUERIES / pilot_s)))
    seconds, (top, ranks) = timed(fn, queries[:n], items, targets[:n])
    return {"qps": n / seconds, "n": n, "top": top, "ranks": ranks}


def run_case(rng: np.random.Generator, m: int, q: int, budget_s: float) -> list[dict]:
    items = rng.standard_normal((m, DIM), dtype=np.float32)
    queries = rng.standard_normal((q, DIM), dtype=np.float32)
    targets = rng.integers(0, m, q)

    memory: dict = {}
    with rss_peak(memory):
        fast_s, (fast_top, fast_ranks) = timed(rank_catalog, queries, items, targets, TOPK)
    rows = [{"m": m, "q": q, "ranker": "recray rank_catalog", "qps": q / fast_s, "n": q,
             "extra_mib": memory["extra_mib"]}]
    for name, fn in BASELINES.items():
        r = run_baseline(fn, queries, items, targets, budget_s)
        n = r["n"]
        rows.append({"m": m, "q": q, "ranker": name, "qps": r["qps"], "n": n,
                     "speedup": rows[0]["qps"] / r["qps"],
                     # Same ranking up to float rounding (cdist and the expansion round differently).
                     "agree": float(np.mean(r["ranks"] == fast_ranks[:n])),
                     "agree_top": float(np.mean(r["top"] == fast_top[:n]))})
    rows[0]["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


def parse_cases(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in case.split("x")) for case in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=CASES, help="ITEMSxQUERIES,... (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="longest a baseline runs per case before it is extrapolated")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n")
    rng = np.random.default_rng(0)
    rows = [row for m, q in parse_cases(args.cases) for row in run_case(rng, m, q, args.budget_s)]
    print("| items | queries | ranker | queries/s | queries run | recray × | same rank "
          "| same top-k | +RSS MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ran = f"{r['n']}" + (" (extrapol.)" if r["n"] < r["q"] else "")
        cells = [f"{r['m']:,}", f"{r['q']:,}", r["ranker"], f"{r['qps']:,.0f}", ran,
                 f"{r['speedup']:.1f}×" if "speedup" in r else "–",
                 f"{r['agree']:.4f}" if "agree" in r else "–",
                 f"{r['agree_top']:.4f}" if "agree_top" in r else "–",
                 f"{r['extra_mib']:.0f}" if "extra_mib" in r else "–",
                 f"{r['peak_mib']:.0f}" if "peak_mib" in r else "–"]
        print("| " + " | ".join(cells) + " |")
    print("\nrecray ×: recray's queries/s over the row's; +RSS: growth of resident memory during\n"
          "rank_catalog alone; peak RSS: the process's peak after the case (test data and\n"
          "baselines included); same rank/top-k: share of the baseline's ranks/top-k ids equal\n"
          "to recray's (cdist rounds differently near ties).")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
