"""Batching and stop rules."""

import pytest

from factmem.config import StopConfig
from factmem.train.batching import (
    length_grouped_batches,
    mixed_batches,
    padding_fraction,
    split_micro,
)
from factmem.train.stopping import StopRule


def test_batches_cover_every_item_once_reshuffled_per_epoch():
    lengths = [5 + (i * 7) % 23 for i in range(101)]
    e1 = length_grouped_batches(lengths, 8, seed=0, epoch=1)
    e2 = length_grouped_batches(lengths, 8, seed=0, epoch=2)
    assert sorted(i for b in e1 for i in b) == list(range(101))  # nothing dropped
    assert e1 != e2 and e1 == length_grouped_batches(lengths, 8, seed=0, epoch=1)
    assert max(len(b) for b in e1) == 8


def test_length_grouping_pads_less_than_random_batches():
    import random

    lengths = [random.Random(i).randint(10, 200) for i in range(512)]
    grouped = length_grouped_batches(lengths, 16, seed=0, epoch=1)
    order = list(range(512))
    random.Random(0).shuffle(order)
    plain = [order[i:i + 16] for i in range(0, 512, 16)]
    assert padding_fraction(lengths, grouped) < 0.1 < padding_fraction(lengths, plain)


def test_split_micro():
    assert split_micro([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_micro([1], 3) == [[1]]


def test_stop_rules():
    r = StopRule(StopConfig(rule="epochs", epochs=3))
    assert not r.after_epoch(2, 1.0) and r.after_epoch(3)
    r = StopRule(StopConfig(rule="until_memorized", epochs=10))
    assert not r.after_epoch(1, 0.9) and r.after_epoch(2, 1.0)
    assert "memorized" in r.state.reason
    r = StopRule(StopConfig(rule="until_memorized", epochs=2))
    assert not r.after_epoch(1, 0.5) and r.after_epoch(2, 0.5) and "maximum" in r.state.reason
    r = StopRule(StopConfig(rule="loss_below", threshold=0.1, patience=3, epochs=5))
    assert not any(r.after_step(x) for x in [0.05, 0.05, 0.5, 0.05, 0.05])
    assert r.after_step(0.01)


def test_loss_below_counts_cumulatively_as_the_reference_does():
    # the reference never resets its low-loss step counter: 2 + 2 low steps stop at patience 4
    r = StopRule(StopConfig(rule="loss_below", threshold=0.1, patience=4, count="cumulative"))
    assert not any(r.after_step(x) for x in [0.05, 0.05, 0.5, 0.05])
    assert r.after_step(0.05) and "cumulative" in r.state.reason
    c = StopRule(StopConfig(rule="loss_below", threshold=0.1, patience=4))  # default: consecutive
    assert not any(c.after_step(x) for x in [0.05, 0.05, 0.5, 0.05, 0.05, 0.05])
    assert c.after_step(0.05)


def mixture_groups(sizes):
    return [g for g, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("sizes,batch", [((40, 80), 12), ((32, 64), 8), ((37, 93), 10),
                                         ((16, 16, 4), 8), ((50, 25, 25, 13), 16)])
def test_mixed_batches_carry_the_mixture_in_every_batch(sizes, batch):
    """Every full batch holds batch * n_main / N main items, +-1; every item once per epoch."""
    groups = mixture_groups(sizes)
    n = len(groups)
    for epoch in (1, 2, 3):
        batches = mixed_batches(groups, batch, seed=0, epoch=epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))  # each item exactly once, none dropped
        share = batch * sizes[0] / n
        for b in batches:
            if len(b) == batch:
                main = sum(groups[i] == 0 for i in b)
                assert share - 1 <= main <= share + 1, (main, share)
                assert all(any(groups[i] == g for i in b) for g in range(len(sizes))
                           if batch * sizes[g] / n >= 1)  # every component is in every batch
    assert mixed_batches(groups, batch, 0, 1) == mixed_batches(groups, batch, 0, 1)
    assert mixed_batches(groups, batch, 0, 1) != mixed_batches(groups, batch, 0, 2)
    assert mixed_batches(groups, batch, 0, 1) != mixed_batches(groups, batch, 1, 1)


def test_length_grouped_batches_keep_facts_and_passages_apart():
    """Why it is not the default: with 34-token facts and 150-token passages (a REMIX stage),
    length grouping makes every batch all facts or all passages."""
    lengths = [34] * 32 + [150] * 64
    groups = mixture_groups((32, 64))
    pure = [b for b in length_grouped_batches(lengths, 8, 0, 1) if len({groups[i] for i in b}) == 1]
    assert len(pure) == 12
    assert all(len({groups[i] for i in b}) == 2 for b in mixed_batches(groups, 8, 0, 1))
