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


ParseStatus = Literal["quoted", "line", "unparsable"]

_QUOTED = re.compile(r'"([^"\n]+)"')


def parse_title(answer: str) -> tuple[str | None, ParseStatus]:
    """The first double-quoted span; else the first non-empty line; else unparsable."""
    match = _QUOTED.search(answer)
    if match and match.group(1).strip():
        return match.group(1).strip(), "quoted"
    for line in answer.splitlines():
        if line.strip():
            return line.strip(), "line"
    return None, "unparsable"
