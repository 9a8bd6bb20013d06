"""Catalog-constrained decoding: every answer is one of the catalog's answers exactly.

The catalog's answers (`"Title"\\n`, recray.data.prompts.build_completion) are tokenised
once into a prefix tree; at each step a beam may take only the tokens that continue some
answer. Both backends use it: transformers through `prefix_allowed_tokens_fn`, vLLM
through per-request `allowed_token_ids` in recray's own step loop (recray.generate.beam).
Scores stay the policy's log-probs of the tokens taken (not renormalised over the allowed
ones), as transformers' constrained beam search scores them.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from recray.data.prompts import build_completion


def titles_key(titles: Sequence[str]) -> str:
    """Names one catalog's titles, so an engine builds its tree once per catalog."""
    return hashlib.sha256("\n".join(sorted(set(titles))).encode()).hexdigest()[:16]


class TitleTrie:
    def __init__(self, tokenizer, titles: Sequence[str]):
        eos = tokenizer.eos_token_id
        self.end = [eos[0] if isinstance(eos, list) else eos]
        self.root: dict[int, dict] = {}
        for title in sorted(set(titles)):
            node = self.root
            for token in tokenizer.encode(build_completion(title), add_special_tokens=False):
                node = node.setdefault(token, {})

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may follow `generated`; EOS once a whole answer is written (the
        title-line stop ends decoding there first) or off the tree."""
        node = self.root
        for token in generated:
            node = node.get(token)
            if node is None:
                return self.end
        return list(node) or self.end
