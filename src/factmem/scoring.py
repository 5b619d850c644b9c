"""Answer matching beyond exact match, and ROUGE-L.

Match kinds (an example's `meta["match"]`, else `eval.match`):
- exact: the normalised prediction equals one of the answers (`strip().lower()`, the paper's EM)
- contains: one of the answers occurs in the normalised prediction (WebQuestions)
- number: the final number of the prediction (after `####` if present, else its last number)
  equals the gold's final number after `####` (GSM8K)
- boxed: the content of the prediction's last `\\boxed{...}` equals the gold's (MATH)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MATCH_KINDS = ("exact", "contains", "number", "boxed")
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


def match_answer(prediction: str, answers: Sequence[str], mode: str = "exact") -> bool:
    p = normalize(prediction)
    if mode == "contains":
        return any(normalize(a) in p for a in answers)
    if mode == "number":
        got = final_number(prediction)
        return got is not None and any(final_number(a) == got for a in answers)
    if mode == "boxed":
        got = last_boxed(prediction)
        return got is not None and any(last_boxed(a) == got for a in answers)
    if mode != "exact":
        raise ValueError(f"unknown match kind {mode!r}; valid: {', '.join(MATCH_KINDS)}")
    return any(p == normalize(a) for a in answers)


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
    """ROUGE-L F1 on lowercased whitespace tokens (Lin 2004, beta = 1)."""
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
