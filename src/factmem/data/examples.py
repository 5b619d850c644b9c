"""The unit of data: one chat-formatted example with its gold answer(s) and a stable id."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Literal

from factmem.scoring import MatchKind

Kind = Literal["factoid", "task", "mix"]


@dataclass(frozen=True)
class Example:
    """One training/evaluation item.

    `messages` alternate user/assistant turns (a system turn may lead); the final turn is the
    assistant's answer. Training puts loss on every assistant turn; evaluation prompts with every
    turn before the last and scores the generated answer against `answers` (the first is the
    trained target, all of them count for exact match).
    """

    id: str  # stable and derived, e.g. "kvr:17" (never a global counter)
    messages: tuple[tuple[str, str], ...]  # (role, content)
    answers: tuple[str, ...]
    kind: Kind = "factoid"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def qa(
        cls,
        id: str,
        prompt: str,
        answer: str,
        aliases: tuple[str, ...] | list[str] = (),
        kind: Kind = "factoid",
        **meta: Any,
    ) -> Example:
        # Answers are stripped where they are made: predictions are compared after `strip()`, so
        # a gold with a trailing space would be trained (and checked token by token in fast
        # mode) as something no stripped prediction can equal.
        answer = answer.strip()
        answers = (answer, *dict.fromkeys(a.strip() for a in aliases
                                         if a.strip() and a.strip() != answer))
        return cls(id, (("user", prompt), ("assistant", answer)), answers, kind, dict(meta))

    def match_kind(self, default: str | MatchKind = MatchKind.EXACT) -> MatchKind:
        """How this example's answer is scored: the kind its source set (`meta["match"]`:
        WebQuestions contains, GSM8K number, MATH boxed), else `default` (`eval.match`)."""
        return MatchKind.parse(self.meta.get("match", default))

    @property
    def source(self) -> str:
        return self.id.split(":", 1)[0].split("@", 1)[0]

    @property
    def prompt_messages(self) -> tuple[tuple[str, str], ...]:
        return self.messages[:-1]

    @property
    def prompt(self) -> str:
        """The last user turn (what is asked)."""
        return self.messages[-2][1] if len(self.messages) >= 2 else ""

    @property
    def target(self) -> str:
        return self.messages[-1][1]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "answers": list(self.answers),
            **({"meta": self.meta} if self.meta else {}),
        }


def make_id(source: str, index: int | str, seed: int = 0) -> str:
    """`kvr:17`; a non-default data seed shows in the id (`kvr@3:17`) so ids never collide."""
    return f"{source}:{index}" if seed == 0 else f"{source}@{seed}:{index}"


def check_prompt_template(template: str) -> None:
    """A source's `prompt_template` fills in `{question}` and nothing else: any other field
    (`{context}`), attribute or index (`{question.upper}`) or a stray brace would fail on the
    first row, or print Python's view of the value. Raises ValueError naming the key."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)
                  if f is not None]
    except ValueError as e:  # "Single '}' encountered in format string"
        raise ValueError(f"prompt_template: {e}; write a literal brace as {{{{ or }}}}") from None
    for f, spec, conv in fields:
        written = "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if f != "question" or spec or conv:
            raise ValueError(f"prompt_template: unknown field {written}; only {{question}} is "
                             "filled in, as it is (write a literal brace as {{ or }})")
    if not fields:
        raise ValueError("prompt_template: must contain {question}")
