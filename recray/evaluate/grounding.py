"""Grounding (spec §4): rank the whole catalog for each generated title.

A generated title and every catalog title are embedded by the same `Embedder`; the
catalog is ranked by L2 distance to the generated title's embedding, nearest first,
ties broken by catalog index. Two embedders exist: a sentence-transformers model (the
SPRec reference code's MiniLM) and the LLM's own last-layer last-token hidden state
(BIGRec's choice). Catalog embeddings are computed once per (embedder, titles) and
cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from recray.atomic import atomic_file

# Float32 distance scores held at once by rank_catalog (64 MiB); bounds its memory.
SCORE_BUDGET = 1 << 24


class Embedder(Protocol):
    """Turns texts into vectors. `name` identifies the model (and its weights) so that
    cached catalog embeddings are never reused across models."""

    name: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 array (len(texts), d), row i embedding texts[i]."""
        ...


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's relative path and content: a model folder's identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


class SentenceEmbedder:
    """A sentence-transformers model loaded from a local folder, never from a hub.

    Embeddings are what `SentenceTransformer.encode` returns: the model's own pipeline,
    so a model whose modules end in Normalize (all-MiniLM-L6-v2 does) gives unit
    vectors, and one without it does not; nothing is normalised here.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 64):
        # Set before sentence_transformers (and huggingface_hub) are first imported;
        # local_files_only guards the case where they already were.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        model_dir = Path(model_dir)
        self.name = f"sentence-transformers:{_folder_fingerprint(model_dir)}"
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            raise ValueError("nothing to embed")
        vectors = self._model.encode(list(texts), batch_size=self.batch_size,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def _weights_fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """sha256 over the model's state (names, dtypes, shapes, bytes) and the vocabulary."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # A uint8 view hashes any dtype, bfloat16 included (numpy has none).
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()[:16]


class HiddenStateEmbedder:
    """The causal LM's last-layer hidden state at each text's last token (BIGRec).

    Texts are tokenised one by one (special tokens as the tokenizer adds them), then
    padded on the tokenizer's `padding_side` with an attention mask and position ids
    that count real tokens only, so a text's embedding does not depend on what it is
    batched with. "Last layer" is `hidden_states[-1]` as the model returns it (for
    Llama: after the final RMSNorm).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @property
    def name(self) -> str:
        # Recomputed on every use: the same object embeds differently after training.
        return f"hidden-state:{_weights_fingerprint(self.model, self.tokenizer)}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            raise ValueError("nothing to embed")
        ids = [self.tokenizer(text)["input_ids"] for text in texts]
        # Batch texts of similar length together: less padding to compute.
        order = np.argsort([len(x) for x in ids], kind="stable")
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = [self._last_hidden([ids[i] for i in order[s:s + self.batch_size]])
                      for s in range(0, len(ids), self.batch_size)]
        finally:
            self.model.train(was_training)
        out = np.empty((len(ids), chunks[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(chunks)
        return out

    @torch.no_grad()
    def _last_hidden(self, batch: list[list[int]]) -> np.ndarray:
        left = self.tokenizer.padding_side == "left"
        width = max(len(x) for x in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        # Without explicit positions a left-padded text would start at position > 0.
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        device = next(self.model.parameters()).device
        out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), output_hidden_states=True)
        last = torch.full((len(batch),), width - 1) if left else mask.sum(1) - 1
        hidden = out.hidden_states[-1][torch.arange(len(batch)), last.to(device)]
        return hidden.float().cpu().numpy()


def catalog_embeddings(embedder: Embedder, titles: Sequence[str], cache_dir: Path) -> np.ndarray:
    """Embeddings of the catalog titles, float32 (len(titles), d), cached on disk.

    The cache file is `<cache_dir>/<sha256 of [embedder.name, titles]>.npy`, so a change
    of model, weights, title text or title order is a different file. It is written to
    a temporary file in the same folder and renamed, so concurrent evaluators never
    read a half-written file. A hit loads the file without calling `embed`.
    """
    titles = list(titles)
    key = hashlib.sha256(json.dumps([embedder.name, titles], ensure_ascii=False).encode()).hexdigest()
    path = Path(cache_dir) / f"{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = np.asarray(embedder.embed(titles), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(titles):
        raise ValueError(f"embedder {embedder.name} returned shape {vectors.shape} "
                         f"for {len(titles)} titles")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors)
    return vectors


def _as_matrix(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a 2-D float array, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or inf")
    return np.ascontiguousarray(array)


def _count(mask: np.ndarray) -> np.ndarray:
    """Per-row count of True; summing the uint8 view is several times faster than bool."""
    return mask.view(np.uint8).sum(1, dtype=np.int64)


def _ordered_topk(scores: torch.Tensor, k: int) -> np.ndarray:
    """Indices of each row's k smallest scores, ordered by (score, index)."""
    m = scores.shape[1]
    found = torch.topk(scores, min(k + 1, m), dim=1, largest=False, sorted=True)
    values, cols = found.values.numpy(), found.indices[:, :k].numpy().copy()
    # topk picks arbitrarily among items tied at the k-th score: where the (k+1)-th
    # score equals the k-th, rebuild that row's set keeping the lowest indices.
    tied = np.flatnonzero(values[:, k] == values[:, k - 1]) if k < m else []
    if len(tied):
        sub, kth = scores.numpy()[tied], values[tied, k - 1:k]
        below, at = sub < kth, sub == kth
        take = below | (at & (np.cumsum(at, axis=1) <= k - _count(below)[:, None]))
        cols[tied] = np.nonzero(take)[1].reshape(-1, k)
    cols.sort(axis=1)  # ascending index, so the stable sort below breaks ties by index
    row_scores = np.take_along_axis(scores.numpy(), cols, axis=1)
    return np.take_along_axis(cols, np.argsort(row_scores, axis=1, kind="stable"), axis=1)


def _target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Items strictly closer than the target plus equally close items of lower index."""
    own = scores[np.arange(len(scores)), targets.clip(min=0)][:, None]
    ranks = _count(scores < own)
    tied = np.flatnonzero(_count(scores == own) > 1)  # the target always equals itself
    if len(tied):
        before = np.arange(scores.shape[1])[None, :] < targets[tied][:, None]
        ranks[tied] += _count((scores[tied] == own[tied]) & before)
    return np.where(targets >= 0, ranks, -1)


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, inverse): the lowest index of each distinct row (bitwise), and for every
    row the position of its content in `first`; rows == rows[first][inverse]."""
    m = len(rows)
    # Identical rows share their first column's bits: compare whole rows only where
    # that column collides, instead of sorting all m rows as byte strings.
    column = np.ascontiguousarray(rows[:, 0]).view(f"u{rows.itemsize}")
    _, column_group, column_count = np.unique(column, return_inverse=True, return_counts=True)
    suspects = np.flatnonzero(column_count[column_group] > 1)
    representative = np.arange(m)
    if len(suspects):
        as_bytes = np.dtype((np.void, rows.itemsize * rows.shape[1]))
        whole = np.ascontiguousarray(rows[suspects]).view(as_bytes).reshape(-1)
        _, lowest, group = np.unique(whole, return_index=True, return_inverse=True)
        representative[suspects] = suspects[lowest][group.reshape(-1)]
    first = np.unique(representative)
    return first, np.searchsorted(first, representative)


def rank_catalog(query_emb: np.ndarray, item_emb: np.ndarray, target_index: np.ndarray,
                 topk: int = 20, batch_size: int | None = None,
                 item_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank all m items for each of q queries by L2 distance, exhaustively.

    `item_scale` (m,) > 0: rank by distance × item_scale[i] instead (a re-ranker's
    penalty, recray.evaluate.rerank); the true squared distance is scaled by its square.

    Order: distance ascending, then item index ascending. Returns
    - topk_indices (q, topk) int64: each query's topk nearest items in that order;
    - target_ranks (q,) int64: 0-based rank of item target_index[u] in the same order,
      i.e. #items strictly closer + #equally close items with a smaller index; -1 where
      target_index[u] is -1 ("no target"). An unparsable answer has no query at all:
      the caller gives it rank m (a miss), which the metrics expect.

    Distances come from the expansion ||a||² - 2a·b + ||b||², one matmul per batch of
    queries; the per-query constant ||a||² is left out as it changes no order. Bitwise
    identical item rows (duplicate titles) are scored once and copied, so they tie
    exactly however the matmul rounds. batch_size (queries per matmul) defaults to
    SCORE_BUDGET // m, which keeps peak memory near a few hundred MB at any catalog size.
    Computes in the inputs' float precision: the order is exact for the distances as
    rounded there (float32 embeddings: items whose true distances differ by less than
    float32 rounding may swap, as with any float32 ranker).
    """
    queries, items = _as_matrix("query_emb", query_emb), _as_matrix("item_emb", item_emb)
    if queries.shape[1] != items.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != item dim {items.shape[1]}")
    m = len(items)
    if not 1 <= topk <= m:
        raise ValueError(f"topk must be in [1, {m}] (catalog size), got {topk}")
    targets = np.asarray(target_index, dtype=np.int64)
    if targets.shape != (len(queries),) or (targets < -1).any() or (targets >= m).any():
        raise ValueError(f"target_index must be shape ({len(queries)},) with values in [-1, {m})")
    dtype = np.result_type(queries.dtype, items.dtype)
    rows = items.astype(dtype, copy=False)
    first, inverse = _distinct_rows(rows)
    # Scaled items are no longer equal where their rows are: no sharing of scores then.
    duplicates = len(first) < m and item_scale is None
    distinct = torch.from_numpy(rows[first] if duplicates else rows)
    spread = torch.from_numpy(inverse) if duplicates else None
    sq_norms = (distinct * distinct).sum(1)
    q_all = torch.from_numpy(queries.astype(dtype, copy=False))
    if item_scale is not None:
        scale = np.asarray(item_scale, dtype=dtype)
        if scale.shape != (m,) or not (scale > 0).all():
            raise ValueError(f"item_scale must be shape ({m},) and positive")
        scale_sq = torch.from_numpy(scale * scale)
    batch = batch_size or max(1, SCORE_BUDGET // m)
    top = np.empty((len(queries), topk), dtype=np.int64)
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), batch):
        stop = start + batch
        scores = torch.addmm(sq_norms, q_all[start:stop], distinct.T, alpha=-2)
        if item_scale is not None:      # scaling needs the true (non-negative) distance
            q = q_all[start:stop]
            scores = (scores + (q * q).sum(1, keepdim=True)).clamp(min=0) * scale_sq
        if spread is not None:
            scores = scores.index_select(1, spread)
        top[start:stop] = _ordered_topk(scores, topk)
        ranks[start:stop] = _target_ranks(scores.numpy(), targets[start:stop])
    return top, ranks
