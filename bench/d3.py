"""D3 decoding on the hf backend: shared prompt states against re-reading the prompt.

D3 (loop.method=d3) decodes with recray's own beam search over the catalog's titles,
one model call per answer token. The hf backend's step keeps each prompt's keys and
values (computed once, shared by its beams) and runs only the tokens after them; the
reference step runs the whole sequence every step, as the step did before (one left-padded
forward, logits of the last position only). Same prompts (a prepared split's), model
(SmolLM2-135M-Instruct, fp32, base weights), catalog trie and a seeded log-prior over the
titles with α = 0.25, greedy and 4 beams; both steps must give the same answers, and
the table prints seconds per prompt and the ratio, measured side by side in one run.

    python bench/d3.py --data PREPARED_DIR [--split valid] [--prompts 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from recray.assets import model_dir
from recray.config import GenerateConfig
from recray.generate.beam import beam_search
from recray.generate.constrain import TitleTrie, prior_bonus
from recray.generate.hf import HFBackend


def full_step(backend: HFBackend, model):
    """The reference: every sequence's whole prompt and answer run at each step."""
    pad = backend.tokenizer.pad_token_id

    def step(seqs, k, allowed):
        out = []
        for start in range(0, len(seqs), backend.cfg.hf_max_sequences):
            chunk = seqs[start:start + backend.cfg.hf_max_sequences]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
            mask = (torch.arange(width)[None] >= torch.tensor([width - len(x) for x in chunk])[:, None]).long()
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           logits_to_keep=1).logits[:, -1].float()
            for row, options in zip(logits.log_softmax(-1), allowed[start:start + len(chunk)]):
                values = row[options]
                top = values.topk(min(k, len(options))).indices.tolist()
                out.append({options[i]: float(values[i]) for i in top})
        return out
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared directory")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    samples = pq.read_table(args.data / args.split).slice(0, args.prompts)
    titles = pq.read_table(args.data / "catalog.parquet").column("title").to_pylist()
    backend = HFBackend(str(model_dir()), GenerateConfig(backend="hf"), args.threads)
    model = backend.model
    prompts = [backend.tokenizer.encode(p) for p in samples.column("prompt").to_pylist()]
    trie = TitleTrie(backend.tokenizer, titles)
    scores = np.random.default_rng(0).normal(size=(len(prompts), len(titles))) * 2
    bonus = prior_bonus(trie, list(scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)), 0.25)
    print(f"{len(prompts)} {args.split} prompts (mean {np.mean([len(p) for p in prompts]):.0f} "
          f"tokens), {len(titles)} titles, {args.threads} threads")
    print(f"{'decoding':<10}{'step':<24}{'s/prompt':>10}{'ratio':>8}  same answers")
    for width in (1, 4):
        seconds, answers = {}, {}
        for name in ("reference (full)", "recray (shared states)"):
            with torch.no_grad():
                start = time.perf_counter()
                if name.startswith("recray"):
                    past = backend._prompt_states(model, prompts)
                    step = lambda seqs, k, allowed: backend._step(model, past, seqs, k, allowed)  # noqa: E731
                else:
                    step = full_step(backend, model)
                found = beam_search(prompts, step, width, 1, 32, backend.answers.finished,
                                    trie.allowed, bonus)
                seconds[name] = (time.perf_counter() - start) / len(prompts)
            answers[name] = [[b.tokens for b in beams] for beams in found]
        ref = seconds["reference (full)"]
        for name, s in seconds.items():
            same = answers[name] == answers["reference (full)"]
            print(f"{'greedy' if width == 1 else f'{width} beams':<10}{name:<24}{s:>10.2f}"
                  f"{ref / s:>7.1f}x  {same}")


if __name__ == "__main__":
    main()
