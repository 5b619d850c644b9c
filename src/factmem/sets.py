"""The sets of an experiment: built from their source, refined for the model where the config
asks (max_tokens, filter, keep), and cached so that a set shared by variants is built once."""

from __future__ import annotations

import json
from typing import Any

from factmem.config import ExperimentConfig, ModelConfig, SetConfig, to_dict
from factmem.data import Example, build_source
from factmem.errors import FactmemError
from factmem.models import load_tokenizer


def build_set(cfg: SetConfig) -> list[Example]:
    return build_source(cfg.source, cfg.params, cfg.n, cfg.offset, cfg.seed)


def needs_model(cfg: SetConfig) -> bool:
    """Whether the set's items depend on the model (token limit, yet-to-learn filter)."""
    return cfg.max_tokens is not None or cfg.filter != "none" or cfg.keep is not None


class SetCache:
    """Builds each distinct set once across variants (sets are pure functions of their config,
    and of the model where `needs_model`)."""

    def __init__(self) -> None:
        self._cache: dict[str, list[Example]] = {}
        self.reports: dict[str, Any] = {}  # per set: items dropped by max_tokens / filter
        self._tokenizers: dict[str, Any] = {}

    def sets(self, cfg: ExperimentConfig) -> dict[str, list[Example]]:
        """Every set of a variant, by name."""
        return {name: self.get(name, s, cfg.model) for name, s in cfg.sets.items()}

    def get(self, name: str, cfg: SetConfig, model: ModelConfig) -> list[Example]:
        """The set `name` of config `cfg`, for the variant's `model`."""
        from factmem.filter import refine_set

        key = json.dumps(to_dict(cfg), sort_keys=True)
        refine = needs_model(cfg)
        if refine:  # the outcome depends on the model
            key += _model_key(model)
        if key not in self._cache:
            try:
                examples = build_set(cfg)
                if refine:
                    examples = refine_set(name, cfg, examples, model,
                                          lambda: self._tokenizer(model), self.reports)
                self._cache[key] = examples
            except FactmemError as e:
                raise type(e)(f"sets.{name}: {e}") from None
        return self._cache[key]

    def _tokenizer(self, model: ModelConfig):
        key = _model_key(model)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(model)
        return self._tokenizers[key]


def _model_key(model: ModelConfig) -> str:
    return json.dumps(to_dict(model), sort_keys=True)
