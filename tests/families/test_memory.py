"""The memory plan against what torch holds, family by family: the plan is made on the meta
device from the config alone; the figures here are torch's own for the real (CPU) model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from factmem.config import experiment_from_dict
from factmem.memory import measure_activations, memory_plan, meta_model
from factmem.models import Encoded, load_model
from factmem.train.loop import forward_targets, make_optimizer, step_loss
from families.conftest import FAMILY_NAMES

pytestmark = pytest.mark.parametrize("family", FAMILY_NAMES)


def run_config(model_dir, **model):
    return experiment_from_dict({
        "name": "m", "model": {"name": str(model_dir), "dtype": "float32", **model},
        "sets": {"a": {"source": "kvr", "n": 2}}, "stages": [{"name": "s", "set": "a"}],
    }).first_variant


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_weights_gradients_and_adamw_state_are_torchs(family, family_dirs):
    """One process: the plan's weights, gradients and AdamW state (after one step of the
    loop's own optimizer) are the bytes torch holds, tied parameters once."""
    cfg = run_config(family_dirs(family))
    plan = memory_plan(cfg).per_gpu(1)
    model = load_model(cfg.model)
    params = list(model.parameters())  # each shared parameter once
    assert plan.weights == nbytes(params)
    item = Encoded("x", list(range(3, 40)), [-100] * 30 + list(range(3, 10)), 30)
    step_loss(forward_targets(model, [item], 0, "cpu"))[0].backward()
    assert plan.grads == nbytes(p.grad for p in params)
    optimizer = make_optimizer(model, cfg.train)
    optimizer.step()
    assert plan.adamw == nbytes(t for s in optimizer.state.values() for t in s.values())


def saved_by_the_loop(model, lengths: list[int], answer: int) -> int:
    """Bytes autograd saves when the stage loop trains on `lengths` items packed into one row,
    each ending in `answer` answer tokens (real tensors, on the CPU)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen.setdefault(s._cdata, s.nbytes())
        return t

    items = [Encoded(f"x{i}", [3 + j % 90 for j in range(n)], [-100] * (n - answer) + [5] * answer,
                     n - answer) for i, n in enumerate(lengths)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_loss(forward_targets(model, items, 0, "cpu", pack=True, pack_width=sum(lengths)))
    return sum(seen.values())


@pytest.mark.parametrize("attention", [None, "eager"])
def test_activation_estimate_is_what_autograd_saves(family, family_dirs, attention):
    """Measured on the meta device, compared with the loop's forward and loss on real tensors
    over packed rows: equal but for the loop's boolean answer mask (one byte per answer token,
    where the meta measurement indexes)."""
    model_dir = family_dirs(family)
    estimate = measure_activations(
        meta_model(AutoConfig.from_pretrained(model_dir), torch.float32, attention, False))
    cfg = run_config(model_dir, attn_implementation=attention)
    model = load_model(cfg.model)
    for lengths, answer in (([60, 40], 7), ([30, 30, 90], 4)):
        real = saved_by_the_loop(model, lengths, answer)
        targets = answer * len(lengths)
        assert 0 <= real - estimate.at(sum(lengths), targets) <= targets, (lengths, real)
    # a row of one item needs no mask: the estimate is then an upper bound
    assert saved_by_the_loop(model, [130], 9) <= estimate.at(130, 9) + 9
