"""Finding a causal LM's parts generically: its final norm, unembedding, the logits it makes
of a last-layer hidden state, and per-layer parameter groups (the decoder layers themselves:
`models.decoder_layers`).

No list of architectures: the final norm is the norm module the decoder applies before the
unembedding (`norm`, `final_layernorm`, `ln_f`, ... on the decoder; Gemma's `(1 + w)` scaling
is inside its norm module, so calling the module applies it), the unembedding is
`get_output_embeddings()`, and a soft-capping of the logits comes from the config
(`final_logit_softcapping`, Gemma2). The logit lens checks on every batch that this recipe gives
the model's own logits at the last layer (`logit_lens.lens_logits`), so a family that does
something else to its logits is refused there rather than decoded wrongly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from factmem.errors import ModelError
from factmem.models import decoder_layers, text_config

NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


def final_norm(model) -> nn.Module:
    """The normalisation applied to the last layer's output before the unembedding."""
    owners = []
    if hasattr(model, "get_decoder"):
        with contextlib.suppress(AttributeError, NotImplementedError):
            owners.append(model.get_decoder())
    owners += [getattr(model, a, None) for a in ("model", "transformer", "gpt_neox", "decoder")]
    for owner in owners:
        if owner is None:
            continue
        for name in NORM_NAMES:
            m = getattr(owner, name, None)
            if isinstance(m, nn.Module):
                return m
    raise ModelError(f"{type(model).__name__}: cannot find the final norm before the unembedding "
                     f"(looked for {', '.join(NORM_NAMES)} on the decoder); "
                     "the logit lens needs it")


def unembedding(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__}: no output embeddings (not a causal LM head)")
    return head


def logit_softcap(model) -> float | None:
    """c in logits -> c * tanh(logits / c), where the family soft-caps its logits (Gemma2)."""
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model makes of a last-layer hidden state: [..., H] -> [..., V], through
    its final norm, its unembedding and its logit soft-capping."""
    logits = unembedding(model)(final_norm(model)(hidden))
    cap = logit_softcap(model)
    return logits if cap is None else torch.tanh(logits / cap) * cap


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
