"""Stage mixtures: a stage's training set = its main set + joint sets + REMIX components + replay.

Amounts are `ratio x |main set|`, rounded half up, or an explicit `count` (the reference code
truncates, `int(ratio * n)`; the two agree whenever ratio x n is whole, as in every shipped
config). The realised mixture (ids per component) goes to the run directory as a manifest.

Mixing items are drawn per training seed and never repeat within a run: the stages of one run
that mix the same source (same parameters) take consecutive, disjoint draws from it.
- A source without an end (random-words, kvr) gives item indices offset, offset+1, ... generated
  with the training seed as data seed, so each stage takes the next indices.
- A source with an end (the built-in `generic` corpus, a JSONL file, a hub corpus's streamed
  rows) is a pool: shuffled once per training seed, each stage takes the next slice of that
  order. A stage that asks for more than the pool has left is refused with one line. Sizes:
  built-in `generic` 370 passages of 100 words (`generic_pool_size()`); a file, its rows that
  make a passage; a hub corpus, the passages in its first `hub_rows` documents (default 20,000).
- No component may ask for more than MAX_ITEMS items (a typo such as `ratio: 1.0e9` would build
  billions of items before anything runs).
Replay draws from an earlier set without replacement and, past the set's size, starts another
shuffled pass: it repeats items, by design, and logs that it does.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from factmem.config import ExperimentConfig, MixConfig, StageConfig, to_dict
from factmem.data import Example, build_source, get_source
from factmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_ITEMS = 1_000_000  # per mixing or replay component: far above any real stage (2,000 x 4)


@dataclass
class Component:
    role: str  # main | joint | mix | replay
    name: str  # set name (main, joint, replay) or source name (mix)
    examples: list[Example]
    detail: dict[str, Any]


@dataclass
class Mixture:
    stage: str
    components: list[Component]

    def examples(self) -> list[Example]:
        return [e for c in self.components for e in c.examples]

    def groups(self) -> list[int]:
        """Component index of every example of `examples()` (0 = the stage's own set)."""
        return [k for k, c in enumerate(self.components) for _ in c.examples]

    def ids(self, role: str) -> set[str]:
        return {e.id for c in self.components if c.role == role for e in c.examples}

    def manifest(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "total": sum(len(c.examples) for c in self.components),
            "components": [
                {"role": c.role, "name": c.name, "count": len(c.examples), **c.detail,
                 "ids": [e.id for e in c.examples]}
                for c in self.components
            ],
        }


def amount(ratio: float | None, count: int | None, main_size: int) -> int:
    """Items a component adds: `count`, or ratio x main size rounded half up."""
    return count if count is not None else math.floor(ratio * main_size + 0.5)  # type: ignore[operator]


def _check_amount(k: int, path: str, what: str, ratio: float | None, main_size: int) -> None:
    if k > MAX_ITEMS:
        asked = f"ratio {ratio:g} x {main_size} items = {k}" if ratio is not None else f"{k}"
        raise ConfigError(f"{path}: asks for {asked} {what}; at most {MAX_ITEMS:,} per "
                          "component (a mixing ratio is a multiple of the stage's set, e.g. 1-4)")


def _pool_key(m: MixConfig) -> str:
    return json.dumps([m.source, to_dict(m.params), m.offset], sort_keys=True, default=str)


_POOLS: dict[str, list[Example]] = {}


def mix_pool(m: MixConfig) -> list[Example]:
    """Every item of a bounded source from `offset` on, in the source's own order (cached: a
    hub corpus streams 20,000 documents to make it)."""
    key = _pool_key(m)
    if key not in _POOLS:
        _POOLS[key] = build_source(m.source, m.params, None, m.offset, 0)
    return _POOLS[key]


def generic_pool_size() -> int:
    """Passages the built-in generic corpus holds (100 words each)."""
    from factmem.data.generic import GenericParams

    return len(build_source("generic", GenericParams(), None, 0, 0))


def already_drawn(cfg: ExperimentConfig, stage_index: int, mix_index: int,
                  set_sizes: dict[str, int]) -> int:
    """Items the earlier stages (and earlier components of this stage) of the run drew from the
    same pool as stages[stage_index].mix[mix_index]: this draw starts after them."""
    key = _pool_key(cfg.stages[stage_index].mix[mix_index])
    taken = 0
    for k in range(stage_index + 1):
        st = cfg.stages[k]
        for j, m in enumerate(st.mix):
            if k == stage_index and j >= mix_index:
                break
            if _pool_key(m) == key:
                taken += amount(m.ratio, m.count, set_sizes[st.set])
    return taken


def draw_mix(cfg: ExperimentConfig, stage_index: int, mix_index: int, k: int, run_seed: int,
             set_sizes: dict[str, int], path: str) -> tuple[list[Example], dict[str, Any]]:
    """The k items of stages[stage_index].mix[mix_index] for training seed `run_seed`."""
    m = cfg.stages[stage_index].mix[mix_index]
    start = already_drawn(cfg, stage_index, mix_index, set_sizes)
    if get_source(m.source).unbounded:
        items = build_source(m.source, m.params, k, m.offset + start, run_seed)
        return items, {"data_seed": run_seed, "first_index": m.offset + start}
    pool = mix_pool(m)
    if start + k > len(pool):
        earlier = f" (earlier draws of this run took {start})" if start else ""
        raise DataError(f"{path}: asks for {k} items of {m.source}, but its pool holds "
                        f"{len(pool)}{earlier}; lower the ratio or give a larger source "
                        "(items are never repeated within a run)")
    order = list(range(len(pool)))
    random.Random(f"mix:{m.source}:{run_seed}").shuffle(order)
    return [pool[i] for i in order[start : start + k]], {"draw_seed": run_seed,
                                                         "draw_start": start}


def build_mixture(
    cfg: ExperimentConfig,
    stage_index: int,
    sets: dict[str, list[Example]],
    run_seed: int,
) -> Mixture:
    stage: StageConfig = cfg.stages[stage_index]
    set_sizes = {name: len(items) for name, items in sets.items()}
    main = sets[stage.set]
    components = [Component("main", stage.set, main, {"source": cfg.sets[stage.set].source})]
    for name in stage.joint:  # joint training: other sets in full, beside the main set
        components.append(Component("joint", name, sets[name], {"source": cfg.sets[name].source}))
    for j, m in enumerate(stage.mix):
        path = f"stages.{stage_index}.mix.{j}"
        k = amount(m.ratio, m.count, len(main))
        _check_amount(k, path, f"items of {m.source}", m.ratio, len(main))
        if k == 0:
            continue
        items, draw = draw_mix(cfg, stage_index, j, k, run_seed, set_sizes, path)
        components.append(Component("mix", m.source, items, {
            "ratio": m.ratio, "offset": m.offset, **draw}))
    stage_sets = {s.name: s.set for s in cfg.stages}
    for j, r in enumerate(stage.replay):
        set_name = stage_sets[r.stage] if r.stage is not None else r.set
        k = amount(r.ratio, r.count, len(main))
        _check_amount(k, f"stages.{stage_index}.replay.{j}", f"replayed items of {set_name}",
                      r.ratio, len(main))
        if k == 0:
            continue
        pool = sets[set_name]  # type: ignore[index]
        if k > len(pool):
            log.info("stage %s replays %d items of %s, which holds %d: items repeat",
                     stage.name, k, set_name, len(pool))
        rng = random.Random(f"replay:{run_seed}:{stage_index}:{j}")
        items = sample_with_cycling(pool, k, rng)
        components.append(Component("replay", set_name, items, {  # type: ignore[arg-type]
            "ratio": r.ratio, "from_stage": r.stage}))
    return Mixture(stage.name, components)


def sample_with_cycling(items: list[Example], k: int, rng: random.Random) -> list[Example]:
    """k items without replacement; past the set's size, another shuffled pass (repeats)."""
    out: list[Example] = []
    while len(out) < k:
        order = items[:]
        rng.shuffle(order)
        out += order[: k - len(out)]
    return out
