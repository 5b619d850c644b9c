"""Batching and stop rules."""

from factmem.config import StopConfig
from factmem.train.batching import length_grouped_batches, padding_fraction, split_micro
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
