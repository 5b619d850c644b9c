"""The memory plan: what each GPU holds while a run trains, from the model's config alone.

The model is built on the meta device (shapes and dtypes; no weights are read and no memory is
allocated), so `factmem run --dry-run` plans an 8B model on a laptop. Per GPU, with FSDP2 full
sharding over N GPUs (factmem.distributed shards every decoder layer and the root):

- weights and gradients: each parameter is cut along its first dimension into N shards of
  ceil(rows / N) rows (FSDP2 pads the last), tied parameters counted once;
- AdamW: two moments per parameter in the parameters' dtype, and a float32 step count per
  tensor (torch keeps `step` as a tensor);
- gathered: the root's parameters (embeddings, final norm, head: FSDP2 keeps the root gathered
  from the forward pass to the backward) and two decoder layers (the one computing and the next,
  prefetched), whole; with one process nothing is gathered;
- activations: what autograd keeps for the backward pass, measured: the stage loop's own
  computation (logits at the answer positions only, float32 cross-entropy) run over one packed
  row on the meta device with the run's attention implementation, every tensor saved for
  backward counted once (parameters excluded). Three row lengths and two answer counts give
  cost(T, K) = fixed + per_token T + per_target K + attention T^2 exactly, a fifth checks it.
  The T^2 term is the attention mask of a packed row (SDPA keeps a float copy per layer) or,
  with eager attention, the T x T weights. On the meta device torch would run SDPA's math
  fallback; the measurement routes it to the fused CPU kernel's meta function, which keeps
  what the kernel keeps (q, k, v, output, log-sum-exp, mask). Against the loop run on real
  tensors on the CPU this is exact for every family of tests/families (to the K bytes of the
  loop's answer mask); CUDA's flash and memory-efficient kernels keep the same tensors, but
  that was not measured on a GPU;
- regularizers: EWC keeps an anchor and a Fisher (2 x the weights), L2 an anchor, KL a teacher.

Example, Llama-3-8B in bfloat16 over 8 GPUs: 8,030,261,248 parameters -> 2.01 GB of weights,
2.01 GB of gradients and 4.02 GB of AdamW moments per GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from factmem.config import ExperimentConfig, ModelConfig
from factmem.errors import ModelError
from factmem.models import decoder_layers, model_files
from factmem.plan import RunPlan, StagePlan

log = logging.getLogger(__name__)

GPU_COUNTS = (1, 2, 4, 8)
PLAN_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float32": torch.float32}  # auto: what it picks on a GPU with bf16 support
PREFETCHED_LAYERS = 2  # FSDP2 gathers the next layer while the current one computes
STEP_BYTES = 4  # AdamW's float32 step count, one per parameter tensor


@dataclass(frozen=True)
class ActivationCost:
    """Bytes autograd keeps for the backward pass of one packed row of T tokens of which K are
    answer tokens: fixed + per_token * T + per_target * K + attention * T^2."""

    fixed: int
    per_token: int
    per_target: int
    attention: int  # a packed row's mask (SDPA) or the attention weights (eager), per T^2

    def at(self, tokens: int, targets: int) -> int:
        return (self.fixed + self.per_token * tokens + self.per_target * targets
                + self.attention * tokens**2)


@dataclass(frozen=True)
class GpuMemory:
    """Bytes one GPU holds with the model sharded over `gpus` GPUs."""

    gpus: int
    weights: int
    grads: int
    adamw: int
    gathered: int
    activations: int | None  # None: unknown without the data plan's token counts
    regularizers: int

    @property
    def total(self) -> int:
        """Everything known: without the activations when they are unknown."""
        return (self.weights + self.grads + self.adamw + self.gathered + (self.activations or 0)
                + self.regularizers)


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    source: str  # where the architecture was read
    model_type: str
    dtype: torch.dtype
    attention: str  # the attention implementation the run will use
    shapes: tuple[tuple[int, ...], ...]  # every parameter tensor once (tied ones once)
    root_parameters: int  # parameters outside the decoder layers
    layer_parameters: int  # the largest decoder layer's
    activations: ActivationCost

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def bytes_per_parameter(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def sharded(self, gpus: int) -> int:
        """Bytes of one GPU's shards of every parameter (ceil(rows / gpus) rows each)."""
        return self.bytes_per_parameter * sum(
            math.ceil(s[0] / gpus) * math.prod(s[1:]) if s else 1 for s in self.shapes)

    def per_gpu(self, gpus: int, stages: list[StagePlan] | None = None) -> GpuMemory:
        shard = self.sharded(gpus)
        gathered = 0 if gpus == 1 else self.bytes_per_parameter * (
            self.root_parameters + PREFETCHED_LAYERS * self.layer_parameters)
        trained = [s for s in stages or [] if s.reused_from is None]
        extra = max((s.extra_copies for s in trained), default=0.0)
        return GpuMemory(gpus, shard, shard, 2 * shard + STEP_BYTES * len(self.shapes),
                         gathered, self.micro_batch_activations(gpus, trained) if stages else None,
                         int(extra * shard))

    def micro_batch_activations(self, gpus: int, stages: list[StagePlan]) -> int:
        """The most any stage's micro-batch keeps on one GPU: each process takes its share of
        the global batch (ceil(batch / gpus) items), split into grad_accum micro-batches, each
        packed into rows no wider than the stage's longest item; counted as if every item were
        the longest and had the most answer tokens (an upper bound)."""
        most = 0
        for s in stages:
            items = math.ceil(math.ceil(s.batch_size / gpus) / s.grad_accum)
            tokens, targets = items * s.longest, items * s.most_targets
            row_squares = items * s.longest**2  # rows of at most `longest` tokens
            cost = (self.activations.fixed + self.activations.per_token * tokens
                    + self.activations.per_target * targets
                    + self.activations.attention * row_squares)
            most = max(most, cost)
        return most


# --------------------------------------------------------------------------------------------
# Building it


def memory_plan(cfg: ExperimentConfig) -> MemoryPlan:
    """The memory plan of a run's model (its first variant's), from its config alone."""
    config, source = model_architecture(cfg.model)
    dtype = PLAN_DTYPES[cfg.model.dtype]
    model = meta_model(config, dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    attention = model.config._attn_implementation
    cost = measure_activations(model)
    prefix, layers = decoder_layers(model)
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    in_layers = {n for n in params if n.startswith(f"{prefix}.")}
    return MemoryPlan(
        cfg.model.name, source, config.model_type, dtype, attention,
        tuple(tuple(p.shape) for p in params.values()),
        sum(params[n].numel() for n in params if n not in in_layers),
        max(sum(p.numel() for p in layer.parameters()) for layer in layers), cost)


def model_architecture(cfg: ModelConfig):
    """(transformers config, where it was read): `model.architecture` when given, else the
    model's own config.json (an embedded model, a local directory, the HF cache or the hub)."""
    from transformers import AutoConfig

    if cfg.architecture is not None and not Path(cfg.architecture).exists():
        raise ModelError(f"model.architecture: {cfg.architecture} does not exist (a config.json, "
                         "or a directory holding one)")
    # model_files: an embedded model not yet converted is read from its GGUF file in place
    # (within without_model_writes, as in a dry run)
    where, extra = (cfg.architecture, {}) if cfg.architecture else model_files(cfg.name)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=cfg.trust_remote_code,
                                            **extra)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        key = "model.architecture" if cfg.architecture else "model.name"
        raise ModelError(f"{key}: cannot read the model's config from {where} ({first}); "
                         "model.architecture may point at a local copy of its config.json"
                         ) from None
    source = (f"{where} (model.architecture)" if cfg.architecture
              else f"the config of {cfg.name}")
    return config, source


def meta_model(config, dtype: torch.dtype, attention: str | None, trust_remote_code: bool):
    """The causal LM of `config` on the meta device: shapes, dtypes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attention,
            trust_remote_code=trust_remote_code)
    model.config.use_cache = False  # as load_model: training keeps no cache
    return model.train()


def saved_bytes(model, tokens: int, targets: int) -> int:
    """Bytes autograd saves for the backward pass of one packed row of `tokens` tokens with
    `targets` answer tokens, through the stage loop's computation (`batch.target_logits`:
    logits at the answer positions only; `train.loop.step_loss`: float32 cross-entropy). Each
    storage counted once (views share one); parameters are weights, not activations. A packed
    row's attention runs with a mask (`packed_row_on_meta`), as the loop's rows of several
    items do."""
    import torch.nn.functional as F

    # a storage's identity: its C++ object (data_ptr is 0 for every meta tensor)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    device = next(model.parameters()).device
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    answer = torch.arange(tokens - targets - 1, tokens - 1, device=device)  # predicting them
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_sdpa_on_meta(),
          packed_row_on_meta()):
        logits = model(input_ids=ids, logits_to_keep=answer).logits
        picked = logits.flatten(0, 1).float()
        F.cross_entropy(picked, torch.zeros(targets, dtype=torch.long, device=device),
                        reduction="sum")
    return sum(seen.values())


@contextmanager
def fused_sdpa_on_meta() -> Iterator[None]:
    """SDPA on meta tensors as torch's fused CPU kernel runs it. On the meta device torch
    takes SDPA's math fallback, which keeps the T x T attention weights for backward; the fused
    kernels keep q, k, v, their output and a log-sum-exp per head, and a float copy of a
    boolean mask (CUDA's flash and memory-efficient kernels keep the same, plus a few bytes of
    RNG state). Within the block, SDPA on meta tensors goes to the CPU kernel's meta function;
    torch's own function is put back on exit."""
    import torch.nn.functional as F

    torch_sdpa = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if query.device.type != "meta":
            return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel adds floats
            attn_mask = torch.empty(attn_mask.shape, dtype=query.dtype, device=query.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = torch_sdpa


@contextmanager
def packed_row_on_meta() -> Iterator[None]:
    """transformers tells packed rows from their restarting `position_ids` and then builds a
    block-diagonal mask, which attention keeps for backward; the telling reads values, which
    meta tensors do not have. Within the block every row counts as packed (the mask's shape
    is all the plan needs); transformers' function is put back on exit."""
    from transformers import masking_utils

    detect = masking_utils.find_packed_sequence_indices

    def packed(position_ids: torch.Tensor) -> torch.Tensor | None:
        if position_ids.device.type != "meta":
            return detect(position_ids)
        return torch.empty_like(position_ids)

    masking_utils.find_packed_sequence_indices = packed
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = detect


def measure_activations(model) -> ActivationCost:
    """cost(T, K) fitted on four rows and checked on a fifth (an exact fit: every saved tensor
    is a polynomial of degree <= 2 in T, of degree 1 in K)."""
    t1, t2, t3, k1, k2 = 32, 64, 128, 4, 8
    f1, f2, f3 = (saved_bytes(model, t, k1) for t in (t1, t2, t3))
    per_target = (saved_bytes(model, t2, k2) - f2) // (k2 - k1)
    # f(T) = c + a T + q T^2 through (32, f1), (64, f2), (128, f3)
    quad = ((f3 - f2) / (t3 - t2) - (f2 - f1) / (t2 - t1)) / (t3 - t1)
    lin = (f2 - f1) / (t2 - t1) - quad * (t1 + t2)
    fixed = f1 - lin * t1 - quad * t1**2 - per_target * k1
    cost = ActivationCost(round(fixed), round(lin), per_target, round(quad))
    check = saved_bytes(model, 96, 6)
    if cost.at(96, 6) != check:
        log.warning("memory plan: the activation fit is off by %d bytes at 96 tokens",
                    cost.at(96, 6) - check)
    return cost


# --------------------------------------------------------------------------------------------
# Printing it


def size(n: int | None) -> str:
    """Bytes in decimal units (GB = 1e9 bytes), three significant digits at least."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_memory(plan: MemoryPlan, run: RunPlan | None) -> str:
    """The memory plan as `factmem run --dry-run` prints it, per GPU count."""
    stages = run.stages if run is not None else None
    dtype = str(plan.dtype).replace("torch.", "")
    act = plan.activations
    what = "weights" if plan.attention == "eager" else "mask"
    lines = [
        f"memory per GPU (FSDP2 full sharding, full fine-tuning, AdamW, {dtype} weights, "
        f"{plan.attention} attention; architecture: {plan.source}, built on the meta device):",
        f"  {plan.parameters:,} parameters in {len(plan.shapes)} tensors "
        f"({plan.root_parameters:,} outside the decoder layers, {plan.layer_parameters:,} in "
        "the largest layer)",
        f"  activations kept for backward: {size(act.per_token)} per token + "
        f"{size(act.per_target)} per answer token + {size(act.attention)} x T per token of a "
        f"T-token row (its attention {what})",
        "  " + " ".join(f"{h:>10}" for h in ("GPUs", "weights", "grads", "AdamW", "gathered",
                                              "activ.", "regul.")) + f" {'total':>12}",
    ]
    for n in GPU_COUNTS:
        m = plan.per_gpu(n, stages)
        cells = [size(c) for c in (m.weights, m.grads, m.adamw, m.gathered, m.activations,
                                     m.regularizers, m.total)]
        total = cells.pop() + (" +" if m.activations is None else "  ")
        row = "  " + f"{n:>10} " + " ".join(f"{c:>10}" for c in cells) + f" {total:>12}"
        lines.append(row.rstrip())
    if stages is None:
        lines.append("  activ.: unknown without the data plan (the tokens of each item need "
                     "the tokenizer), so not in the total (+)")
    else:
        lines.append("  activ.: the largest micro-batch of any stage, every item as long as the "
                     "stage's longest; gathered: the root and 2 decoder layers, whole; regul.: "
                     "EWC, L2, KL copies; GB = 1e9 bytes; LoRA or frozen layers need less")
    return "\n".join(lines)
