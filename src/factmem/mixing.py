"""Stage mixtures: a stage's training set = its main set + joint sets + REMIX components + replay.

Amounts are `ratio x |main set|`, rounded half up, or an explicit `count` (the reference code
truncates, `int(ratio * n)`; the two agree whenever ratio x n is whole, as in every shipped
config). The realised mixture (ids per component) goes to the run directory as a manifest.

Mixing items are drawn per training seed and never repeat within a run: the stages of one run
that mix the same source (same parameters) take consecutive, disjoint draws from it.
- A source without an end (random-words) gives item indices offset, offset+1, ... generated
  with the training seed as data seed, so each stage takes the next indices, whatever its
  parameters: random-words passage i is one random stream cut at `length` words, so stages
  mixing passages of length 8 and 16 must not both take index i (one would be the other's
  prefix).
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


def _draw_key(m: MixConfig) -> str:
    """Components with the same key draw from one sequence of items. An unbounded source's item
    i comes from the same random stream whatever its parameters (random-words passage i at
    length 8 is the prefix of passage i at length 16), so all its components share one index
    sequence; a pool is its own (source, parameters, offset)."""
    return m.source if get_source(m.source).unbounded else _pool_key(m)


def _earlier_draws(cfg: ExperimentConfig, stage_index: int, mix_index: int,
                   set_sizes: dict[str, int]):
    """(path, component, amount) of the run's components before stages[stage_index].mix[
    mix_index] (earlier stages, then earlier components of this stage) with its draw key."""
    key = _draw_key(cfg.stages[stage_index].mix[mix_index])
    for k in range(stage_index + 1):
        st = cfg.stages[k]
        for j, m in enumerate(st.mix):
            if k == stage_index and j >= mix_index:
                return
            if _draw_key(m) == key:
                yield f"stages.{k}.mix.{j}", m, amount(m.ratio, m.count, set_sizes[st.set])


def already_drawn(cfg: ExperimentConfig, stage_index: int, mix_index: int,
                  set_sizes: dict[str, int]) -> int:
    """Items the earlier stages (and earlier components of this stage) of the run drew from the
    same sequence as stages[stage_index].mix[mix_index]: this draw starts after them."""
    return sum(k for _, _, k in _earlier_draws(cfg, stage_index, mix_index, set_sizes))


def _check_unbounded_disjoint(cfg: ExperimentConfig, stage_index: int, mix_index: int, k: int,
                              set_sizes: dict[str, int], path: str) -> int:
    """The first index of this draw of an unbounded source, refusing one that overlaps an
    earlier draw of the run (possible only when components give different `offset`s)."""
    m = cfg.stages[stage_index].mix[mix_index]
    first, start = m.offset + already_drawn(cfg, stage_index, mix_index, set_sizes), 0
    for other, om, ok in _earlier_draws(cfg, stage_index, mix_index, set_sizes):
        lo = om.offset + start
        if ok and k and lo < first + k and first < lo + ok:
            raise ConfigError(f"{path}: items {first}-{first + k - 1} of {m.source} overlap "
                              f"items {lo}-{lo + ok - 1} drawn by {other}; give offsets that "
                              "keep the stages' draws apart (items are never repeated in a run)")
        start += ok
    return first


def draw_mix(cfg: ExperimentConfig, stage_index: int, mix_index: int, k: int, run_seed: int,
             set_sizes: dict[str, int], path: str) -> tuple[list[Example], dict[str, Any]]:
    """The k items of stages[stage_index].mix[mix_index] for training seed `run_seed`."""
    m = cfg.stages[stage_index].mix[mix_index]
    if get_source(m.source).unbounded:
        first = _check_unbounded_disjoint(cfg, stage_index, mix_index, k, set_sizes, path)
        items = build_source(m.source, m.params, k, first, run_seed)
        return items, {"data_seed": run_seed, "first_index": first}
    start = already_drawn(cfg, stage_index, mix_index, set_sizes)
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
