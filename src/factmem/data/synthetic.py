"""Synthetic sources generated locally and seeded: KVR (key-value recall) and REMIX random words."""

from __future__ import annotations

import dataclasses
import random
import string
from dataclasses import dataclass
from functools import lru_cache

from factmem.data.examples import Example, make_id
from factmem.data.registry import register_source

KVR_ALPHABET = string.ascii_lowercase + string.digits
KVR_PROMPT = "The value of key {key} is?"
RANDOM_WORDS_PROMPT = "Memorize the following random-string passage: {words}"


@dataclass
class KVRParams:
    key_length: int = 8
    """characters per key (the paper: 8 lowercase alphanumerics)"""
    value_length: int = 8
    """characters per value"""

    def __post_init__(self) -> None:
        if self.key_length < 4 or self.value_length < 1:
            raise ValueError("key_length must be >= 4 and value_length >= 1")


def kvr_pairs(count: int, seed: int, key_length: int = 8, value_length: int = 8):
    """The first `count` (key, value) pairs of the seeded KVR stream, keys unique.

    Pair i is the same whatever `count` is, so `offset` selects disjoint A and B sets
    (the paper's KVR-B is items 2000-4000 of the same stream)."""
    rng = random.Random(f"kvr:{seed}")
    seen: set[str] = set()
    pairs = []
    while len(pairs) < count:
        key = "".join(rng.choices(KVR_ALPHABET, k=key_length))
        value = "".join(rng.choices(KVR_ALPHABET, k=value_length))
        if key in seen:  # 36^8 = 2.8e12 keys: rare, but uniqueness is a promise
            continue
        seen.add(key)
        pairs.append((key, value))
    return pairs


@register_source("kvr", KVRParams, kind="factoid", unbounded=True)
def kvr(params: KVRParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """Key-value recall: `The value of key fw2e54ad is?` -> `kc87to2e`."""
    assert n is not None
    pairs = kvr_pairs(offset + n, seed, params.key_length, params.value_length)
    return [
        Example.qa(make_id("kvr", i, seed), KVR_PROMPT.format(key=k), v, key=k, value=v)
        for i, (k, v) in enumerate(pairs[offset:], start=offset)
    ]


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Webster's 2nd International word list (english-words package, offline, ~234k words): the
    dictionary words of the paper's example (`maladministrator revindicate subjectivist`)."""
    from english_words import get_english_words_set

    return tuple(sorted(get_english_words_set(["web2"], lower=True, alpha=True)))


@dataclass
class RandomWordsParams:
    length: int = 16
    """words per passage (the paper ablates sequence length)"""
    prompt_words: int | None = None
    """words shown in the user turn; the rest is the assistant target (default: half)"""

    def __post_init__(self) -> None:
        if self.length < 2:
            raise ValueError("length must be >= 2 (some words to show, some to complete)")
        if self.prompt_words is not None and not 1 <= self.prompt_words < self.length:
            raise ValueError(f"prompt_words must be between 1 and length-1 ({self.length - 1})")


@register_source("random-words", RandomWordsParams, kind="mix", unbounded=True)
def random_words(params: RandomWordsParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """REMIX random word sequences: a passage of random dictionary words to memorize."""
    assert n is not None
    words = word_list()
    split = params.prompt_words or params.length // 2
    # passage i is one random stream cut at `length` words: the id names non-default settings
    # (`random-words(length=8):5`) so that two lengths' passage 5 never share an id
    changed = [f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(params)
               if getattr(params, f.name) != f.default]
    tag = f"random-words({','.join(changed)})" if changed else "random-words"
    out = []
    for i in range(offset, offset + n):
        rng = random.Random(f"random-words:{seed}:{i}")  # per item: stable under any n/offset
        passage = rng.choices(words, k=params.length)
        prompt = RANDOM_WORDS_PROMPT.format(words=" ".join(passage[:split]))
        out.append(Example.qa(make_id(tag, i, seed), prompt, " ".join(passage[split:]),
                              kind="mix"))
    return out
