"""Layer reversion: put one block of layers back to its weights from before the stage that
taught a set, and see which facts survive. A fact lost when layer L is reverted needed the
stage's change to layer L; a fact that survives every single reversion is spread over layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from factmem.analysis.layers import layer_param_groups
from factmem.data.examples import Example
from factmem.errors import ModelError
from factmem.evaluate import evaluate_examples
from factmem.models import Formatter


@contextmanager
@torch.no_grad()
def reverted(model, pre_state: dict[str, torch.Tensor], names: Sequence[str]) -> Iterator[None]:
    """Within the block, parameters `names` of `model` hold their `pre_state` values; they are
    put back exactly on exit."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in pre_state or n not in params]
    if missing:
        raise ModelError(f"pre-stage weights lack {missing[0]} (and {len(missing) - 1} more): "
                         "not the same architecture")
    saved = {n: params[n].detach().clone() for n in names}
    try:
        for n in names:
            params[n].copy_(pre_state[n].to(params[n].device, params[n].dtype))
        yield
    finally:
        for n in names:
            params[n].copy_(saved[n])


def layer_reversion(model, pre_state: dict[str, torch.Tensor], fmt: Formatter,
                    examples: Sequence[Example], block: int = 1, batch_size: int = 32
                    ) -> list[dict[str, Any]]:
    """Rows per (group, fact): exact match, token accuracy and log-prob with that group reverted.
    Group "none" is the model as trained, "all" every parameter reverted (the pre-stage model)."""
    groups = layer_param_groups(model, block)
    everything = [n for g in groups for n in g[3]]
    plan = [("none", 0, 0, []), *groups, ("all", 0, 0, everything)]
    rows = []
    for label, first, last, names in plan:
        with reverted(model, pre_state, names):
            preds = evaluate_examples(model, fmt, examples, "fast", batch_size)
        for p in preds:
            rows.append({"group": label, "layer_start": first, "layer_end": last, "id": p.id,
                         "correct": p.correct, "token_acc": p.token_acc, "logprob": p.logprob})
    return rows
