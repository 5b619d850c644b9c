"""Finding a causal LM's parts generically: its final norm, unembedding, the logits it makes
of a last-layer hidden state, and per-layer parameter groups (the decoder layers themselves:
`models.decoder_layers`).

No list of architectures: the final norm is the norm module the decoder applies before the
unembedding (`norm`, `final_layernorm`, `ln_f`, ... on the decoder, else the child of the
decoder whose output the unembedding takes, seen with hooks; Gemma's `(1 + w)` scaling is
inside its norm module, so calling the module applies it), the unembedding is
`get_output_embeddings()`, and a soft-capping of the logits comes from the config
(`final_logit_softcapping`, Gemma2). The logit lens checks on every batch that this recipe gives
the model's own logits at the last layer (`logit_lens.lens_logits`), so a family that does
something else to its logits is refused there rather than decoded wrongly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from factmem.errors import ModelError
from factmem.models import decoder_layers, text_config

NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


def final_norm(model) -> nn.Module:
    """The normalisation applied to the last layer's output before the unembedding: a norm of
    one of the usual names on the decoder, else the decoder's child whose output the
    unembedding receives in a forward pass (`norm_feeding_head`)."""
    owners = [_decoder(model), getattr(model, "base_model", None)]
    for owner in owners:
        if owner is None:
            continue
        for name in NORM_NAMES:
            m = getattr(owner, name, None)
            if isinstance(m, nn.Module):
                return m
    found = norm_feeding_head(model)
    if found is not None:
        return found
    raise ModelError(f"{type(model).__name__}: cannot find the final norm before the unembedding "
                     f"(looked for {', '.join(NORM_NAMES)} on the decoder, and for a module of "
                     "the decoder whose output the unembedding takes); the logit lens needs it")


def _decoder(model) -> nn.Module | None:
    with contextlib.suppress(AttributeError, NotImplementedError):
        decoder = model.get_decoder()
        return decoder if isinstance(decoder, nn.Module) else None
    return None


@torch.no_grad()
def norm_feeding_head(model) -> nn.Module | None:
    """The decoder's direct child whose output is the unembedding's input, seen with hooks in a
    forward pass of 2 tokens; None if no child's is (or the model has no decoder)."""
    decoder = _decoder(model) or getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or decoder is model or head is None:
        return None
    outputs: dict[str, torch.Tensor] = {}
    taken: list[torch.Tensor] = []

    def keep(name: str):
        return lambda _m, _a, out: outputs.setdefault(name, out)

    hooks = [child.register_forward_hook(keep(name)) for name, child in decoder.named_children()]
    hooks.append(head.register_forward_pre_hook(lambda _m, args: taken.append(args[0])))
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    finally:
        for h in hooks:
            h.remove()
    for name, out in outputs.items():
        if (isinstance(out, torch.Tensor) and taken and out.shape == taken[0].shape
                and out.data_ptr() == taken[0].data_ptr()):
            return getattr(decoder, name)
    return None


def unembedding(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__}: no output embeddings (not a causal LM head)")
    return head


def logit_softcap(model) -> float | None:
    """c in logits -> c * tanh(logits / c), where the family soft-caps its logits (Gemma2)."""
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def output_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that makes the model's logits of a last-layer hidden state, [..., H] ->
    [..., V]: its final norm, its unembedding and its logit soft-capping. The parts are looked
    up once, here (the final norm's lookup may run a forward pass)."""
    norm, head, cap = final_norm(model), unembedding(model), logit_softcap(model)

    def logits_of(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(norm(hidden))
        return logits if cap is None else torch.tanh(logits / cap) * cap

    return logits_of


def layer_param_groups(model, block: int = 1) -> list[tuple[str, int, int, list[str]]]:
    """Parameters of consecutive decoder layers, `block` at a time, plus one group for all the
    rest (embeddings, final norm, head): [(label, first layer, last layer, names)].
    Layers are numbered from 1 (layer 0 is the embedding output in the logit lens)."""
    prefix, layers = decoder_layers(model)
    names = [n for n, _ in model.named_parameters()]
    groups = []
    for start in range(0, len(layers), block):
        stop = min(start + block, len(layers))
        owned = tuple(f"{prefix}.{i}." for i in range(start, stop))
        label = f"{start + 1}" if stop - start == 1 else f"{start + 1}-{stop}"
        groups.append((label, start + 1, stop, [n for n in names if n.startswith(owned)]))
    in_layers = {n for g in groups for n in g[3]}
    groups.append(("other", 0, 0, [n for n in names if n not in in_layers]))
    return groups
