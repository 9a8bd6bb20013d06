"""The `hf` backend: transformers `generate` (sdpa attention) inside a generation actor.

Scores are cumulative log-probs of the answer's tokens under the policy's raw
distribution (before temperature / top-p), as vLLM reports them: greedy and sampled
answers are scored from the returned raw logits; beam answers carry transformers' beam
score, which with `length_penalty=0` is that same sum.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from recray.config import DecodingConfig, GenerateConfig
from recray.generate.beam import beam_search
from recray.generate.constrain import TitleTrie, prior_bonus
from recray.generate.policy import Policy, generation_dtype
from recray.generate.text import STOP, Answers, Candidate


def _generation_config(d: DecodingConfig, tokenizer) -> GenerationConfig:
    common = dict(max_new_tokens=d.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, stop_strings=[STOP],
                  return_dict_in_generate=True)
    if d.mode == "beam":
        return GenerationConfig(**common, num_beams=d.num_beams, num_return_sequences=d.num_return,
                                do_sample=False, length_penalty=0.0, early_stopping=False,
                                output_scores=True)
    if d.mode == "sample":
        return GenerationConfig(**common, do_sample=True, num_return_sequences=d.n,
                                temperature=d.temperature, top_p=d.top_p, top_k=0,
                                output_logits=True)
    return GenerationConfig(**common, do_sample=False, num_beams=1, output_logits=True)


class HFBackend:
    def __init__(self, model: str, cfg: GenerateConfig, threads: int):
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available()
                                   else "cpu")
        self.dtype = generation_dtype(cfg, self.device.type == "cuda")
        self.model_path: str | None = None
        self.adapter_key: tuple[str, int] | None = None
        self._load(model)

    def _load(self, model: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, self.dtype),
            attn_implementation="sdpa", local_files_only=True).to(self.device).eval()
        # Only what each call asks for: no defaults inherited from the folder's config.
        self.model.generation_config = GenerationConfig()
        self.answers = Answers(self.tokenizer)
        self.peft = None
        self.model_path, self.adapter_key = model, None

    def set_policy(self, policy: Policy, adapter_id: int | None) -> None:
        if policy.model != self.model_path:
            self._load(policy.model)
        if policy.adapter is None or self.adapter_key == (policy.adapter, adapter_id):
            return
        name = f"policy-{adapter_id}"
        if self.peft is None:
            from peft import PeftModel
            self.peft = PeftModel.from_pretrained(self.model, policy.adapter, adapter_name=name)
        else:
            old = self.peft.active_adapter
            self.peft.load_adapter(policy.adapter, adapter_name=name)
            self.peft.set_adapter(name)
            self.peft.delete_adapter(old)
        self.peft.eval()
        self.adapter_key = (policy.adapter, adapter_id)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], d: DecodingConfig, seeds: list[int],
                 policy: Policy, trie: TitleTrie | None = None,
                 priors: list | None = None) -> list[list[Candidate]]:
        """Prompts of similar length go together, at most hf_max_sequences sequences a call.
        With a prior (D3), recray's own beam search over `_step` (the same as vLLM's)."""
        model = self.peft if self.peft is not None else self.model
        base_only = self.peft is not None and policy.adapter is None
        with self.peft.disable_adapter() if base_only else contextlib.nullcontext():
            bonus = prior_bonus(trie, priors, d.prior_weight)
            if bonus is not None:
                return self._prior_search(model, prompt_ids, d, trie, bonus)
            width = {"greedy": 1, "beam": d.num_beams, "sample": d.n}[d.mode]
            per_call = max(1, self.cfg.hf_max_sequences // width)
            order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
            out: list[list[Candidate]] = [[] for _ in prompt_ids]
            for start in range(0, len(order), per_call):
                rows = order[start:start + per_call]
                found = self._generate(model, [prompt_ids[i] for i in rows], d, seeds[rows[0]],
                                       trie)
                for i, candidates in zip(rows, found):
                    out[i] = candidates
        return out

    def _prior_search(self, model, prompt_ids: list[list[int]], d: DecodingConfig,
                      trie: TitleTrie, bonus) -> list[list[Candidate]]:
        """D3: greedy (width 1) or beam search over `_step` with the prior's bonus. One
        forward gives every allowed token's log-prob, so each step returns them all: the
        search then never asks again (recray.generate.beam)."""
        beam = d.mode == "beam"
        past = self._prompt_states(model, prompt_ids)

        def step(seqs, k, allowed):
            return self._step(model, past, seqs, max(k, *map(len, allowed)), allowed)
        found = beam_search(prompt_ids, step,
                            d.num_beams if beam else 1, d.num_return if beam else 1,
                            d.max_new_tokens, self.answers.finished, trie.allowed, bonus)
        return [[Candidate(self.answers.text(b.tokens), b.score, len(b.tokens)) for b in beams]
                for beams in found]

    def _generate(self, model, batch: list[list[int]], d: DecodingConfig, seed: int,
                  trie: TitleTrie | None) -> list[list[Candidate]]:
        width = max(len(x) for x in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch],
                            device=self.device)
        torch.manual_seed(seed)
        allowed = None if trie is None else (lambda _, seq: trie.allowed(seq[width:].tolist()))
        out = model.generate(input_ids=ids, attention_mask=mask,
                             generation_config=_generation_config(d, self.tokenizer),
                             tokenizer=self.tokenizer, prefix_allowed_tokens_fn=allowed)
        new = out.sequences[:, width:].tolist()
        lengths = [self.answers.length(t) for t in new]
        if d.mode == "beam":
            scores = out.sequences_scores.float().tolist()
        else:
            logprobs = torch.stack(out.logits, 1).float().log_softmax(-1)
            token_lp = logprobs.gather(-1, out.sequences[:, width:, None])[..., 0]
            scores = [token_lp[r, :n].sum().item() for r, n in enumerate(lengths)]
        flat = [Candidate(self.answers.text(t[:n]), s, n) for t, n, s in zip(new, lengths, scores)]
        k = len(flat) // len(batch)
        return [flat[i * k:(i + 1) * k] for i in range(len(batch))]

    def _prompt_states(self, model, prompts: list[list[int]]) -> dict[tuple[int, ...], list]:
        """Each distinct prompt's keys and values for all but its last token, per layer,
        computed once per search and shared by its beams: without them every step re-reads
        the whole prompt (~250 tokens for ~20 answer tokens)."""
        past: dict[tuple[int, ...], list] = {}
        for prompt in map(tuple, prompts):
            if prompt not in past:
                ids = torch.tensor([prompt[:-1]], device=self.device)
                cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
                past[prompt] = [(layer.keys, layer.values) for layer in cache.layers]
        return past

    def _step(self, model, past: dict[tuple[int, ...], list], seqs: list[list[int]], k: int,
              allowed: list[list[int]]) -> list[dict[int, float]]:
        """Each sequence's k likeliest allowed next tokens with their log-probs. A sequence is
        one of `past`'s prompts plus the tokens generated so far (as many in every sequence of
        a step): the prompts' states, left-padded to one length, are the cache, and only the
        prompt's last token and the generated ones run, hf_max_sequences at a time."""
        out: list[dict[int, float]] = []
        lengths = sorted({len(p) for p in past})
        for start in range(0, len(seqs), self.cfg.hf_max_sequences):
            chunk = seqs[start:start + self.cfg.hf_max_sequences]
            prompts = [next(p for n in lengths if (p := tuple(s[:n])) in past) for s in chunk]
            cache, mask = self._padded_cache(past, prompts)
            tail = [s[len(p) - 1:] for s, p in zip(chunk, prompts)]
            positions = torch.tensor([[len(p) - 1 + i for i in range(len(t))]
                                      for p, t in zip(prompts, tail)], device=self.device)
            mask = torch.cat([mask, torch.ones(len(chunk), len(tail[0]), dtype=torch.long,
                                               device=self.device)], 1)
            logits = model(input_ids=torch.tensor(tail, device=self.device), past_key_values=cache,
                           attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1).logits[:, -1].float()
            logprobs = logits.log_softmax(-1).cpu()
            for row, options in zip(logprobs, allowed[start:start + len(chunk)]):
                values = row[options]
                top = values.topk(min(k, len(options))).indices.tolist()
                out.append({options[i]: float(values[i]) for i in top})
        return out

    def _padded_cache(self, past: dict[tuple[int, ...], list], prompts: list[tuple[int, ...]]):
        """One DynamicCache of the prompts' states, left-padded to the longest, and its mask."""
        from transformers import DynamicCache
        width = max(len(p) for p in prompts) - 1

        def padded(tensor):         # (1, heads, length, dim) -> (1, heads, width, dim)
            return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[2], 0))
        layers = [(torch.cat([padded(past[p][i][0]) for p in prompts]),
                   torch.cat([padded(past[p][i][1]) for p in prompts]))
                  for i in range(len(past[prompts[0]]))]
        mask = torch.tensor([[0] * (width - len(p) + 1) + [1] * (len(p) - 1) for p in prompts],
                            device=self.device)
        return DynamicCache(ddp_cache_data=layers), mask

    def close(self) -> None:
        self.model = self.peft = None

