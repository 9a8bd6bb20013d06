"""Beam search over any next-token step function, with the title-line stop.

vLLM's own `LLM.beam_search` ends a beam only at EOS, so its beams run past the end of
the title line and are ranked by what follows it. This is the same search as transformers'
(`length_penalty=0`, `early_stopping=False`): each step extends every running beam by its
2·width most likely tokens, keeps the 2·width best candidates by cumulative log-prob;
candidates that finish (EOS or the title-line stop) and rank within the first `width`
become hypotheses, the best `width` unfinished ones run on. A prompt is done when it holds
`width` hypotheses and no running beam scores above the worst of them (scores only fall),
or at max_new_tokens, where running beams join the hypotheses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

# seqs (prompt + generated token ids), k, and per seq the tokens it may take (None: any)
# -> for each seq, {token id: log-prob} of its >= k likeliest (allowed) tokens
StepFn = Callable[[list[list[int]], int, list[list[int]] | None], list[dict[int, float]]]


@dataclass
class Beam:
    tokens: list[int]           # generated tokens only
    score: float                # cumulative log-prob


@dataclass
class _Search:
    prompt: list[int]
    running: list[Beam] = field(default_factory=lambda: [Beam([], 0.0)])
    finished: list[Beam] = field(default_factory=list)

    def done(self, width: int) -> bool:
        if not self.running:
            return True
        if len(self.finished) < width:
            return False
        worst = sorted(b.score for b in self.finished)[-width]
        return max(b.score for b in self.running) <= worst


# (prompt index, generated tokens, next token) -> a term added to the token's log-prob (D3)
Bonus = Callable[[int, list[int], int], float]


def _advance(search: _Search, top: list[dict[int, float]], width: int,
             is_finished: Callable[[list[int]], bool], bonus: Callable[[list[int], int], float]) -> None:
    candidates = [Beam(beam.tokens + [token], beam.score + logprob + bonus(beam.tokens, token))
                  for beam, options in zip(search.running, top)
                  for token, logprob in options.items()]
    # Best first; ties by token sequence, so the order never depends on dict order.
    candidates.sort(key=lambda b: (-b.score, b.tokens))
    running = []
    for rank, beam in enumerate(candidates[: 2 * width]):
        if is_finished(beam.tokens):
            if rank < width:
                search.finished.append(beam)
        elif len(running) < width:
            running.append(beam)
    search.running = running


def _enough_for_bonus(tops: list[dict[int, float]], step: StepFn, seqs: list[list[int]],
                      options: list[list[int]], searches: list[_Search], prompts: list[int],
                      width: int, bonus: Bonus) -> list[dict[int, float]]:
    """The bonus is a log-share (<= 0): a token the step did not return scores at most its
    beam's score plus the lowest log-prob returned for that beam. Where that could still reach
    a prompt's best 2·width candidates, its beams ask again for twice as many tokens, until
    no unseen token can (or every allowed one is seen). The search stays exact while a step
    usually asks for 2·width tokens, not for all allowed ones (hundreds at a title's start)."""
    k, rows, start = 2 * width, [], 0
    for search in searches:
        rows.append(range(start, start + len(search.running)))
        start += len(search.running)
    while True:
        short: list[int] = []
        for search, prompt, beams in zip(searches, prompts, rows):
            if all(len(tops[r]) >= len(options[r]) for r in beams):
                continue            # every allowed token seen (the hf step returns them all)
            totals = sorted((b.score + lp + bonus(prompt, b.tokens, t)
                             for b, r in zip(search.running, beams) for t, lp in tops[r].items()),
                            reverse=True)
            bar = totals[2 * width - 1] if len(totals) >= 2 * width else -math.inf
            if any(len(tops[r]) < len(options[r]) and b.score + min(tops[r].values()) >= bar
                   for b, r in zip(search.running, beams)):
                short += beams
        if not short:
            return tops
        k *= 2
        for r, top in zip(short, step([seqs[r] for r in short], k, [options[r] for r in short])):
            tops[r] = top


def beam_search(prompts: Sequence[list[int]], step: StepFn, width: int, num_return: int,
                max_new_tokens: int, is_finished: Callable[[list[int]], bool],
                allowed: Callable[[list[int]], list[int]] | None = None,
                bonus: Bonus | None = None) -> list[list[Beam]]:
    """For each prompt, its `num_return` best hypotheses, best first. `allowed(generated)`:
    the tokens a beam may take next (catalog-constrained decoding); None: any. `bonus`: a
    term added to each candidate token's log-prob (D3's, never positive); the step is asked
    for more tokens wherever one it did not return could still enter the beam."""
    if bonus is not None and allowed is None:
        raise ValueError("a bonus term needs the allowed tokens (catalog-constrained decoding)")
    searches = [_Search(list(p)) for p in prompts]
    for _ in range(max_new_tokens):
        live = [i for i, s in enumerate(searches) if not s.done(width)]
        if not live:
            break
        seqs = [searches[i].prompt + b.tokens for i in live for b in searches[i].running]
        options = [allowed(b.tokens) for i in live for b in searches[i].running] if allowed else None
        tops = step(seqs, 2 * width, options)
        if bonus:
            tops = _enough_for_bonus(tops, step, seqs, options, [searches[i] for i in live],
                                     live, width, bonus)
        tops = iter(tops)
        for i in live:
            s = searches[i]
            term = (lambda tokens, token, i=i: bonus(i, tokens, token)) if bonus else (lambda *_: 0.0)
            _advance(s, [next(tops) for _ in s.running], width, is_finished, term)
    out = []
    for s in searches:
        # Stopped early: no running beam can beat the hypotheses. Else they compete.
        pool = s.finished if s.done(width) else s.finished + s.running
        out.append(sorted(pool, key=lambda b: (-b.score, b.tokens))[:num_return])
    return out
