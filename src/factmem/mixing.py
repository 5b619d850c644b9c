"""Stage mixtures: a stage's training set = its main set + REMIX components + replay.

Amounts are `ratio x |main set|` (rounded) or an explicit `count`. Everything is seeded by the
run seed and the stage index; the realised mixture (ids per component) goes to the run directory
as a manifest so a run can be inspected and reproduced.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from factmem.config import ExperimentConfig, StageConfig
from factmem.data import Example, build_source


@dataclass
class Component:
    role: str  # main | mix | replay
    name: str  # set name (main, replay) or source name (mix)
    examples: list[Example]
    detail: dict[str, Any]


@dataclass
class Mixture:
    stage: str
    components: list[Component]

    @property
    def main(self) -> list[Example]:
        return self.components[0].examples

    def examples(self) -> list[Example]:
        return [e for c in self.components for e in c.examples]

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
    return count if count is not None else round(ratio * main_size)  # type: ignore[operator]


def mix_seed(run_seed: int, stage_index: int) -> int:
    """Data seed of a stage's mixing items: distinct per training seed and per stage, so stage 1
    and stage 2 never draw the same random words."""
    return 1000 * run_seed + stage_index


def sample_with_cycling(items: list[Example], k: int, rng: random.Random) -> list[Example]:
    """k items without replacement; past the set's size, another shuffled pass (repeats)."""
    out: list[Example] = []
    while len(out) < k:
        order = items[:]
        rng.shuffle(order)
        out += order[: k - len(out)]
    return out


def build_mixture(
    cfg: ExperimentConfig,
    stage_index: int,
    sets: dict[str, list[Example]],
    run_seed: int,
) -> Mixture:
    stage: StageConfig = cfg.stages[stage_index]
    main = sets[stage.set]
    components = [Component("main", stage.set, main, {"source": cfg.sets[stage.set].source})]
    for name in stage.joint:  # joint training: other sets in full, beside the main set
        components.append(Component("joint", name, sets[name], {"source": cfg.sets[name].source}))
    seed = mix_seed(run_seed, stage_index)
    for m in stage.mix:
        k = amount(m.ratio, m.count, len(main))
        if k == 0:
            continue
        items = build_source(m.source, m.params, k, m.offset, seed)
        components.append(Component("mix", m.source, items, {
            "ratio": m.ratio, "data_seed": seed, "offset": m.offset}))
    stage_sets = {s.name: s.set for s in cfg.stages}
    for j, r in enumerate(stage.replay):
        set_name = stage_sets[r.stage] if r.stage is not None else r.set
        k = amount(r.ratio, r.count, len(main))
        if k == 0:
            continue
        rng = random.Random(f"replay:{run_seed}:{stage_index}:{j}")
        items = sample_with_cycling(sets[set_name], k, rng)  # type: ignore[index]
        components.append(Component("replay", set_name, items, {  # type: ignore[arg-type]
            "ratio": r.ratio, "from_stage": r.stage}))
    return Mixture(stage.name, components)
