"""recray's beam search (used by the vllm backend) against exhaustive search."""

from __future__ import annotations

import itertools
import math

import numpy as np

from recray.generate.beam import beam_search

VOCAB, EOS, MAX_NEW = 4, 0, 3


def table_step(seed: int):
    """A next-token distribution that depends on the whole sequence (seeded by it)."""
    def logprobs(seq: list[int]) -> list[float]:
        logits = np.random.default_rng([seed, *seq]).normal(size=VOCAB) * 2
        return list(logits - np.log(np.exp(logits).sum()))

    def step(seqs: list[list[int]], k: int, allowed=None) -> list[dict[int, float]]:
        out = []
        for i, seq in enumerate(seqs):
            lp = logprobs(seq)
            options = range(VOCAB) if allowed is None else allowed[i]
            top = sorted(options, key=lambda t: -lp[t])[:k]
            out.append({t: lp[t] for t in top})
        return out
    return step, logprobs


def exhaustive(prompt: list[int], logprobs, k: int) -> list[tuple[float, list[int]]]:
    """Every answer that ends at EOS or at MAX_NEW tokens, best k by cumulative log-prob."""
    found = []
    for n in range(1, MAX_NEW + 1):
        for tokens in itertools.product(range(VOCAB), repeat=n):
            if EOS in tokens[:-1] or (n < MAX_NEW and tokens[-1] != EOS):
                continue
            score = sum(logprobs(prompt + list(tokens[:i]))[t] for i, t in enumerate(tokens))
            found.append((score, list(tokens)))
    return sorted(found, key=lambda x: (-x[0], x[1]))[:k]


def test_wide_beam_equals_exhaustive_search():
    for seed in range(5):
        step, logprobs = table_step(seed)
        prompts = [[7, seed], [8, seed, 1]]
        # Width VOCAB**2 keeps every running sequence of length <= 2: nothing is pruned.
        got = beam_search(prompts, step, width=VOCAB ** 2, num_return=5, max_new_tokens=MAX_NEW,
                          is_finished=lambda t: t[-1] == EOS)
        for prompt, beams in zip(prompts, got):
            want = exhaustive(prompt, logprobs, 5)
            assert [b.tokens for b in beams] == [t for _, t in want]
            assert all(math.isclose(b.score, s, abs_tol=1e-9) for b, (s, _) in zip(beams, want))


def test_narrow_beam_returns_finished_best_first_and_stops_early():
    step, _ = table_step(11)
    calls = []

    def counted(seqs, k, allowed):
        calls.append(len(seqs))
        return step(seqs, k, allowed)

    # Every token ends an answer: one step decides everything.
    got = beam_search([[1, 2]], counted, width=2, num_return=2, max_new_tokens=10,
                      is_finished=lambda t: True)
    assert len(calls) == 1 and len(got[0]) == 2
    assert got[0][0].score >= got[0][1].score and all(len(b.tokens) == 1 for b in got[0])


def test_constrained_beam_returns_only_allowed_answers_best_first():
    """A prefix tree of three answers; the wide constrained search equals ranking them."""
    answers = [[1, 2, EOS], [1, 3, EOS], [2, EOS]]

    def allowed(generated):
        return sorted({a[len(generated)] for a in answers if a[:len(generated)] == generated})

    step, logprobs = table_step(3)
    prompt = [5, 6]
    got = beam_search([prompt], step, width=4, num_return=3, max_new_tokens=MAX_NEW,
                      is_finished=lambda t: t[-1] == EOS, allowed=allowed)[0]
    want = sorted(answers, key=lambda a: -sum(logprobs(prompt + a[:i])[t] for i, t in enumerate(a)))
    assert [b.tokens for b in got] == want
    greedy = beam_search([prompt], step, width=1, num_return=1, max_new_tokens=MAX_NEW,
                         is_finished=lambda t: t[-1] == EOS, allowed=allowed)[0]
    assert greedy[0].tokens in answers


def test_d3_prior_term_telescopes_to_the_titles_prior_and_can_overrule_the_policy():
    """Summed over a title's tokens, D3's term is the prior's log-probability of that title
    (a repeated title counts each of its items); with a heavy weight the search writes the
    prior's title, with weight 0 the policy's."""
    import pytest
    from transformers import AutoTokenizer

    from recray.assets import model_dir
    from recray.data.prompts import build_completion
    from recray.generate.constrain import TitleTrie, prior_bonus
    tok = AutoTokenizer.from_pretrained(model_dir())
    titles = ["Heat (1995)", "Heat (1995)", "Heavy (1995)", "Casino (1995)"]
    trie = TitleTrie(tok, titles)
    prior = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    for title, p in (("Heat (1995)", 0.3), ("Heavy (1995)", 0.3), ("Casino (1995)", 0.4)):
        tokens = tok.encode(build_completion(title), add_special_tokens=False)
        total = sum(trie.prior_term(tokens[:i], t, prior) for i, t in enumerate(tokens))
        assert total == pytest.approx(np.log(p))
        assert trie.prior_term(tokens, trie.end[0], prior) == 0.0
    casino = tok.encode(build_completion("Casino (1995)"), add_special_tokens=False)

    def step(seqs, k, allowed):        # a policy that prefers any token but Casino's
        return [{t: (-5.0 if t in casino else -0.1) for t in options} for options in allowed]

    def search(weight, log_prior):
        bonus = prior_bonus(trie, [log_prior], weight)
        beams = beam_search([[1]], step, width=2, num_return=1, max_new_tokens=12,
                            is_finished=lambda t: bool(t) and t[-1] == trie.end[0],
                            allowed=trie.allowed, bonus=bonus)
        return tok.decode(beams[0][0].tokens[:-1])
    heavy_on_casino = np.log(np.array([1e-6, 1e-6, 1e-6, 1.0]))
    assert search(0.0, heavy_on_casino) != build_completion("Casino (1995)")
    assert search(10.0, heavy_on_casino) == build_completion("Casino (1995)")


def test_bonus_search_asks_for_few_tokens_and_equals_seeing_every_allowed_one():
    """A non-positive bonus (D3's log-share) never lifts an unseen token above the seen ones
    of its beam: asking for the 2·width likeliest, and for more only where an unseen token
    could still enter, gives the answers of a step that returns every allowed token."""
    vocab, eos, max_new = 12, 0, 4

    def logprobs(seq):
        logits = np.random.default_rng([5, *seq]).normal(size=vocab) * 2
        return logits - np.logaddexp.reduce(logits)

    asked = []

    def step(seqs, k, allowed):
        asked.append(k)
        return [dict(sorted(((t, float(logprobs(s)[t])) for t in options),
                            key=lambda x: -x[1])[:k]) for s, options in zip(seqs, allowed)]

    def everything(seqs, k, allowed):
        return step(seqs, max(len(o) for o in allowed), allowed)

    def bonus(prompt, generated, token):           # up to -3: it reorders the candidates
        return -3.0 * np.random.default_rng([prompt, token, *generated]).random()

    for width in (1, 3):
        prompts = [[7, width], [8, width, 1], [9]]
        kwargs = dict(width=width, num_return=width, max_new_tokens=max_new,
                      is_finished=lambda t: t[-1] == eos, allowed=lambda g: list(range(vocab)),
                      bonus=bonus)
        asked.clear()
        lazy = beam_search(prompts, step, **kwargs)
        assert min(asked) == 2 * width and max(asked) > 2 * width   # asked again somewhere
        full = beam_search(prompts, everything, **kwargs)
        assert [[(b.tokens, b.score) for b in beams] for beams in lazy] == \
               [[(b.tokens, b.score) for b in beams] for beams in full]
