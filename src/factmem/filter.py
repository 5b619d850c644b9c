"""Set refinement that needs the model: `max_tokens` (drop long items) and yet-to-learn filtering.
It lives outside `factmem.data` because it tokenises, loads a model and generates.

Yet-to-learn (the paper): prompt the base model few-shot, greedy, and keep only the facts it
gets wrong. The shots are items of the same source just after the selection (or just before it
when the source ends there), so no fact is its own example. The chat is multi-turn: each shot is
a user turn and its assistant answer, then the fact's question. A fact counts as known when the
generated answer matches (default `contains`: a model that says "Paris, of course" knows it).

Verdicts are cached in $FACTMEM_CACHE/filter/KEY.json ($FACTMEM_CACHE defaults to
~/.cache/factmem, as for the converted model), KEY a hash of the model settings, the set's full
config (source, parameters, selection) and the filter settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factmem import files
from factmem.config import to_dict
from factmem.data.examples import Example
from factmem.data.registry import build_source
from factmem.errors import DataError
from factmem.evaluate import generate_answers
from factmem.models import Formatter, cache_dir, load_model, load_tokenizer
from factmem.scoring import is_match

log = logging.getLogger(__name__)

def default_verdicts_dir() -> Path:
    """Read when a filter runs, so that FACTMEM_CACHE set after import counts."""
    return cache_dir() / "filter"


VERSION = 1  # bump when the verdict logic changes: old cache entries then stop matching


def drop_long(examples: list[Example], fmt, max_tokens: int) -> tuple[list[Example], list[str]]:
    """(items of at most `max_tokens` tokens as the model sees them, ids of the dropped)."""
    kept, dropped = [], []
    for ex in examples:
        (kept if len(fmt.encode(ex)) <= max_tokens else dropped).append(ex)
    dropped_ids = [e.id for e in dropped]
    return kept, dropped_ids


def shot_examples(source: str, params: Any, n: int | None, offset: int, seed: int,
                  shots: int) -> list[Example]:
    """`shots` items outside the selection [offset, offset+n): just after it, else just before."""
    if shots == 0:
        return []
    if n is not None:
        try:
            return build_source(source, params, shots, offset + n, seed)
        except DataError:
            pass  # the source ends at the selection: look before it
    if offset >= shots:
        return build_source(source, params, shots, offset - shots, seed)
    raise DataError(f"source {source!r}: no {shots} items outside the selection (n={n}, "
                    f"offset={offset}) to use as few-shot examples; select fewer or pass "
                    "--shots 0")


def few_shot(ex: Example, shots: list[Example]) -> Example:
    turns = tuple(t for s in shots for t in (("user", s.prompt), ("assistant", s.target)))
    return Example(ex.id, turns + ex.messages[-2:], ex.answers, ex.kind, ex.meta)


@dataclass
class FilterResult:
    known: list[str]
    unknown: list[str]
    seconds: float
    cache_path: str
    cached: bool
    predictions: list[dict[str, Any]]

    def counts(self) -> dict[str, int]:
        return {"known": len(self.known), "unknown": len(self.unknown),
                "total": len(self.known) + len(self.unknown)}


def cache_key(model: dict[str, Any], data: dict[str, Any], settings: dict[str, Any]) -> str:
    blob = json.dumps({"model": model, "data": data, "settings": settings, "v": VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def judge(model, fmt, examples: list[Example], shots: list[Example], match: str,
          batch_size: int, max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy few-shot answers and verdicts, one dict per example."""
    was_training = model.training
    model.eval()
    try:
        items = [fmt.encode(few_shot(ex, shots)) for ex in examples]
        texts = generate_answers(model, fmt, items, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    return [{"id": ex.id, "prompt": ex.prompt, "answers": list(ex.answers), "prediction": t,
             "known": is_match(t, ex.answers, match)} for ex, t in zip(examples, texts)]


def filter_unknown(
    examples: list[Example], shots: list[Example], model_cfg, data_desc: dict[str, Any],
    match: str = "contains", batch_size: int = 16, max_new_tokens: int = 32,
    verdicts_dir: str | Path | None = None, model=None, tokenizer=None,
) -> FilterResult:
    """Verdicts for `examples` (cached in `verdicts_dir`, default $FACTMEM_CACHE/filter); load the
    model only on a cache miss."""
    settings = {"shots": [e.id for e in shots], "match": match, "max_new_tokens": max_new_tokens,
                "ids": [e.id for e in examples]}
    key = cache_key(to_dict(model_cfg), data_desc, settings)
    path = Path(verdicts_dir or default_verdicts_dir()) / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        log.info("filter: cached verdicts %s (known %d, unknown %d)", path,
                 len(saved["known"]), len(saved["unknown"]))
        return FilterResult(saved["known"], saved["unknown"], saved["seconds"], str(path), True,
                            saved["predictions"])
    t0 = time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(model_cfg)
    model = model or load_model(model_cfg)
    fmt = Formatter.for_model(tokenizer, model_cfg)
    preds = judge(model, fmt, examples, shots, match, batch_size, max_new_tokens)
    seconds = round(time.perf_counter() - t0, 2)
    known = [p["id"] for p in preds if p["known"]]
    unknown = [p["id"] for p in preds if not p["known"]]
    files.write_json(path, {"model": to_dict(model_cfg), "data": data_desc, "settings": settings,
                         "known": known, "unknown": unknown, "seconds": seconds,
                         "counts": {"known": len(known), "unknown": len(unknown)},
                         "predictions": preds})
    log.info("filter: %d known, %d unknown of %d (%.1fs) -> %s", len(known), len(unknown),
             len(preds), seconds, path)
    return FilterResult(known, unknown, seconds, str(path), False, preds)


def refine_set(name: str, cfg, examples: list[Example], model_cfg, tokenizer_fn,
               reports: dict[str, Any]) -> list[Example]:
    """Apply a set config's `max_tokens`, `filter` and `keep` (sets.SetCache calls this)."""
    report: dict[str, Any] = {"built": len(examples)}
    if cfg.max_tokens is not None:
        fmt = Formatter.for_model(tokenizer_fn(), model_cfg, max_length=10**9)
        examples, dropped = drop_long(examples, fmt, cfg.max_tokens)
        report["max_tokens"] = {"limit": cfg.max_tokens, "dropped": len(dropped),
                                "dropped_ids": dropped}
        log.info("sets.%s: max_tokens %d dropped %d of %d items", name, cfg.max_tokens,
                 len(dropped), report["built"])
        if not examples:
            raise DataError(f"every item is longer than max_tokens={cfg.max_tokens}")
    if cfg.filter == "unknown_to_model":
        shots = shot_examples(cfg.source, cfg.params, cfg.n, cfg.offset, cfg.seed, cfg.filter_shots)
        res = filter_unknown(examples, shots, model_cfg, to_dict(cfg), tokenizer=tokenizer_fn())
        keep = set(res.unknown)
        examples = [e for e in examples if e.id in keep]
        report["filter"] = {**res.counts(), "cache": res.cache_path, "seconds": res.seconds,
                            "cached": res.cached}
        log.info("sets.%s: unknown_to_model kept %d of %d (%d known)", name, len(keep),
                 len(res.known) + len(keep), len(res.known))
        if not examples:
            raise DataError("the model already knows every item: nothing is left to learn")
    if cfg.keep is not None:
        if len(examples) < cfg.keep:
            step = ("filtering" if cfg.filter != "none" else
                    "max_tokens" if cfg.max_tokens is not None else "building")
            raise DataError(f"keep: {cfg.keep} items asked for, {len(examples)} left after "
                            f"{step} (of {report['built']} built); select more with `n`")
        examples = examples[: cfg.keep]
    report["kept"] = len(examples)
    reports[name] = report
    return examples
