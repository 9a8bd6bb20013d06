"""THE prompt template (spec §2) and title parsing. Every stage uses these two functions
and nothing else, so SFT, DPO, negative generation and evaluation see the same text."""

from __future__ import annotations

import re
from typing import Literal, Sequence

_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)

_VERB = {"movie": "watched", "book": "read", "game": "played", "album": "listened to"}


def build_prompt(history_titles: Sequence[str], noun: str = "movie") -> str:
    verb = _VERB.get(noun, "interacted with")
    listed = ", ".join(f'"{t}"' for t in history_titles)
    return (
        f"{_PREAMBLE}\n\n"
        f"### Instruction:\n"
        f"Given a list of {noun}s the user recently {verb}, please recommend a new {noun} "
        f"that the user may like.\n\n"
        f"### Input:\n"
        f"The user has {verb} the following {noun}s before: {listed}\n\n"
        f"### Response:\n"
    )


# Articles that catalogs (MovieLens, IMDb) move to the end of a title: "Usual Suspects, The (1995)".
_ARTICLES = ("The", "A", "An", "Les", "La", "Le", "L'", "Il", "Das", "Der", "Die", "El", "Los",
             "Las", "Det", "Den", "Un", "Une")
_ARTICLE_LAST = re.compile(r"^(?P<name>.+?), (?P<article>" + "|".join(map(re.escape, _ARTICLES))
                           + r")(?P<rest>(?: \(.*\))?)$")


def article_first(title: str) -> str:
    """"Usual Suspects, The (1995)" -> "The Usual Suspects (1995)"; other titles unchanged.
    Only the main title moves its article; parenthesised alternates stay as stored."""
    match = _ARTICLE_LAST.match(title)
    if not match:
        return title
    article = match["article"]
    return f"{article}{'' if article.endswith(chr(39)) else ' '}{match['name']}{match['rest']}"


def build_completion(title: str) -> str:
    """The answer the model is trained to write: the quoted title and a newline."""
    return f'"{title}"\n'


ParseStatus = Literal["quoted", "cut", "line", "unparsable"]


def parse_title(answer: str) -> tuple[str | None, ParseStatus]:
    """The title of an answer, as the reference code reads it where it is right.

    The first double quote opens the title: closed on its line, the span between is the
    title ("quoted"; an empty one, `""`, is unparsable); unclosed, the rest of its line is
    ("cut": the answer ran out of tokens mid-title, which evaluation grounds but negative
    selection never takes). With no quote, the first non-empty line ("line"); else
    unparsable.
    """
    start = answer.find('"')
    if start < 0:
        line = next((x.strip() for x in answer.splitlines() if x.strip()), None)
        return (line, "line") if line else (None, "unparsable")
    rest = answer[start + 1:].split("\n", 1)[0]
    end = rest.find('"')
    title = (rest if end < 0 else rest[:end]).strip()
    if not title:
        return None, "unparsable"
    return title, "cut" if end < 0 else "quoted"
