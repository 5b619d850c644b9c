"""Fictional-entity facts: natural-language factoids that no model can know (offline PopQA).

Each item is (subject, relation, object) asked in the style of PopQA and EntityQuestions:
`In what city was Velorin Quastabek born?` -> `Drunmoravia`. Subjects are invented names
(two random syllables per name part, ~10^13 full names), unique across the seeded stream;
objects are invented names or random years, except for the categorical relations (occupation,
sport, genre) whose objects come from short real lists, so a model could guess those with
chance 1/len(list) but cannot know them. Item i is the same under any n/offset (disjoint A/B
copies by offset); ids are `entities:i` (`entities@seed:i`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from factmem.data.examples import Example, check_prompt_template, make_id
from factmem.data.registry import register_source

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "qu", "r",
          "s", "st", "t", "th", "v", "vr", "z", "zh"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th"]

OCCUPATIONS = ["architect", "astronomer", "baker", "botanist", "carpenter", "cartographer",
               "chemist", "composer", "diplomat", "economist", "engineer", "geologist",
               "historian", "journalist", "judge", "librarian", "linguist", "mathematician",
               "painter", "pharmacist", "photographer", "physician", "pilot", "poet",
               "sculptor", "surgeon", "translator", "veterinarian"]
SPORTS = ["archery", "badminton", "curling", "fencing", "handball", "hockey", "judo", "lacrosse",
          "rowing", "rugby", "sailing", "squash", "volleyball", "water polo", "wrestling"]
GENRES = ["ambient", "baroque", "bluegrass", "blues", "dub", "flamenco", "folk", "funk", "gospel",
          "jazz", "krautrock", "ska", "soul", "synth-pop", "zydeco"]


@dataclass(frozen=True)
class Relation:
    name: str
    subject: str  # person, company, country, book, work, band
    question: str  # {s} = subject
    object: str  # city, person, company, country, university, year, or a list name


RELATIONS = (  # PopQA / EntityQuestions relations, phrased as their questions are
    Relation("birthplace", "person", "In what city was {s} born?", "city"),
    Relation("occupation", "person", "What is {s}'s occupation?", "occupation"),
    Relation("employer", "person", "Which company does {s} work for?", "company"),
    Relation("spouse", "person", "Who is {s} married to?", "person"),
    Relation("founded", "company", "In what year was {s} founded?", "year"),
    Relation("headquarters", "company", "Where is {s} headquartered?", "city"),
    Relation("capital", "country", "What is the capital of {s}?", "city"),
    Relation("author", "book", "Who is the author of {s}?", "person"),
    Relation("citizenship", "person", "Which country is {s} a citizen of?", "country"),
    Relation("educated", "person", "Where was {s} educated?", "university"),
    Relation("birth_year", "person", "In what year was {s} born?", "year"),
    Relation("composer", "work", "Who was the composer of {s}?", "person"),
    Relation("sport", "person", "What sport does {s} play?", "sport"),
    Relation("genre", "band", "What genre of music does {s} play?", "genre"),
    Relation("father", "person", "Who is the father of {s}?", "person"),
)
RELATION_NAMES = tuple(r.name for r in RELATIONS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables)).capitalize()


def fictional(kind: str, rng: random.Random) -> str:
    """An invented name of the given kind (or a year / list item for categorical kinds)."""
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, 2)}"
    if kind == "city":
        return _word(rng, rng.randint(2, 3))
    if kind == "country":
        return _word(rng, 2) + rng.choice(["ia", "istan", "land", "ovia", "ara"])
    if kind == "company":
        suffix = rng.choice(["Industries", "Systems", "Labs", "Holdings", "Works"])
        return f"{_word(rng, 2)} {suffix}"
    if kind == "university":
        return f"University of {_word(rng, 3)}"
    if kind == "book":
        return f"The {_word(rng, 2)} of {_word(rng, 3)}"
    if kind == "work":
        return f"{rng.choice(['Symphony', 'Sonata', 'Requiem', 'Nocturne'])} of {_word(rng, 3)}"
    if kind == "band":
        return f"The {_word(rng, 2)}s"
    if kind == "year":
        return str(rng.randint(1700, 2020))
    lists = {"occupation": OCCUPATIONS, "sport": SPORTS, "genre": GENRES}
    return rng.choice(lists[kind])


@lru_cache(maxsize=8)
def _stream(count: int, seed: int, relations: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """The first `count` (relation, subject, object) triples of the seeded stream; subjects are
    unique. Relations cycle, so any n gets an even mix; triple i never depends on `count`."""
    rels = [r for r in RELATIONS if r.name in relations]
    rng = random.Random(f"entities:{seed}")
    seen: set[str] = set()
    out = []
    while len(out) < count:
        rel = rels[len(out) % len(rels)]
        subject, obj = fictional(rel.subject, rng), fictional(rel.object, rng)
        if subject in seen:  # a repeated subject would make two items share a question
            continue
        seen.add(subject)
        out.append((rel.name, subject, obj))
    return tuple(out)


@dataclass
class EntitiesParams:
    relations: list[str] = field(default_factory=lambda: list(RELATION_NAMES))
    """relations to draw from (default: all 15)"""
    prompt_template: str = "{question}\nThe answer is: "
    """user turn: the paper's QA format (D_A); '{question}' for a bare-question D_B set"""

    def __post_init__(self) -> None:
        bad = [r for r in self.relations if r not in RELATION_NAMES]
        if bad or not self.relations:
            raise ValueError(f"relations: unknown {bad or 'none given'}; valid: "
                             f"{', '.join(RELATION_NAMES)}")
        check_prompt_template(self.prompt_template)


@register_source("entities", EntitiesParams, kind="factoid", unbounded=True)
def entities(params: EntitiesParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """Fictional-entity facts: `In what city was Velorin Quastabek born?` -> an invented city."""
    assert n is not None
    triples = _stream(offset + n, seed, tuple(sorted(params.relations)))
    questions = {r.name: r.question for r in RELATIONS}
    return [
        Example.qa(make_id("entities", i, seed),
                   params.prompt_template.format(question=questions[rel].format(s=subj)), obj,
                   relation=rel, subject=subj, object=obj)
        for i, (rel, subj, obj) in enumerate(triples[offset:], start=offset)
    ]
