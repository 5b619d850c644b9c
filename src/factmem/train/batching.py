"""Length-grouped batches: every item once per epoch, reshuffled per epoch (seeded), padded only
to the longest item of its batch. No item is ever dropped (the last batch may be smaller)."""

from __future__ import annotations

import random
from collections.abc import Sequence


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
        chunk = sorted(order[g : g + group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions in the batches (0 = no padding)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
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
