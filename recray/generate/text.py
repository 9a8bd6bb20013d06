"""Text rules every backend shares: where an answer stops, and how a prompt too long for
the engine is shortened.

An answer is one title line, `"Title"\\n` (recray.data.prompts.build_completion); decoding
stops once the text holds a closing quote followed by a newline (STOP), and the answer
text is cut right after it, whatever the last token held beyond.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

from recray.data.prompts import build_prompt
from recray.errors import RecrayError

STOP = '"\n'



class Candidate(NamedTuple):
    text: str           # the answer, cut after STOP
    score: float        # cumulative log-prob of its tokens under the policy
    n_tokens: int       # tokens generated, the one that ended it included


_NOUN = re.compile(r"Given a list of (\w[\w ]*?)s the user recently")


def cut_at_stop(text: str) -> tuple[str, bool]:
    """(text up to and including the first STOP, whether STOP was found)."""
    at = text.find(STOP)
    if at < 0:
        return text, False
    return text[:at + len(STOP)], True


def _noun_of(prompt: str, history_titles: Sequence[str]) -> str | None:
    """The noun with which build_prompt(history_titles, noun) rebuilds `prompt`, if any."""
    match = _NOUN.search(prompt)
    if match and build_prompt(history_titles, match.group(1)) == prompt:
        return match.group(1)
    return None


def fit_prompt(sample_id: str, prompt: str, history_titles: Sequence[str] | None,
               count_tokens, limit: int) -> tuple[str, int]:
    """The prompt shortened to at most `limit` tokens, and how many titles were dropped.

    Whole titles are dropped, oldest first, and the prompt is rebuilt with build_prompt,
    so no title is ever cut. At least one title is kept. `count_tokens(text) -> int`.
    """
    n_tokens = count_tokens(prompt)
    if n_tokens <= limit:
        return prompt, 0
    fix = ("raise generate.max_model_len, or lower generate.decoding.max_new_tokens "
           f"(a prompt may use max_model_len - max_new_tokens = {limit} tokens)")
    if not history_titles:
        raise RecrayError(f"sample {sample_id}: prompt of {n_tokens} tokens is too long and has "
                          f"no history_titles to drop; {fix}")
    noun = _noun_of(prompt, history_titles)
    if noun is None:
        raise RecrayError(f"sample {sample_id}: prompt of {n_tokens} tokens is too long, and it is "
                          f"not build_prompt(history_titles), so it cannot be shortened by dropping "
                          f"titles; {fix}")
    titles = list(history_titles)
    for dropped in range(1, len(titles)):
        shorter = build_prompt(titles[dropped:], noun)
        if count_tokens(shorter) <= limit:
            return shorter, dropped
    raise RecrayError(f"sample {sample_id}: even the prompt with only the latest history title "
                      f"has {count_tokens(build_prompt(titles[-1:], noun))} tokens; {fix}")


class Answers:
    """Decoded answers from token ids, by one tokenizer: where an answer ends and its text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def finished(self, tokens: Sequence[int]) -> bool:
        return bool(tokens) and (tokens[-1] in self.eos_ids or STOP in self.decode(tokens))

    def length(self, tokens: Sequence[int]) -> int:
        """Tokens up to and including the one that ends the answer (EOS or STOP), else all."""
        tokens = list(tokens)
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
        if STOP not in self.decode(tokens[:end]):
            return end
        low, high = 1, end          # smallest prefix whose text holds STOP
        while low < high:
            mid = (low + high) // 2
            if STOP in self.decode(tokens[:mid]):
                high = mid
            else:
                low = mid + 1
        return low

    def text(self, tokens: Sequence[int]) -> str:
        return cut_at_stop(self.decode(tokens))[0]
