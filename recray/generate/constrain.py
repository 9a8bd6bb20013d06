"""Catalog-constrained decoding: every answer is one of the catalog's answers exactly.

The catalog's answers (`"Title"\\n`, recray.data.prompts.build_completion) are tokenised
once into a prefix tree; at each step a beam may take only the tokens that continue some
answer. Both backends use it: transformers through `prefix_allowed_tokens_fn`, vLLM
through per-request `allowed_token_ids` in recray's own step loop (recray.generate.beam).
Scores stay the policy's log-probs of the tokens taken (not renormalised over the allowed
ones), as transformers' constrained beam search scores them. D3 (seed-methods.md §5.2)
adds α × `prior_term`, a text-free recommender's share of the titles each token leads to.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from recray.data.prompts import build_completion


def titles_key(titles: Sequence[str]) -> str:
    """Names one catalog's titles, so an engine builds its tree once per catalog."""
    return hashlib.sha256("\n".join(sorted(set(titles))).encode()).hexdigest()[:16]


class TitleTrie:
    def __init__(self, tokenizer, titles: Sequence[str]):
        eos = tokenizer.eos_token_id
        self.end = [eos[0] if isinstance(eos, list) else eos]
        self.root: dict[int, dict] = {}
        # prefix -> the indices (in `titles`' order, a repeated title giving several) of the
        # titles that start with it: what D3's prior term sums over
        under: dict[tuple[int, ...], list[int]] = {(): list(range(len(titles)))}
        tokens_of = {t: tokenizer.encode(build_completion(t), add_special_tokens=False)
                     for t in set(titles)}
        for title in sorted(tokens_of):
            node = self.root
            for token in tokens_of[title]:
                node = node.setdefault(token, {})
        for index, title in enumerate(titles):
            tokens = tokens_of[title]
            for end in range(1, len(tokens) + 1):
                under.setdefault(tuple(tokens[:end]), []).append(index)
        self.under = {prefix: np.array(items) for prefix, items in under.items()}

    def prior_term(self, generated: Sequence[int], token: int, log_prior: np.ndarray) -> float:
        """D3's text-free term log p(token | generated) = log Σ_{titles under generated·token}
        p(i) − log Σ_{titles under generated}, from a log-prior over the titles (e.g. SASRec's
        log-softmax scores); 0 for a token that continues no title (EOS after a whole one)."""
        after = self.under.get((*generated, token))
        if after is None:
            return 0.0
        return float(np.logaddexp.reduce(log_prior[after])
                     - np.logaddexp.reduce(log_prior[self.under[tuple(generated)]]))

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may follow `generated`; EOS once a whole answer is written (the
        title-line stop ends decoding there first) or off the tree."""
        node = self.root
        for token in generated:
            node = node.get(token)
            if node is None:
                return self.end
        return list(node) or self.end


def prior_bonus(trie: TitleTrie | None, priors, weight: float):
    """D3's bonus for recray.generate.beam: α × `prior_term` under each prompt's log-prior
    (None: no prior given, or α = 0)."""
    if priors is None or weight == 0:
        return None
    if trie is None:
        raise ValueError("a prior over the titles needs catalog-constrained decoding")
    return lambda prompt, generated, token: weight * trie.prior_term(generated, token, priors[prompt])
