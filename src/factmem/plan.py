"""The plan of a run: what `factmem run` will train, counted before anything trains.

Per variant, seed, stage and mixture component: items and tokens per epoch; per stage: steps
per epoch (ceil(items / train.batch_size)), the epochs the stop rule allows and so the most
steps and training tokens; per run: the total. `factmem run --dry-run` prints it; the real run
builds the same plan in `experiment.prepare` (the same sets, mixtures and tokenisation), so the
counts are those its manifests and metrics then record.

Example (a stage of 16 facts + 16 random-word passages, batch 8): 32 items -> 4 steps/epoch;
at most 20 epochs -> at most 80 steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from factmem.config import StageConfig, TrainConfig
from factmem.data import Example
from factmem.mixing import Mixture
from factmem.models import Formatter
from factmem.validate import check_context


def epoch_tokens(lengths: Sequence[Sequence[int]], cfg: TrainConfig) -> list[int]:
    """Tokens per epoch of each component of a stage, from its items' tokenised lengths (chat
    template, prompt, answer, end-of-turn), as the stage loop counts `tokens` in its metrics:
    padding between items is not counted, but `label_padding: reference` pads every item to the
    stage's longest with labelled tokens that are trained on, so each item counts at that width.
    The one place that defines the count: change it here and every figure of the plan follows."""
    if cfg.label_padding == "reference":
        width = max((n for component in lengths for n in component), default=0)
        return [width * len(component) for component in lengths]
    return [sum(component) for component in lengths]


class TokenCounter:
    """Tokenises each distinct example once (items recur across variants, seeds and stages),
    checking it on the way: model.max_length (Formatter.encode) and the model's context."""

    def __init__(self, fmt: Formatter, context: int | None):
        self.fmt, self.context = fmt, context
        self._lengths: dict[Example, int] = {}
        self._targets: dict[Example, int] = {}

    def __call__(self, ex: Example) -> int:
        """The example's tokenised length."""
        n = self._lengths.get(ex)
        if n is None:
            enc = self.fmt.encode(ex)  # raises on items longer than model.max_length
            check_context(enc, self.context)
            n = self._lengths[ex] = len(enc)
            self._targets[ex] = enc.n_targets
        return n

    def targets(self, ex: Example) -> int:
        """The example's answer tokens (the positions with a loss)."""
        self(ex)
        return self._targets[ex]

    def lengths(self, examples: Iterable[Example]) -> list[int]:
        return [self(ex) for ex in examples]


@dataclass
class ComponentPlan:
    role: str  # main | joint | mix | replay (as in the stage's manifest)
    name: str  # set name, or source name for mix components
    items: int
    tokens: int  # per epoch


@dataclass
class StagePlan:
    variant: str
    seed: int
    stage: str
    components: list[ComponentPlan]
    batch_size: int
    rule: str  # the stop rule: epochs | loss_below | until_memorized
    epochs: int  # exact for rule `epochs`, the most for the other rules
    reused_from: str | None = None  # "variant/seedS" whose identical stage is copied, not trained
    longest: int = 0  # tokens of the stage's longest item
    most_targets: int = 0  # answer tokens of the item with the most
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    extra_copies: float = 0.0  # whole-model copies its regularizers keep (ewc 2, l2 1, kl 1)

    @property
    def items(self) -> int:
        return sum(c.items for c in self.components)

    @property
    def tokens_per_epoch(self) -> int:
        return sum(c.tokens for c in self.components)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.items / self.batch_size)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def tokens(self) -> int:
        return self.tokens_per_epoch * self.epochs

    @property
    def exact(self) -> bool:
        """Whether `steps` and `tokens` are what will run (rule epochs) or an upper bound."""
        return self.rule == "epochs"

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "seed": self.seed, "stage": self.stage,
                "components": [c.__dict__.copy() for c in self.components],
                "items": self.items, "tokens_per_epoch": self.tokens_per_epoch,
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "rule": self.rule, "epochs": self.epochs, "steps": self.steps,
                "tokens": self.tokens, "exact": self.exact, "reused_from": self.reused_from}


@dataclass
class RunPlan:
    name: str
    model: str
    stages: list[StagePlan] = field(default_factory=list)
    tracked: dict[str, int] = field(default_factory=dict)  # set -> items, evaluated every stage

    @property
    def trained(self) -> list[StagePlan]:
        return [s for s in self.stages if s.reused_from is None]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.trained)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.trained)

    @property
    def exact(self) -> bool:
        return all(s.exact for s in self.trained)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "tracked": self.tracked,
                "stages": [s.to_json() for s in self.stages], "total_steps": self.total_steps,
                "total_tokens": self.total_tokens, "exact": self.exact}


def plan_stage(variant: str, seed: int, stage: StageConfig, mixture: Mixture,
               count: TokenCounter, reused_from: str | None = None) -> StagePlan:
    """One stage of one variant and seed, from its realised mixture."""
    lengths = [count.lengths(c.examples) for c in mixture.components]
    tokens = epoch_tokens(lengths, stage.train)
    examples = [e for c in mixture.components for e in c.examples]
    longest = max((n for ls in lengths for n in ls), default=0)
    # label_padding reference pads every item to the longest with labelled tokens
    most_targets = (longest if stage.train.label_padding == "reference"
                    else max((count.targets(e) for e in examples), default=0))
    return StagePlan(variant, seed, stage.name,
                     [ComponentPlan(c.role, c.name, len(c.examples), t)
                      for c, t in zip(mixture.components, tokens)],
                     stage.train.batch_size, stage.train.stop.rule, stage.train.stop.epochs,
                     reused_from, longest=longest, most_targets=most_targets,
                     grad_accum=stage.train.grad_accum,
                     extra_copies=sum(REGULARIZER_COPIES.get(r.kind, 0.0)
                                      for r in stage.regularizers))


# Whole-model copies a regularizer keeps beside the model (factmem.train.regularizers): EWC its
# anchor and Fisher, L2 its anchor, KL a frozen teacher.
REGULARIZER_COPIES = {"ewc": 2.0, "l2": 1.0, "kl": 1.0}


def format_plan(plan: RunPlan) -> str:
    """The plan as printed by `factmem run --dry-run`: one block per variant, seed and stage."""
    lines = []
    width = max((len(c.name) for s in plan.stages for c in s.components), default=4)
    for s in plan.stages:
        head = f"{s.variant} seed{s.seed} {s.stage}"
        if s.reused_from is not None:
            lines.append(f"{head}: same as {s.reused_from} (copied, not trained again)")
            continue
        bound = "" if s.exact else "at most "
        stop = (f"{s.epochs} epochs" if s.exact
                else f"{s.rule}, at most {s.epochs} epochs")
        lines.append(f"{head}: {s.items:,} items, {s.tokens_per_epoch:,} tokens/epoch, "
                     f"{s.steps_per_epoch:,} steps/epoch (batch {s.batch_size}); {stop} -> "
                     f"{bound}{s.steps:,} steps, {bound}{s.tokens:,} tokens")
        for c in s.components:
            lines.append(f"  {c.role:<7} {c.name:<{width}} {c.items:>8,} items "
                         f"{c.tokens:>11,} tokens/epoch")
    tracked = ", ".join(f"{name} ({n:,} items)" for name, n in plan.tracked.items())
    lines.append(f"evaluated before training and after every stage: {tracked or 'nothing'}")
    reused = len(plan.stages) - len(plan.trained)
    bound = "" if plan.exact else "at most "
    lines.append(f"total: {len(plan.trained)} stage(s) to train"
                 + (f" ({reused} copied from an identical earlier one)" if reused else "")
                 + f", {bound}{plan.total_steps:,} optimizer steps, {bound}"
                 f"{plan.total_tokens:,} training tokens")
    return "\n".join(lines)
