"""Model inputs: encoded items as padded rows or as one packed row, batches of similar length,
and the logits at the positions that carry a loss (training targets, evaluated answers).

Targets. Position t of a row predicts the token at t + 1. `targets[r, t]` is that token where it
is labelled (an assistant token, see `models.Encoded`) and -100 elsewhere, so every labelled
token of every assistant turn is a target, and nothing else is. Only positions holding a target
in some row are unembedded (`logits_to_keep`): answers are short next to prompts, and the
unembedding of a 49k vocabulary is a quarter of a SmolLM2 training step.

Packing. The items of a micro-batch are laid end to end in ONE row, `position_ids` restarting
at 0 for each item and no attention mask. transformers (>= 4.5x, `masking_utils`) reads packed
`position_ids` as separate sequences and builds a block-diagonal causal mask for its eager, SDPA
and flash-attention paths, so each item attends only to itself: the same logits as a padded
batch, without computing padding. That detection is skipped when a mask is given: a packed row
with an all-ones mask lets items attend to each other (logits off by O(1)), so `ModelBatch`
refuses a batch with both restarting positions and a mask. `packing_supported` checks on the
model at hand that packed items stay apart (a model with its own attention code may ignore
the positions); the stage loop falls back to padding if not.

Kept logits. Only some positions are unembedded (`logits_to_keep`). A forward that swallows the
argument in `**kwargs` (transformers 4.46-4.49 named it `num_logits_to_keep`; remote-code
models) returns every position instead; `_kept` tells the two apart by the length it gets
back, so such a model is sliced, never read at the wrong positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from factmem.models import Encoded

log = logging.getLogger(__name__)


@dataclass
class ModelBatch:
    """input_ids [rows, T]; attention_mask [rows, T] or None (packed); position_ids [rows, T]
    or None (padded: the model counts positions itself); targets [rows, T], -100 = no loss;
    owner [rows, T]: index of the item a position belongs to (-1 for padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    targets: torch.Tensor
    owner: torch.Tensor

    def __post_init__(self) -> None:
        if self.position_ids is not None and self.attention_mask is not None:
            raise ValueError("a packed batch (position_ids restarting per item) must not carry an "
                             "attention mask: transformers then skips the block-diagonal mask "
                             "and packed items attend to each other")

    def to(self, device) -> ModelBatch:
        def move(t):
            return None if t is None else t.to(device)

        return ModelBatch(move(self.input_ids), move(self.attention_mask),
                          move(self.position_ids), move(self.targets), move(self.owner))

    @property
    def n_tokens(self) -> int:
        """Real tokens (padding excluded)."""
        return int((self.owner >= 0).sum())

    @property
    def n_positions(self) -> int:
        """Positions the model computes (padding included)."""
        return self.input_ids.numel()


def shifted_targets(e: Encoded) -> list[int]:
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    return [*e.labels[1:], -100]


def pad_batch(items: Sequence[Encoded], pad_id: int, left: bool = False):
    """(input_ids, attention_mask, labels) padded to the batch's longest item only."""
    width = max(len(e) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e)
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(e.labels)
    return ids, mask, labels


def length_sorted_batches(lengths: Sequence[int], batch_size: int,
                          indices: Sequence[int] | None = None) -> list[list[int]]:
    """`indices` (default: all) sorted by length (stable: ties keep their order) and cut into
    batches of `batch_size`: items of similar length share a batch, so little is padding."""
    order = sorted(range(len(lengths)) if indices is None else indices, key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded(items: Sequence[Encoded], pad_id: int) -> ModelBatch:
    """One row per item, right-padded to the longest item of the batch."""
    ids, mask, _ = pad_batch(items, pad_id)
    targets = torch.full_like(ids, -100)
    owner = torch.full_like(ids, -1)
    for i, e in enumerate(items):
        targets[i, : len(e)] = torch.tensor(shifted_targets(e))
        owner[i, : len(e)] = i
    return ModelBatch(ids, mask, None, targets, owner)


def pack_rows(lengths: Sequence[int], width: int | None) -> list[list[int]]:
    """Item indices per packed row: first-fit decreasing into rows of at most `width` tokens,
    items never split. `width=None`: rows as wide as the longest item, so short items fill the
    room beside long ones and no row is wider than a padded batch's. Bounded rows matter without
    flash attention: attention costs the square of the row length, and one 1,300-token row
    trains slower than a padded batch on a CPU (benchmarks/RESULTS.md)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    cap = max(width or 0, max(lengths))
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    return [sorted(r) for r in rows]


def packed(items: Sequence[Encoded], pad_id: int = 0, width: int | None = None) -> ModelBatch:
    """Items laid end to end in rows of at most `width` tokens (None: the longest item's
    length), positions
    restarting at 0 per item. Rows shorter than the longest are padded at their end; the
    padding counts as one more sequence (its own positions), so no item attends to it."""
    rows = pack_rows([len(e) for e in items], width)
    span = max(sum(len(items[i]) for i in r) for r in rows)
    ids = torch.full((len(rows), span), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), span), dtype=torch.long)
    targets = torch.full((len(rows), span), -100, dtype=torch.long)
    owner = torch.full((len(rows), span), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e, n = items[i], len(items[i])
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            positions[r, at : at + n] = torch.arange(n)
            targets[r, at : at + n] = torch.tensor(shifted_targets(e))
            owner[r, at : at + n] = i
            at += n
        positions[r, at:] = torch.arange(span - at)
    return ModelBatch(ids, None, positions, targets, owner)


def make_batch(items: Sequence[Encoded], pad_id: int, pack: bool,
               pack_width: int | None = None) -> ModelBatch:
    return packed(items, pad_id, pack_width) if pack else padded(items, pad_id)


def target_logits(model, batch: ModelBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, vocab], gold [n], owner [n]) at the n target positions of `batch`, in row-major
    order. Models whose forward lacks `logits_to_keep` get full logits, then sliced."""
    keep_cols = (batch.targets != -100).any(0).nonzero().squeeze(1)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    logits = _kept(model, kwargs, keep_cols)
    targets = batch.targets[:, keep_cols]
    keep = targets != -100
    return logits[keep], targets[keep], batch.owner[:, keep_cols][keep]


def answer_positions(e: Encoded) -> range:
    """Positions whose logits predict the final answer's tokens (answer + end-of-turn)."""
    return range(e.prompt_len - 1, len(e) - 1)


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor, first: int):
    """Logits at positions first..T-2 only, and those positions. Answers are short next to
    prompts, so skipping the unembedding elsewhere saves ~25% of a training step on SmolLM2
    (49k vocabulary). Models whose forward lacks `logits_to_keep` get full logits, sliced."""
    positions = torch.arange(first, ids.shape[1] - 1, device=ids.device)
    return _kept(model, {"input_ids": ids, "attention_mask": mask}, positions), positions


def _kept(model, kwargs: dict, keep: torch.Tensor) -> torch.Tensor:
    """The logits at sequence positions `keep` [k] -> [rows, k, vocab]. Asks the model for those
    positions only; a forward without `logits_to_keep` (TypeError) or one that ignores it
    (every position comes back) is sliced here."""
    width = kwargs["input_ids"].shape[1]
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:
        logits = model(**kwargs).logits
    got = logits.shape[1]
    if got == len(keep):
        return logits
    if got == width:
        return logits[:, keep]
    raise RuntimeError(f"the model returned logits for {got} positions, neither the {len(keep)} "
                       f"asked for (logits_to_keep) nor all {width}: cannot tell which they are")


@torch.no_grad()
def packing_supported(model, vocab_size: int | None = None) -> bool:
    """Whether `model` keeps packed items apart: the logits of two items packed in one row must
    equal their logits computed alone. Costs two forwards of 13 tokens."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (7,), generator=gen).tolist()
    b = torch.randint(0, vocab, (6,), generator=gen).tolist()
    items = [Encoded("a", a, a, 0), Encoded("b", b, b, 0)]
    was_training = model.training
    model.eval()  # no dropout
    try:
        alone = [model(input_ids=torch.tensor([x], device=device)).logits[0].float()
                 for x in (a, b)]
        pb = packed(items, width=len(a) + len(b)).to(device)
        together = model(input_ids=pb.input_ids, position_ids=pb.position_ids).logits[0].float()
    except (TypeError, ValueError, RuntimeError) as e:
        log.info("packing: the model's forward refused packed position_ids (%s)", e)
        return False
    finally:
        model.train(was_training)
    expected = torch.cat(alone)
    scale = float(expected.abs().max()) or 1.0
    # an item that sees the other one differs by O(1); rounding (bf16 included) by far less
    return float((together - expected).abs().max()) <= 0.02 * scale
