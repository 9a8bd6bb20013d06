"""SASRec (Kang & McAuley 2018), the paper's conventional baseline (SPRec App. C; spec
seed-methods §5.1): item-ID embeddings with learned positions, causal self-attention
blocks, and the next item scored as the dot product of the last position's output with
the (shared) item embeddings.

Written here rather than taken from a library: the maintained ones pin below the stack
(METADATA read 2026-12-01: rectools 0.19.0 numpy<2 and pandas<3 on Python 3.11; replay-rec
0.22.0 pandas<3 and pyarrow<24; the stack runs pandas 3.1 and pyarrow 26).

    fit(prepared, cfg.sasrec, out)                # a Ray task; early-stopped on valid
    Trained(out).scores(samples)                  # (samples x catalog items), catalog order
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from recray.config import SasrecConfig
from recray.evaluate.metrics import ndcg

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "sasrec.json"


class SASRec(nn.Module):
    def __init__(self, n_items: int, max_len: int, hidden: int, blocks: int, heads: int,
                 dropout: float):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, hidden, padding_idx=0)   # 0: padding
        self.positions = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=hidden, dropout=dropout,
                                           activation="relu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.heads = heads

    def last_state(self, history: torch.Tensor) -> torch.Tensor:
        """(batch, max_len) item indices, left-padded with 0 -> (batch, hidden)."""
        batch, length = history.shape
        real = history > 0
        x = self.items(history) * self.items.embedding_dim ** 0.5
        x = self.dropout(x + self.positions(torch.arange(length, device=history.device)))
        x = x * real[..., None]
        # A finite "minus infinity": rows of pure padding then attend uniformly instead of
        # turning into NaN (which would leak into real rows through 0 * NaN).
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=history.device), 1)
        blocked = blocked[None] | ~real[:, None, :]
        mask = torch.zeros(batch, length, length, device=history.device).masked_fill(blocked, -1e9)
        x = self.blocks(x, mask=mask.repeat_interleave(self.heads, 0))
        return self.norm(x[:, -1])

    def item_scores(self, history: torch.Tensor) -> torch.Tensor:
        """(batch, n_items) scores of every real item (padding excluded)."""
        return self.last_state(history) @ self.items.weight[1:].T


def _histories(samples: pa.Table, index: dict[str, int], max_len: int) -> torch.Tensor:
    rows = [[index[i] for i in h][-max_len:] for h in samples.column("history_item_ids").to_pylist()]
    return torch.tensor([[0] * (max_len - len(r)) + r for r in rows], dtype=torch.long)


def _targets(samples: pa.Table, index: dict[str, int]) -> torch.Tensor:
    return torch.tensor([index[t] for t in samples.column("target_item_id").to_pylist()])


def _valid_score(model: SASRec, history: torch.Tensor, targets: torch.Tensor) -> tuple[float, ...]:
    """(NDCG@5, NDCG@20, −mean target rank) on valid, compared in that order: NDCG@5 is
    the criterion of the paper's set-up, the others only break its ties, which on a few
    hundred valid samples are the common case (NDCG@5 is 0 for most early epochs)."""
    model.eval()
    with torch.no_grad():
        scores = model.item_scores(history)
    model.train()
    ranks = (scores > scores.gather(1, (targets - 1)[:, None])).sum(1).numpy()
    return ndcg(ranks, 5), ndcg(ranks, 20), -float(ranks.mean())


def train(prepared: Path, cfg: SasrecConfig, out: Path) -> dict:
    """Fit on the train subset, keep the epoch with the best valid NDCG@5, write the model
    (safetensors) and its item vocabulary and training record (sasrec.json)."""
    from safetensors.torch import save_file
    torch.manual_seed(cfg.seed)
    catalog = pq.read_table(prepared / "catalog.parquet", columns=["item_id"])
    item_ids = catalog.column("item_id").to_pylist()
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    train_samples, valid_samples = pq.read_table(prepared / "train"), pq.read_table(prepared / "valid")
    max_len = max(len(h) for h in train_samples.column("history_item_ids").to_pylist())
    history, targets = _histories(train_samples, index, max_len), _targets(train_samples, index)
    valid_history, valid_targets = _histories(valid_samples, index, max_len), _targets(valid_samples, index)
    shape = dict(n_items=len(item_ids), max_len=max_len, hidden=cfg.hidden, blocks=cfg.blocks,
                 heads=cfg.heads, dropout=cfg.dropout)
    model = SASRec(**shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.98))
    rng = torch.Generator().manual_seed(cfg.seed)
    best, best_epoch, best_state, curve = None, 0, None, []
    start = time.time()
    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.randperm(len(targets), generator=rng)
        for batch in order.split(cfg.batch_size):
            state = model.last_state(history[batch])
            negatives = torch.randint(1, len(item_ids) + 1, (len(batch),), generator=rng)
            positive = (state * model.items(targets[batch])).sum(-1)
            negative = (state * model.items(negatives)).sum(-1)
            loss = (nn.functional.softplus(-positive) + nn.functional.softplus(negative)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = _valid_score(model, valid_history, valid_targets)
        curve.append(round(score[0], 5))
        if best is None or score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch % 20 == 0 or epoch - best_epoch >= cfg.patience:
            log.info("sasrec epoch %d: valid NDCG@5 %.4f (best %.4f at epoch %d), %.1f s",
                     epoch, score[0], best[0], best_epoch, time.time() - start)
        if epoch - best_epoch >= cfg.patience:
            break
    out.mkdir(parents=True, exist_ok=True)
    save_file(best_state, str(out / WEIGHTS))
    record = {"shape": shape, "item_ids": item_ids, "best_epoch": best_epoch,
              "valid_ndcg@5": best[0], "valid_ndcg@20": best[1], "valid_mean_rank": -best[2],
              "epochs_run": len(curve), "valid_ndcg@5_per_epoch": curve,
              "train_samples": len(targets), "seconds": round(time.time() - start, 1)}
    (out / META).write_text(json.dumps(record))
    return {k: v for k, v in record.items() if k not in ("item_ids", "valid_ndcg@5_per_epoch")}


def fit(prepared: Path, cfg: SasrecConfig, out: Path) -> dict:
    """`train` as a Ray task (one CPU), so it runs wherever the cluster has room."""
    import ray
    return ray.get(ray.remote(num_cpus=1)(train).remote(Path(prepared), cfg, Path(out)))


class Trained:
    """A trained SASRec as a recommender: per-item scores for any samples."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file
        record = json.loads((Path(folder) / META).read_text())
        self.model = SASRec(**record["shape"])
        self.model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
        self.model.eval()
        self.index = {item: i + 1 for i, item in enumerate(record["item_ids"])}
        self.max_len = record["shape"]["max_len"]

    def scores(self, samples: pa.Table) -> np.ndarray:
        with torch.no_grad():
            return self.model.item_scores(_histories(samples, self.index, self.max_len)).numpy()
