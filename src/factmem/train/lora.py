"""Training only part of a model in a stage: LoRA adapters (PEFT) and layer freezing.

`begin_stage` prepares the model before the stage's optimizer is built (the optimizer takes the
parameters that have `requires_grad`); `end_stage` merges the adapter (or keeps it) and makes
frozen parameters trainable again, so the next stage starts from a plain, fully trainable model
unless it asks otherwise. Generic over Hugging Face causal LMs: no list of architectures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from factmem.config import FreezeConfig, LoraConfig, StageConfig
from factmem.errors import ModelError
from factmem.models import decoder_layers

log = logging.getLogger(__name__)


def is_adapter_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft missing: nothing can be an adapter model
        return False
    return isinstance(model, PeftModel)


def add_lora(model, cfg: LoraConfig):
    """Wrap `model` with a fresh LoRA adapter (B = 0: the model's outputs are unchanged until
    it trains); only the adapter trains. A model that already carries an adapter kept from the
    previous stage goes on training that adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if is_adapter_model(model):
        return model
    targets = list(cfg.target_modules) if cfg.target_modules else attention_projections(model)
    log.info("lora: adapters on %s", ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets})))
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. no module matches target_modules
        raise ModelError(f"lora: {str(e).splitlines()[0][:300]}") from None


def attention_projections(model) -> list[str]:
    """Qualified names of the linear layers inside each decoder layer's attention block: the
    default LoRA targets of any family. The attention block is the layer's child that
    transformers' attention interface marks with `is_causal`; its linear layers are the
    projections, whatever the family calls them (fused `qkv_proj`, `query_key_value`, ...).
    Full names, so a suffix shared with an MLP layer (`dense`) cannot match it."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    prefix, layers = decoder_layers(model)
    names = []
    for i, layer in enumerate(layers):
        blocks = [(n, m) for n, m in layer.named_children() if hasattr(m, "is_causal")]
        if len(blocks) != 1:
            raise ModelError(f"lora: cannot tell the attention block of decoder layer {i} "
                             f"({type(layer).__name__}) apart; set lora.target_modules")
        name, block = blocks[0]
        names += [f"{prefix}.{i}.{name}.{n}" for n, m in block.named_modules()
                  if isinstance(m, (nn.Linear, Conv1D))]
    if not names:
        raise ModelError("lora: the attention blocks hold no linear layers; set "
                         "lora.target_modules")
    return names


def merge_adapter(model):
    """Fold the adapter into the base weights; the plain model comes back fully trainable."""
    merged = model.merge_and_unload()
    merged.requires_grad_(True)
    return merged


def freeze(model, cfg: FreezeConfig) -> list[nn.Parameter]:
    """Set requires_grad False on the input embeddings (a tied output layer shares them) and on
    the listed decoder layers; returns the parameters it froze (to unfreeze after the stage)."""
    frozen: list[nn.Parameter] = []
    modules: list[nn.Module] = []
    if cfg.embeddings:
        modules.append(model.get_input_embeddings())
    if cfg.layers:
        _, layers = decoder_layers(model)
        for i in cfg.layers:
            if not -len(layers) <= i < len(layers):
                raise ValueError(f"freeze.layers: index {i} out of range (the model has "
                                 f"{len(layers)} decoder layers)")
            modules.append(layers[i])
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    return frozen


@dataclass
class StageParts:
    """What `begin_stage` changed, for `end_stage` and the stage's metrics."""

    lora: LoraConfig | None
    frozen: list[nn.Parameter] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def begin_stage(model, stage: StageConfig, accelerator) -> tuple[Any, StageParts]:
    """The model to train in `stage` (re-prepared when it changed) and what was done to it."""
    base = accelerator.unwrap_model(model)
    changed = False
    if stage.lora is None and is_adapter_model(base):
        log.info("%s: merging the adapter kept from the previous stage (full fine-tuning)",
                 stage.name)
        base, changed = merge_adapter(base), True
    if stage.lora is not None:
        new = add_lora(base, stage.lora)
        changed = changed or new is not base
        base = new
    parts = StageParts(stage.lora)
    if stage.freeze is not None:
        try:
            parts.frozen = freeze(base, stage.freeze)
        except (ValueError, ModelError) as e:  # an index out of range, no decoder layers found
            raise ModelError(f"stage {stage.name}: {e}") from None
    total = sum(p.numel() for p in base.parameters())
    train = sum(p.numel() for p in base.parameters() if p.requires_grad)
    if stage.lora is not None or stage.freeze is not None:
        parts.info = {"trainable_parameters": train, "total_parameters": total,
                      "frozen_parameters": sum(p.numel() for p in parts.frozen)}
    return (accelerator.prepare(base) if changed else model), parts


def end_stage(model, parts: StageParts, accelerator):
    """Unfreeze what the stage froze; merge the stage's adapter unless it is kept."""
    for p in parts.frozen:
        p.requires_grad_(True)
    if parts.lora is not None and parts.lora.merge:
        return accelerator.prepare(merge_adapter(accelerator.unwrap_model(model)))
    return model
