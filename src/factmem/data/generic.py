"""Generic human-written text in the paper's passage-completion format (REMIX generic data).

Built-in corpus (offline): the prose of the Python Language Reference, which every CPython ships
as `pydoc_data.topics` (79 topics; ~40k words of prose once code blocks and grammar are removed,
~370 passages of 100 words). It stands in for FineWeb / Knowledge Pile / arXiv when there is no
network; any local JSONL/JSON file with a text field can be used instead (`path:`).

Format (paper): skip documents under 100 words; user turn
`Complete the following partial passage:\\n\\n{words 0-50}`, target `{words 50-100}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from factmem.data.examples import Example, make_id
from factmem.data.local import RowError, as_text, read_records
from factmem.data.registry import register_source, select
from factmem.errors import DataError

GENERIC_PROMPT = "Complete the following partial passage:\n\n{text}"


@dataclass
class GenericParams:
    path: str | None = None
    """JSONL/JSON file with one document per row; default: the built-in Python reference corpus"""
    text_field: str = "text"
    """field holding a document's text"""
    prompt_words: int = 50
    """words shown in the user turn"""
    target_words: int = 50
    """words the model must complete"""
    windows_per_doc: int | None = None
    """passages cut from each document (default: all for the built-in corpus, 1 for files)"""
    shuffle: bool = True
    """pick passages in a seeded random order (a mixture should not be all one topic)"""

    def __post_init__(self) -> None:
        if self.prompt_words < 1 or self.target_words < 1:
            raise ValueError("prompt_words and target_words must be >= 1")
        if self.windows_per_doc is not None and self.windows_per_doc < 1:
            raise ValueError("windows_per_doc must be >= 1")


@lru_cache(maxsize=1)
def builtin_documents() -> tuple[tuple[str, str], ...]:
    """(topic, prose) pairs from the Python Language Reference shipped with CPython.

    Indented blocks (code, grammar rules) and heading underlines are removed: what stays is
    the human-written running text."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paragraphs = re.split(r"\n\s*\n", topics[name])
        prose = [
            p for p in paragraphs
            if p.strip() and not p.startswith(" ") and not set(p.strip()) <= set("*=-~^")
        ]
        docs.append((name, " ".join(" ".join(prose).split())))
    return tuple(docs)


def file_documents(path: str, field: str) -> list[tuple[str, str]]:
    """(line, text) of every row of a local file."""
    docs = []
    for r in read_records(path, required=(field,)):
        try:
            docs.append((str(r.line), as_text(r.data[field], field)))
        except RowError as e:
            raise DataError(f"{path}:{r.line}: {e}") from None
    return docs


def passages(docs: list[tuple[str, str]], words_per_passage: int, windows_per_doc: int | None):
    """Non-overlapping word windows, documents shorter than one window skipped."""
    out = []
    for doc_id, text in docs:
        words = text.split()
        count = len(words) // words_per_passage
        if windows_per_doc is not None:
            count = min(count, windows_per_doc)
        for w in range(count):
            out.append((f"{doc_id}#{w}",
                        words[w * words_per_passage : (w + 1) * words_per_passage]))
    return out


@register_source("generic", GenericParams, kind="mix")
def generic(params: GenericParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """Generic text, passage completion: 50 words shown, the next 50 to complete."""
    import random

    if params.path is None:
        docs, windows, what = list(builtin_documents()), params.windows_per_doc, "built-in corpus"
    else:
        docs = file_documents(params.path, params.text_field)
        windows, what = params.windows_per_doc or 1, params.path
    size = params.prompt_words + params.target_words
    pool = passages(docs, size, windows)
    order = list(range(len(pool)))
    if params.shuffle:
        random.Random(f"generic:{seed}").shuffle(order)
    chosen = select(order, n, offset, f"generic text ({what}: passages of {size} words)")
    out = []
    for i in chosen:
        doc, words = pool[i]
        prompt = GENERIC_PROMPT.format(text=" ".join(words[: params.prompt_words]))
        where = {} if params.path is None else {"path": params.path,
                                                 "line": int(doc.split("#")[0])}
        out.append(Example.qa(make_id("generic", i, 0), prompt,
                              " ".join(words[params.prompt_words :]), kind="mix", doc=doc,
                              **where))
    return out
