"""The paper's public data sets by name, read from the Hugging Face hub or from a local copy.

Every loader reads rows from either `datasets.load_dataset(hub, config, split=split)` or a local
`path` (jsonl, json, csv/tsv, parquet, a `save_to_disk` folder), then ONE shared function,
`build_examples`, maps rows to Examples through the set's row mapper, shuffles by seed (if
asked), selects `n` items from `offset`, and names the file and line of any bad row. The field
mapping of each set is documented in docs/datasets.md.

Prompts follow the paper: D_A QA sets (PopQA, TriviaQA) `{question}\\nThe answer is: `; factoid
D_B sets (EntityQuestions, LAMA, WebQuestions) the bare question; task sets the instruction;
generic corpora the 50+50-word passage completion of REMIX.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factmem import hub
from factmem.data.examples import Example, Kind, check_prompt_template
from factmem.data.generic import GENERIC_PROMPT
from factmem.data.local import Record, RowError, _check_records, as_text, read_records, text_items
from factmem.data.registry import register_source, select
from factmem.errors import DataError
from factmem.scoring import MatchKind

log = logging.getLogger(__name__)

QA_PROMPT = "{question}\nThe answer is: "


@dataclass
class Item:
    """What a row mapper returns: the turns, the accepted answers (first = target), extras."""

    messages: tuple[tuple[str, str], ...]
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


Mapper = Callable[[dict[str, Any], Any], "Item | None"]  # None: row skipped by design (counted)


@dataclass
class HubParams:
    path: str | None = None
    """local file (jsonl/json/csv/tsv/parquet) or `save_to_disk` folder; default: the hub"""
    hub: str | None = None
    """hub dataset name read when no `path` is given"""
    config: str | None = None
    """hub dataset configuration"""
    split: str = "train"
    """hub split (a local file is read whole)"""
    shuffle: bool = False
    """shuffle the rows by the set's `seed` before `offset`/`n` select (ids stay the row's)"""

    def __post_init__(self) -> None:
        template = getattr(self, "prompt_template", None)  # the QA sets' user turn
        if template is not None:
            check_prompt_template(template)


# --------------------------------------------------------------------------------------------
# Shared machinery


def need(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError(f"row has no field {name!r} (fields: {', '.join(sorted(row))})")
    return row[name]


def need_text(row: dict[str, Any], name: str) -> str:
    """A text field that must be there (a string, or an integer written out)."""
    return as_text(need(row, name), name)


def text_list(value: Any, what: str) -> list[str]:
    """A list of strings, or a JSON-encoded list (PopQA, APPS store lists as JSON strings)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"field {what!r}: malformed JSON list ({e.msg})") from None
    out = [v.strip() for v in text_items(value, what)]
    if not out:
        raise RowError(f"field {what!r}: no answer")
    return list(dict.fromkeys(out))


def qa_item(question: str, answers: list[str], template: str = "{question}", **meta) -> Item:
    prompt = template.format(question=question.strip())
    return Item((("user", prompt), ("assistant", answers[0])), tuple(answers), meta)


def hub_rows(name: str | None, config: str | None, split: str, streaming_limit: int | None = None
             ) -> tuple[list[Record], str]:
    """Rows of a hub dataset. A thin wrapper: everything after it is shared with local files."""
    if name is None:
        raise DataError("this set has no hub dataset: give `path` to a local copy")
    where = f"{name}" + (f"/{config}" if config else "") + f"[{split}]"
    why = hub.unreachable()  # at once, instead of a minute of retries inside load_dataset
    if why is not None:
        raise DataError(f"hub dataset {where}: {hub.unreachable_hint(why)}, or give `path` to a "
                        "local copy")
    from datasets import load_dataset

    try:
        if streaming_limit is None:
            ds = load_dataset(name, config, split=split)
        else:  # web-scale corpora: read only the first rows instead of downloading terabytes
            ds = load_dataset(name, config, split=split, streaming=True).take(streaming_limit)
    except Exception as e:  # offline, unknown name, gated: one line, with the fix
        raise DataError(f"hub dataset {where}: cannot load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); give `path` to a local "
                        "copy") from None
    return [Record(i + 1, dict(row)) for i, row in enumerate(ds)], where


def load_rows(params: HubParams, key: str | None = None, streaming_limit: int | None = None
              ) -> list[tuple[str, list[Record]]]:
    """[(where, rows)]: one entry per file read (a folder of files gives several)."""
    if params.path is None:
        rows, where = hub_rows(params.hub, params.config, params.split, streaming_limit)
        return [(where, _check_records(where, rows, ()))]
    return [(params.path, read_records(params.path, (), key))]


def build_examples(
    name: str, kind: Kind, params: HubParams, files: list[tuple[str, list[Record]]],
    mapper: Mapper, n: int | None, offset: int, seed: int,
) -> list[Example]:
    """Rows -> Examples: map every row (errors name file and line), shuffle by seed if asked,
    select `n` from `offset`. Ids are `name:ROW` (`name:FILE:ROW` for several files), ROW the
    0-based position in the file, so an item keeps its id under any n/offset/shuffle."""
    items: list[tuple[str, Item, str, int]] = []
    skipped = 0
    for where, rows in files:
        tag = f"{Path(where).name.split('.')[0]}:" if len(files) > 1 else ""
        for i, r in enumerate(rows):
            try:
                item = mapper(r.data, params)
            except RowError as e:
                raise DataError(f"{where}:{r.line}: {e}") from None
            if item is None:
                skipped += 1
                continue
            items.append((f"{name}:{tag}{i}", item, where, r.line))
    if skipped:
        log.info("%s: %d of %d rows skipped by the set's definition (see docs/datasets.md)",
                 name, skipped, skipped + len(items))
    order = list(range(len(items)))
    if params.shuffle:
        random.Random(f"{name}:{seed}").shuffle(order)
    what = f"{name} ({', '.join(w for w, _ in files)}, {skipped} rows skipped)" if skipped else \
        f"{name} ({', '.join(w for w, _ in files)})"
    out = []
    for k in select(order, n, offset, what):
        id_, item, where, line = items[k]
        meta = {**item.meta, "line": line}
        if len(files) > 1:
            meta["file"] = Path(where).name
        out.append(Example(id_, item.messages, item.answers, kind, meta))
    return out


def _simple(name: str, params_cls: type, kind: Kind, mapper: Mapper, key: str | None = None,
            doc: str = ""):
    """Register a set whose rows come from one file or one hub split."""

    def build(params: HubParams, n: int | None, offset: int, seed: int) -> list[Example]:
        return build_examples(name, kind, params, load_rows(params, key), mapper, n, offset, seed)

    build.__doc__ = doc
    register_source(name, params_cls, kind=kind)(build)
    return build


# --------------------------------------------------------------------------------------------
# D_A: PopQA, TriviaQA


@dataclass
class PopQAParams(HubParams):
    hub: str | None = "akariasai/PopQA"
    """hub dataset name"""
    split: str = "test"
    """PopQA has one split, test (14,267 rows)"""
    prompt_template: str = QA_PROMPT
    """user turn; the paper's QA format"""


def popqa_row(row: dict[str, Any], p: PopQAParams) -> Item:
    answers = [need_text(row, "obj").strip(), *text_list(need(row, "possible_answers"),
                                                          "possible_answers")]
    return qa_item(need_text(row, "question"), list(dict.fromkeys(a for a in answers if a)),
                   p.prompt_template, subj=row.get("subj"), prop=row.get("prop"),
                   s_pop=row.get("s_pop"))


popqa = _simple("popqa", PopQAParams, "factoid", popqa_row,
                doc="PopQA: `{question}\\nThe answer is: ` -> obj (possible_answers count)")


@dataclass
class TriviaQAParams(HubParams):
    hub: str | None = "mandarjoshi90/trivia_qa"
    """hub dataset name"""
    config: str | None = "rc.nocontext"
    """hub configuration (question and answers only)"""
    prompt_template: str = QA_PROMPT
    """user turn; the paper's QA format"""


def triviaqa_row(row: dict[str, Any], p: TriviaQAParams) -> Item:
    if "Question" in row:  # the official raw release: {"Data": [{Question, Answer{Value, ...}}]}
        ans = need(row, "Answer")
        value = ans.get("Value")
        aliases = [*ans.get("Aliases", []), *ans.get("NormalizedAliases", [])]
        question, qid = need_text(row, "Question"), row.get("QuestionId")
    else:  # the hub's rc / rc.nocontext schema
        ans = need(row, "answer")
        if not isinstance(ans, dict):
            raise RowError(f"field 'answer': expected an object, got {type(ans).__name__}")
        value = ans.get("value")
        aliases = [*ans.get("aliases", []), *ans.get("normalized_aliases", [])]
        question, qid = need_text(row, "question"), row.get("question_id")
    if not value:
        raise RowError("the answer has no value")
    return qa_item(question, text_list([value, *aliases], "answer"), p.prompt_template,
                   question_id=qid)


triviaqa = _simple("triviaqa", TriviaQAParams, "factoid", triviaqa_row, key="Data",
                   doc="TriviaQA rc.nocontext: `{question}\\nThe answer is: ` -> value (+ aliases)")


# --------------------------------------------------------------------------------------------
# D_B factoid: EntityQuestions, LAMA, WebQuestions


@dataclass
class EntityQuestionsParams(HubParams):
    hub: str | None = None
    """none: EntityQuestions is released as json files (one per relation and split)"""
    split: str = "dev"
    """which split's files to read from a folder (train, dev, test)"""
    relations: list[str] | None = None
    """Wikidata relations to read from a folder, e.g. [P106, P36]; default: every one found"""
    prompt_template: str = "{question}"
    """user turn; the bare question (a factoid D_B set)"""


def entityquestions_row(row: dict[str, Any], p: EntityQuestionsParams) -> Item:
    return qa_item(need_text(row, "question"), text_list(need(row, "answers"), "answers"),
                   p.prompt_template)


def entityquestion_files(params: EntityQuestionsParams) -> list[tuple[str, list[Record]]]:
    if params.path is None:
        return load_rows(params)
    root = Path(params.path)
    if not root.is_dir():
        return [(params.path, read_records(params.path))]
    found: dict[str, Path] = {}
    for f in sorted(root.iterdir()):
        m = re.fullmatch(r"(P\d+)\." + re.escape(params.split) + r"\.(json|jsonl)", f.name)
        if m and m.group(1) not in found:  # P106.dev.json and .jsonl hold the same rows: one
            found[m.group(1)] = f
    wanted = params.relations or sorted(found, key=lambda r: int(r[1:]))
    missing = [r for r in wanted if r not in found]
    if missing or not wanted:
        raise DataError(f"{root}: no {params.split} file for relation(s) "
                        f"{', '.join(missing) or 'any'} (expected e.g. P106.{params.split}.json); "
                        f"found: {', '.join(sorted(found)) or 'none'}")
    return [(str(found[r]), read_records(found[r])) for r in wanted]


@register_source("entityquestions", EntityQuestionsParams, kind="factoid")
def entityquestions(params: EntityQuestionsParams, n: int | None, offset: int, seed: int
                    ) -> list[Example]:
    """EntityQuestions: the bare question -> answers[0] (all answers count)."""
    return build_examples("entityquestions", "factoid", params, entityquestion_files(params),
                          entityquestions_row, n, offset, seed)


# Google-RE relations have no template in their rows; these are LAMA's own (LAMA/scripts).
GOOGLE_RE_TEMPLATES = {
    "/people/person/place_of_birth": "[X] was born in [Y] .",
    "/people/person/date_of_birth": "[X] (born [Y]).",
    "/people/deceased_person/place_of_death": "[X] died in [Y] .",
}


# T-REx relations: the templates of LAMA's data/relations.jsonl (facebookresearch/LAMA data
# release), 41 relations with T-REx files plus 5 without (P166, P69, P54, P1923, P102). The raw
# T-REx rows carry only `predicate_id`, so released files load as they are with this table.
# Note P1923 puts the object first ("[Y] participated in the [X] .").
TREX_TEMPLATES = {
    "P19": "[X] was born in [Y] .",
    "P20": "[X] died in [Y] .",
    "P279": "[X] is a subclass of [Y] .",
    "P37": "The official language of [X] is [Y] .",
    "P413": "[X] plays in [Y] position .",
    "P166": "[X] was awarded the [Y] .",
    "P449": "[X] was originally aired on [Y] .",
    "P69": "[X] was educated at the University of [Y] .",
    "P47": "[X] shares border with [Y] .",
    "P138": "[X] is named after [Y] .",
    "P364": "The original language of [X] is [Y] .",
    "P54": "[X] plays with [Y] .",
    "P463": "[X] is a member of [Y] .",
    "P101": "[X] works in the field of [Y] .",
    "P1923": "[Y] participated in the [X] .",
    "P106": "[X] is a [Y] by profession .",
    "P527": "[X] consists of [Y] .",
    "P102": "[X] is a member of the [Y] political party .",
    "P530": "[X] maintains diplomatic relations with [Y] .",
    "P176": "[X] is produced by [Y] .",
    "P27": "[X] is [Y] citizen .",
    "P407": "[X] was written in [Y] .",
    "P30": "[X] is located in [Y] .",
    "P178": "[X] is developed by [Y] .",
    "P1376": "[X] is the capital of [Y] .",
    "P131": "[X] is located in [Y] .",
    "P1412": "[X] used to communicate in [Y] .",
    "P108": "[X] works for [Y] .",
    "P136": "[X] plays [Y] music .",
    "P17": "[X] is located in [Y] .",
    "P39": "[X] has the position of [Y] .",
    "P264": "[X] is represented by music label [Y] .",
    "P276": "[X] is located in [Y] .",
    "P937": "[X] used to work in [Y] .",
    "P140": "[X] is affiliated with the [Y] religion .",
    "P1303": "[X] plays [Y] .",
    "P127": "[X] is owned by [Y] .",
    "P103": "The native language of [X] is [Y] .",
    "P190": "[X] and [Y] are twin cities .",
    "P1001": "[X] is a legal term in [Y] .",
    "P31": "[X] is a [Y] .",
    "P495": "[X] was created in [Y] .",
    "P159": "The headquarter of [X] is in [Y] .",
    "P36": "The capital of [X] is [Y] .",
    "P740": "[X] was founded in [Y] .",
    "P361": "[X] is part of [Y] .",
}


@dataclass
class LAMAParams(HubParams):
    hub: str | None = "facebook/lama"
    """hub dataset name (its rows carry their template)"""
    config: str | None = "trex"
    """hub configuration: trex or google_re"""
    relations_path: str | None = None
    """T-REx relations file (relation, template) whose templates override LAMA's built-in ones;
    default: relations.jsonl beside `path` if there is one"""
    prompt_template: str = "Fill in the blank: {question}"
    """user turn; {question} is the relation template with the subject and a ___ blank"""


def lama_question(template: str, subject: str) -> str:
    if "[X]" not in template or "[Y]" not in template:
        raise RowError(f"template {template!r} lacks [X] or [Y]")
    text = template.replace("[X]", subject).replace("[Y]", "___")
    return re.sub(r"\s+([.?!])$", r"\1", text)  # LAMA templates end in " ."


def lama_templates(params: LAMAParams) -> dict[str, str]:
    """Relation -> template: LAMA's T-REx templates, overridden by a relations file's."""
    templates = dict(TREX_TEMPLATES)
    if params.relations_path:
        rel: Path | None = Path(params.relations_path)
        if not rel.is_file():
            raise DataError(f"relations_path {rel}: no such file")
    else:
        beside = Path(params.path).parent / "relations.jsonl" if params.path else None
        rel = beside if beside is not None and beside.is_file() else None
    if rel is not None:
        for r in read_records(rel, ("relation", "template")):
            try:
                templates[as_text(r.data["relation"], "relation")] = as_text(r.data["template"],
                                                                       "template")
            except RowError as e:
                raise DataError(f"{rel}:{r.line}: {e}") from None
    return templates


@register_source("lama", LAMAParams, kind="factoid")
def lama(params: LAMAParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """LAMA (T-REx, Google-RE): the relation template as a fill-in-the-blank -> obj_label."""
    templates = lama_templates(params)

    def row_fn(row: dict[str, Any], p: LAMAParams) -> Item:
        subject, obj = need_text(row, "sub_label"), need_text(row, "obj_label")
        if "pred" in row:  # Google-RE
            template = GOOGLE_RE_TEMPLATES.get(row["pred"])
            relation = row["pred"]
        else:
            relation = need(row, "predicate_id")
            template = (as_text(row["template"], "template") if row.get("template")
                        else templates.get(relation))
        if template is None:
            raise RowError(f"no template for relation {relation!r} (not one of LAMA's "
                           f"{len(TREX_TEMPLATES)} T-REx relations; give `relations_path`, a "
                           "file of {relation, template} rows)")
        aliases = text_items(row.get("obj_aliases") or [], "obj_aliases")
        return qa_item(lama_question(template, subject), text_list([obj, *aliases], "obj_label"),
                       p.prompt_template, relation=relation, subject=subject)

    return build_examples("lama", "factoid", params, load_rows(params), row_fn, n, offset, seed)


@dataclass
class WebQuestionsParams(HubParams):
    hub: str | None = "stanfordnlp/web_questions"
    """hub dataset name (fields question, answers); local files may be SEMPRE's format"""
    prompt_template: str = "{question}"
    """user turn; the bare question (a factoid D_B set)"""


def sempre_answers(target: str) -> list[str]:
    """`(list (description "Jamaican English") (description Lawyer))` -> the descriptions.

    Split on the `) (description ` boundaries rather than parsed as s-expressions: some
    released descriptions hold unescaped quotes (`"... named "Reich Minister ..." ..."`)."""
    body = target.strip()
    if not (body.startswith("(list") and body.endswith(")")) or "(description" not in body:
        raise RowError(f"field 'targetValue': not a SEMPRE answer list: {target[:60]!r}")
    parts = re.split(r"\)\s*(?=\(description\s)", body[len("(list"):-1].strip())
    out = []
    for k, part in enumerate(parts):
        part = part.strip()
        if not part.startswith("(description"):
            raise RowError(f"field 'targetValue': not a SEMPRE answer list: {target[:60]!r}")
        text = part[len("(description"):].strip()
        if k == len(parts) - 1:
            text = text[:-1].rstrip() if text.endswith(")") else text
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1]
        out.append(text.replace('\\"', '"'))
    return out


def webquestions_row(row: dict[str, Any], p: WebQuestionsParams) -> Item:
    if "utterance" in row:  # SEMPRE's original release
        question, answers = need_text(row, "utterance"), sempre_answers(
            need_text(row, "targetValue"))
    else:
        question, answers = need_text(row, "question"), need(row, "answers")
    item = qa_item(question, text_list(answers, "answers"), p.prompt_template,
                   match=MatchKind.CONTAINS)
    return item


webquestions = _simple("webquestions", WebQuestionsParams, "factoid", webquestions_row,
                       doc="WebQuestions: the bare question -> answers (containment match)")


# --------------------------------------------------------------------------------------------
# D_B non-factoid: GSM8K, MATH, APPS, EvolCode, UltraChat


@dataclass
class GSM8KParams(HubParams):
    hub: str | None = "openai/gsm8k"
    """hub dataset name"""
    config: str | None = "main"
    """hub configuration"""


def gsm8k_row(row: dict[str, Any], p: GSM8KParams) -> Item:
    answer = need_text(row, "answer")
    if "####" not in answer:
        raise RowError("field 'answer' has no final '#### n' line")
    return Item((("user", need_text(row, "question")), ("assistant", answer)), (answer,),
                {"match": MatchKind.NUMBER})


gsm8k = _simple("gsm8k", GSM8KParams, "task", gsm8k_row,
                doc="GSM8K: question -> worked answer; scored on the final number after ####")


@dataclass
class MATHParams(HubParams):
    hub: str | None = "lighteval/MATH"
    """hub dataset name"""
    config: str | None = "all"
    """hub configuration (all subjects)"""


def math_row(row: dict[str, Any], p: MATHParams) -> Item:
    solution = need_text(row, "solution")
    return Item((("user", need_text(row, "problem")), ("assistant", solution)), (solution,),
                {"match": MatchKind.BOXED, "level": row.get("level"), "type": row.get("type")})


math = _simple("math", MATHParams, "task", math_row,
               doc="MATH: problem -> solution; scored on the last \\boxed{} answer")


@dataclass
class APPSParams(HubParams):
    hub: str | None = "codeparrot/apps"
    """hub dataset name"""
    config: str | None = "all"
    """hub configuration"""
    difficulties: list[str] = field(default_factory=lambda: ["introductory", "interview"])
    """problems kept (the paper: introductory and interview)"""


def apps_prompt(question: str, starter_code: str, call_based: bool) -> str:
    """The APPS prompt format (Hendrycks et al. 2021, `generate_prompt` in their eval code)."""
    fmt = "Use Call-Based format" if call_based else "Use Standard Input format"
    return f"\nQUESTION:\n{question}\n{starter_code}\n\n{fmt}\nANSWER:\n"


def apps_row(row: dict[str, Any], p: APPSParams) -> Item | None:
    if need(row, "difficulty") not in p.difficulties:
        return None
    raw = row.get("solutions") or "[]"
    solutions = json.loads(raw) if isinstance(raw, str) and raw.strip() else raw
    if not solutions:  # ~1% of APPS problems ship no solution: nothing to train on
        return None
    io_raw = row.get("input_output") or "{}"
    try:
        io_spec = json.loads(io_raw) if isinstance(io_raw, str) and io_raw.strip() else {}
    except json.JSONDecodeError:
        raise RowError("field 'input_output': malformed JSON") from None
    prompt = apps_prompt(need_text(row, "question"), as_text(row.get("starter_code") or "",
                                                          "starter_code"),
                         bool(io_spec.get("fn_name")))
    solution = as_text(solutions[0], "solutions[0]")
    return Item((("user", prompt), ("assistant", solution)), (solution,),
                {"difficulty": row["difficulty"], "problem_id": row.get("problem_id")})


apps = _simple("apps", APPSParams, "task", apps_row,
               doc="APPS (introductory+interview): APPS prompt -> first solution")


@dataclass
class EvolCodeParams(HubParams):
    hub: str | None = "nickrosh/Evol-Instruct-Code-80k-v1"
    """hub dataset name"""


def evolcode_row(row: dict[str, Any], p: EvolCodeParams) -> Item:
    output = need_text(row, "output")
    return Item((("user", need_text(row, "instruction")), ("assistant", output)), (output,))


evolcode = _simple("evolcode", EvolCodeParams, "task", evolcode_row,
                   doc="Evol-Instruct-Code-80k: instruction -> output")


@dataclass
class UltraChatParams(HubParams):
    hub: str | None = "stingning/ultrachat"
    """hub dataset name"""
    max_turns: int | None = None
    """keep at most this many user/assistant exchanges of each dialogue (default: all)"""

    def __post_init__(self) -> None:
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError("max_turns: must be >= 1")


def ultrachat_row(row: dict[str, Any], p: UltraChatParams) -> Item:
    turns = need(row, "data")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise RowError("field 'data': expected a list of strings (alternating user, assistant)")
    pairs = len(turns) // 2  # a trailing user turn has no answer to learn: dropped
    if p.max_turns:
        pairs = min(pairs, p.max_turns)
    if pairs == 0:
        raise RowError("field 'data': no user/assistant exchange")
    msgs = tuple(("user" if i % 2 == 0 else "assistant", t)
                 for i, t in enumerate(turns[: 2 * pairs]))
    return Item(msgs, (msgs[-1][1],), {"turns": pairs, "dialogue_id": row.get("id")})


ultrachat = _simple("ultrachat", UltraChatParams, "task", ultrachat_row,
                    doc="UltraChat: multi-turn dialogue, loss on every assistant turn")


# --------------------------------------------------------------------------------------------
# REMIX generic corpora: FineWeb, Knowledge Pile, arXiv


@dataclass
class CorpusParams(HubParams):
    text_field: str = "text"
    """field holding a document's text"""
    prompt_words: int = 50
    """words shown in the user turn"""
    target_words: int = 50
    """words the model must complete (documents shorter than both together are skipped)"""
    hub_rows: int = 20000
    """hub only: documents streamed from the start of the split (corpora are web-scale)"""

    def __post_init__(self) -> None:
        if self.prompt_words < 1 or self.target_words < 1 or self.hub_rows < 1:
            raise ValueError("prompt_words, target_words and hub_rows must be >= 1")


def passage_row(row: dict[str, Any], p: CorpusParams) -> Item | None:
    words = need_text(row, p.text_field).split()
    if len(words) < p.prompt_words + p.target_words:  # the paper skips docs under 100 words
        return None
    target = " ".join(words[p.prompt_words : p.prompt_words + p.target_words])
    prompt = GENERIC_PROMPT.format(text=" ".join(words[: p.prompt_words]))
    return Item((("user", prompt), ("assistant", target)), (target,))


def _corpus(name: str, params_cls: type) -> None:
    def build(params: CorpusParams, n: int | None, offset: int, seed: int) -> list[Example]:
        files = load_rows(params, streaming_limit=params.hub_rows)
        return build_examples(name, "mix", params, files, passage_row, n, offset, seed)

    build.__doc__ = f"{name}: 50+50-word passage completion (REMIX generic data)"
    register_source(name, params_cls, kind="mix")(build)


@dataclass
class FineWebParams(CorpusParams):
    hub: str | None = "HuggingFaceFW/fineweb"
    """hub dataset name"""
    config: str | None = "sample-10BT"
    """hub configuration (the 10B-token sample)"""


@dataclass
class KnowledgePileParams(CorpusParams):
    hub: str | None = "Query-of-CC/Knowledge_Pile"
    """hub dataset name"""


@dataclass
class ArxivParams(CorpusParams):
    hub: str | None = "ArmelR/the-pile-splitted"
    """hub dataset name (the Pile, split by subset)"""
    config: str | None = "ArXiv"
    """hub configuration: the Pile's arXiv subset"""


_corpus("fineweb", FineWebParams)
_corpus("knowledge-pile", KnowledgePileParams)
_corpus("arxiv", ArxivParams)
