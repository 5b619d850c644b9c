"""Batch order of a stage: which items each optimizer step trains on.

Two orders, both seeded by (training seed, epoch), so an epoch's batches are a pure function of
them (resume relies on it); every item appears exactly once per epoch and none is dropped (the
last batch may be smaller):

- `mixed_batches` (default): every batch carries the stage's mixture. Items of each component
  (main set, each mix source, replay, joint sets) are spread evenly over the epoch, so a batch
  of B items from a stage with component sizes n_c holds B * n_c / N of each, +-1 for the main
  set. This is what the paper's reference code does by shuffling all items of a stage together
  (there the share per batch varies at random around the same mean): facts are trained beside
  r times as many mixed passages, and a fact's few answer tokens are a small share of each
  step's loss. Packing (factmem.batch) removes the padding cost of mixing short and long items.
- `length_grouped_batches`: items of similar length share a batch (little padding without
  packing). It CHANGES WHAT MIXING DOES: 34-token facts and 150-token passages never meet, so a
  REMIX stage alternates fact-only steps with passage-only steps instead of mixing them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from factmem.batch import length_sorted_batches


def mixed_batches(groups: Sequence[int], batch_size: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """Batches of item indices; `groups[i]` is the component of item i (0 = the main set).

    Each component's items are shuffled, then the components are interleaved so that the first
    p positions hold floor(p * n_c_rest + phase) items of component c, out of the positions left
    by the components before it: a low-discrepancy sequence, shifted by a random phase per
    epoch. Any B consecutive positions then hold floor or ceil of B * n_0 / N main items."""
    rng = random.Random(f"batches:{seed}:{epoch}")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g in sorted(members):
        rng.shuffle(members[g])
    order: list[int | None] = [None] * len(groups)
    free = list(range(len(groups)))  # positions not yet given to a component
    for g in sorted(members):
        items, n_free = members[g], len(free)
        phase = rng.random()
        taken, rest = [], []
        for p, pos in enumerate(free):
            # the (p+1)-th free position goes to g iff the cumulative quota steps up there
            if math.floor((p + 1) * len(items) / n_free + phase) > math.floor(
                    p * len(items) / n_free + phase):
                taken.append(pos)
            else:
                rest.append(pos)
        assert len(taken) == len(items), (len(taken), len(items))
        for pos, item in zip(taken, items):
            order[pos] = item
        free = rest
    flat = [i for i in order if i is not None]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_batches: int = 64
) -> list[list[int]]:
    """Shuffle, sort by length within groups of `group_batches` batches, cut into batches and
    shuffle the batch order. Items of similar length share a batch (little padding) while the
    order still changes every epoch."""
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_batches
    batches = []
    for g in range(0, len(order), group):
        batches += length_sorted_batches(lengths, batch_size, order[g : g + group])
    rng.shuffle(batches)
    return batches


def stage_batches(kind: str, lengths: Sequence[int], groups: Sequence[int], batch_size: int,
                  seed: int, epoch: int) -> list[list[int]]:
    if kind == "mixed":
        return mixed_batches(groups, batch_size, seed, epoch)
    if kind == "length_grouped":
        return length_grouped_batches(lengths, batch_size, seed, epoch)
    raise ValueError(f"unknown batching {kind!r}")


def padding_fraction(lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> float:
    """Share of padded positions when each of `rows` is padded to its longest item (0 = none)."""
    real = sum(lengths[i] for b in rows for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in rows if b)
    return 1 - real / padded if padded else 0.0


def split_micro(batch: Sequence[int], parts: int) -> list[list[int]]:
    """Split a batch into `parts` near-equal micro-batches (empty ones dropped)."""
    size, rem = divmod(len(batch), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < rem else 0)
        if end > start:
            out.append(list(batch[start:end]))
        start = end
    return out
