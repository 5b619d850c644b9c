"""Manipulation probes: ask memorized facts in changed forms.

- `original`: the trained question, as a reference.
- `paraphrase`: the same question in other words.
- `choice`: multiple choice among distractors drawn from the same set (same relation first);
  scored twice: exact match of the generated answer, and `choice_correct`, whether the gold
  option is the most likely answer (mean log-probability) among the options.
- `reverse`: value -> key, object -> subject.

Probes are built from `Example.meta`: KVR carries `key`/`value`; entity-like sources carry
`subject`/`relation`/`object`. Facts with neither are skipped (counted in `skipped`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from factmem.data.examples import Example
from factmem.evaluate import evaluate_examples, teacher_forced
from factmem.models import Formatter

PROBES = ("original", "paraphrase", "choice", "reverse")

KVR_PARAPHRASE = "What value is stored under the key {key}?"
KVR_CHOICE = ("Which of these is the value of key {key}? Options: {options}. "
              "Answer with the value only.")
KVR_REVERSE = "Which key has the value {value}?"
ENTITY_PARAPHRASE = "Tell me the {relation} of {subject}."
ENTITY_CHOICE = ("What is the {relation} of {subject}? Options: {options}. "
                 "Answer with the option only.")
ENTITY_REVERSE = "Whose {relation} is {object}?"


@dataclass(frozen=True)
class ProbeTemplates:
    """The changed forms of a fact's question; fields {key} {value} (KVR), {subject}
    {relation} {object} (entities) and {options} (choice)."""

    paraphrase: str
    choice: str
    reverse: str


TEMPLATES = {  # fact kind (see `fact_triple`) -> its probe questions
    "kvr": ProbeTemplates(KVR_PARAPHRASE, KVR_CHOICE, KVR_REVERSE),
    "entity": ProbeTemplates(ENTITY_PARAPHRASE, ENTITY_CHOICE, ENTITY_REVERSE),
}


def fact_triple(ex: Example) -> tuple[str, str, str, str] | None:
    """(kind, subject, relation, object) of a fact from its meta, or None."""
    m = ex.meta
    if "key" in m and "value" in m:
        return "kvr", str(m["key"]), "value", str(m["value"])
    if all(k in m for k in ("subject", "relation", "object")):
        return "entity", str(m["subject"]), str(m["relation"]), str(m["object"])
    return None


def build_probes(examples: Sequence[Example], n_choices: int = 4, seed: int = 0
                 ) -> tuple[dict[str, list[Example]], int]:
    """({probe: examples}, number of facts skipped for lack of meta). Probe ids are
    `{fact id}#{probe}`; `meta["options"]` lists a choice probe's options."""
    facts = [(ex, t) for ex in examples if (t := fact_triple(ex)) is not None]
    out: dict[str, list[Example]] = {p: [] for p in PROBES}
    for ex, (kind, subj, rel, obj) in facts:
        rng = random.Random(f"probe:{seed}:{ex.id}")  # per fact: stable under any set size
        same = [t[3] for e, t in facts if e.id != ex.id and t[2] == rel and t[3] != obj]
        other = [t[3] for e, t in facts if e.id != ex.id and t[2] != rel and t[3] != obj]
        pool = list(dict.fromkeys(same)) or list(dict.fromkeys(other))
        options = [obj, *rng.sample(pool, min(n_choices - 1, len(pool)))]
        rng.shuffle(options)
        meta = {"fact": ex.id, "subject": subj, "relation": rel, "object": obj}
        fields = {"key": subj, "value": obj, "subject": subj, "relation": rel, "object": obj,
                  "options": ", ".join(options)}
        templates = TEMPLATES[kind]
        para = templates.paraphrase.format(**fields)
        choice = templates.choice.format(**fields)
        rev = templates.reverse.format(**fields)
        out["original"].append(Example(f"{ex.id}#original", ex.messages, ex.answers, ex.kind,
                                       {**meta, "probe": "original"}))
        out["paraphrase"].append(Example.qa(f"{ex.id}#paraphrase", para, ex.answers[0],
                                            ex.answers[1:], probe="paraphrase", **meta))
        out["choice"].append(Example.qa(f"{ex.id}#choice", choice, obj, probe="choice",
                                        options=options, **meta))
        out["reverse"].append(Example.qa(f"{ex.id}#reverse", rev, subj, probe="reverse", **meta))
    return out, len(examples) - len(facts)


def choice_by_likelihood(model, fmt: Formatter, probes: Sequence[Example], batch_size: int = 32
                         ) -> list[bool]:
    """Per choice probe: is the gold option the likeliest answer (mean token log-probability,
    end-of-turn included) among its options?"""
    items, owners = [], []
    for i, ex in enumerate(probes):
        for opt in ex.meta["options"]:
            items.append(fmt.encode_answer(ex, opt))
            owners.append((i, opt))
    was_training = model.training
    model.eval()
    try:
        scores = teacher_forced(model, items, fmt.tok.pad_token_id, batch_size)
    finally:
        model.train(was_training)
    best: dict[int, tuple[float, str]] = {}
    for (i, opt), s in zip(owners, scores):
        if i not in best or s[2] > best[i][0]:
            best[i] = (s[2], opt)
    return [best[i][1] == ex.answers[0] for i, ex in enumerate(probes)]


def run_probes(model, fmt: Formatter, examples: Sequence[Example], batch_size: int = 32,
               seed: int = 0) -> tuple[list[dict[str, Any]], int]:
    """(rows per probe and fact, facts skipped)."""
    probes, skipped = build_probes(examples, seed=seed)
    rows = []
    for name, items in probes.items():
        if not items:
            continue
        preds = evaluate_examples(model, fmt, items, "fast", batch_size)
        likely = choice_by_likelihood(model, fmt, items, batch_size) if name == "choice" else None
        for k, (ex, p) in enumerate(zip(items, preds)):
            row = {"probe": name, "id": ex.meta["fact"], "correct": p.correct,
                   "token_acc": p.token_acc, "logprob": p.logprob, "prediction": p.prediction}
            if likely is not None:
                row["choice_correct"] = likely[k]
            rows.append(row)
    return rows, skipped
