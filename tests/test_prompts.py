"""The one prompt module's text rules: titles shown article-first, and how an answer's
title is read."""

from __future__ import annotations

import pytest

from recray.data.prompts import article_first, parse_title


@pytest.mark.parametrize("stored, shown", [
    ("Usual Suspects, The (1995)", "The Usual Suspects (1995)"),
    ("Big Blue, The (Grand bleu, Le) (1988)", "The Big Blue (Grand bleu, Le) (1988)"),
    ("Appartement, L' (1996)", "L'Appartement (1996)"),
    ("Pyromaniac's Love Story, A (1995)", "A Pyromaniac's Love Story (1995)"),
    ("Ciao, Professore! (1993)", "Ciao, Professore! (1993)"),     # not an article
    ("Toy Story (1995)", "Toy Story (1995)"),
])
def test_article_first(stored, shown):
    assert article_first(stored) == shown


@pytest.mark.parametrize("answer, parsed", [
    ('"Heat (1995)"\n', ("Heat (1995)", "quoted")),
    ('I suggest "Heat (1995)" tonight', ("Heat (1995)", "quoted")),
    ('""\n', (None, "unparsable")),                  # an empty quoted answer
    ('"  "\n', (None, "unparsable")),
    ('"The Usual Susp', ("The Usual Susp", "cut")),   # ran out of tokens mid-title
    ('"Heat (1995)\nmore', ("Heat (1995)", "cut")),   # the quote is not closed on its line
    ('"', (None, "unparsable")),
    ("Heat (1995)\nmore text", ("Heat (1995)", "line")),
    ("   \n  ", (None, "unparsable")),
])
def test_parse_title_edge_cases(answer, parsed):
    assert parse_title(answer) == parsed
