"""Checks on built data that the config alone cannot make: run before anything is written."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from factmem.config import ModelConfig, SetConfig
from factmem.data import Example
from factmem.errors import DataError, ModelError
from factmem.models import Encoded, model_files, special_token_problem

log = logging.getLogger(__name__)


def check_set(name: str, examples: list[Example]) -> None:
    """A set must hold items, each with its own id (ids name predictions and manifests)."""
    if not examples:
        raise DataError(f"sets.{name}: the set is empty (nothing to train or evaluate)")
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.id in seen:
            first = examples[seen[ex.id]]
            lines = "line" in first.meta and "line" in ex.meta
            where = (f"lines {first.meta['line']} and {ex.meta['line']}" if lines
                     else f"items {seen[ex.id]} and {i}")
            raise DataError(f"sets.{name}: duplicate id {ex.id!r} ({where}); ids must be unique "
                            "within a set")
        seen[ex.id] = i


def check_special_tokens(name: str, cfg: SetConfig, examples: list[Example],
                         specials: re.Pattern[str] | None) -> None:
    """No question or answer of set `name` holds a special token of the model's tokenizer,
    named by file and line where the set comes from a file (Formatter.encode refuses the same
    for every item it tokenises, naming the item's id)."""
    path = getattr(cfg.params, "path", None)
    for ex in examples:
        problem = special_token_problem(ex, specials)
        if problem is None:
            continue
        where = f"example {ex.id}"
        if path is not None and "line" in ex.meta:
            file = Path(path) / ex.meta["file"] if "file" in ex.meta else path
            where = f"{file}:{ex.meta['line']}"
        raise DataError(f"sets.{name}: {where}: {problem}")


def model_context(cfg: ModelConfig) -> int | None:
    """The model's own context length (max_position_embeddings in its config), if it has one."""
    from transformers import AutoConfig

    path, extra = model_files(cfg.name)
    try:
        mc = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **extra)
    except (OSError, ValueError) as e:  # e.g. custom code without trust_remote_code: true
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if "trust_remote_code" in str(e) and not cfg.trust_remote_code:
            msg = ("it ships its own code, which factmem runs only with "
                   "model.trust_remote_code: true (set it only if you trust that code)")
        raise ModelError(f"model {cfg.name!r}: cannot read its config ({msg})") from None
    n = getattr(mc, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(enc: Encoded, context: int | None) -> None:
    if context is not None and len(enc) > context:
        raise DataError(f"example {enc.id} is {len(enc)} tokens, longer than the model's context "
                        f"({context} positions, max_position_embeddings); drop or shorten the item")
