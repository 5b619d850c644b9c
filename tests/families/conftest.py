"""Fixtures of the family matrix: each family's tiny model directory, built once per session
(tests/families/zoo.py says what each family is)."""

from __future__ import annotations

from pathlib import Path

import pytest

from families.zoo import BY_NAME, build_family_dir

FAMILY_NAMES = list(BY_NAME)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family name -> its model directory, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_dir(BY_NAME[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture
def family_model(family_dirs, request):
    """(model, formatter, family) for the test's `family` parameter, loaded through factmem
    as a run loads it (its load-time checks included), torch's RNG seeded."""
    import torch

    from factmem.config import ModelConfig
    from factmem.models import Formatter, load_model, load_tokenizer

    name = request.getfixturevalue("family")
    cfg = ModelConfig(name=str(family_dirs(name)))
    torch.manual_seed(0)
    return load_model(cfg), Formatter(load_tokenizer(cfg)), BY_NAME[name]
