"""Answer matching (one registry of match kinds, used by evaluation and the yet-to-learn
filter) and ROUGE-L.

Match kinds (an example's `Example.match_kind`, else `eval.match`):
- exact: the normalised prediction equals one of the answers (`strip().lower()`, the paper's EM)
- contains: one of the answers occurs in the normalised prediction (WebQuestions)
- number: the final number of the prediction (after `####` if present, else its last number)
  equals the gold's final number after `####` (GSM8K)
- boxed: the content of the prediction's last `\\boxed{...}` equals the gold's (MATH)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from enum import Enum


class MatchKind(str, Enum):
    """How a prediction is compared with the gold answers. A str-Enum: equal to its name as a
    plain string, so configs and JSON files keep writing "exact", "contains", ..."""

    EXACT = "exact"
    CONTAINS = "contains"
    NUMBER = "number"
    BOXED = "boxed"

    def __str__(self) -> str:  # "exact", not "MatchKind.EXACT", in messages and f-strings
        return self.value

    @classmethod
    def parse(cls, value: str | MatchKind) -> MatchKind:
        """The kind named `value`; an unknown name is a ValueError listing the valid ones."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown match kind {value!r}; valid: {', '.join(MATCH_KINDS)}"
                             ) from None


MATCH_KINDS = tuple(k.value for k in MatchKind)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    return text.strip().lower()


def final_number(text: str) -> str | None:
    """`... #### 1,234` -> "1234"; without `####`, the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    value = value.replace(",", "")
    if "." in value:  # "18.00" and "18" are the same answer
        value = value.rstrip("0").rstrip(".")
    return value


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced), whitespace removed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return "".join(text[i:j].split())
    return None


def _exact(prediction: str, answers: Sequence[str]) -> bool:
    p = normalize(prediction)
    return any(p == normalize(a) for a in answers)


def _contains(prediction: str, answers: Sequence[str]) -> bool:
    p = normalize(prediction)
    return any(normalize(a) in p for a in answers)


def _same_number(prediction: str, answers: Sequence[str]) -> bool:
    got = final_number(prediction)
    return got is not None and any(final_number(a) == got for a in answers)


def _same_boxed(prediction: str, answers: Sequence[str]) -> bool:
    got = last_boxed(prediction)
    return got is not None and any(last_boxed(a) == got for a in answers)


MATCHERS: dict[MatchKind, Callable[[str, Sequence[str]], bool]] = {
    MatchKind.EXACT: _exact,
    MatchKind.CONTAINS: _contains,
    MatchKind.NUMBER: _same_number,
    MatchKind.BOXED: _same_boxed,
}


def is_match(prediction: str, answers: Sequence[str],
             mode: str | MatchKind = MatchKind.EXACT) -> bool:
    """Whether `prediction` matches one of `answers` by match kind `mode`."""
    return MATCHERS[MatchKind.parse(mode)](prediction, answers)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, O(len(a) x len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased whitespace tokens (Lin 2004, beta = 1).

    Written here rather than taken from `rouge-score`: its default tokenizer drops every
    character outside [a-z0-9] (text in other scripts scores 0, "Paris," and "Paris" become the
    same token, so the figures differ from these) and it pulls in nltk."""
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
