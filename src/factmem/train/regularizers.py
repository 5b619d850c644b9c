"""Continual-learning regularizers as stage callbacks: EWC, L2 to the previous weights, and KL
distillation to the frozen previous model (LwF).

All three anchor to the model as it ENTERS the stage that uses them, which is the previous
stage's result: the anchor weights, the Fisher and the teacher are taken in `on_stage_start`.
That keeps the previous stage itself free of regularizer settings, so variants that differ only
in a later stage's regularizer still share (and train once) their first stages.

Penalties act on the parameters that train in the stage (`requires_grad`), so with LoRA or
layer freezing they cover the adapter or the unfrozen layers only.

Under FSDP (factmem.distributed) the anchor and the Fisher are sharded like the weights: each
rank keeps and penalises its own shards, the teacher is a sharded copy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from factmem import distributed as dist
from factmem.batch import target_logits
from factmem.config import RegularizerConfig, StageConfig
from factmem.data import Example
from factmem.models import Encoded, Formatter
from factmem.rundir import FISHER_FILE
from factmem.train.loop import StageCallback, StageContext, batch_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The method: small pure functions


def trainable(model) -> dict[str, torch.Tensor]:
    """name -> parameter, for the parameters that train (tied weights appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def quadratic_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                      fisher: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over all named tensors; F = 1 when `fisher` is None
    (L2 to the anchor). Differentiable in `params`."""
    total = None
    for name, p in params.items():
        d2 = (p - anchor[name]).pow(2)
        term = (d2 * fisher[name]).sum() if fisher is not None else d2.sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no parameters to regularize (every parameter is frozen)")
    return total


def diagonal_fisher(model, fmt: Formatter, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the MEAN over examples of the SQUARED per-example gradient of
    the example's answer log-likelihood (summed over its answer tokens), one example at a time.
    Not the square of the mean gradient, which vanishes where examples pull different ways.

    Shapes: one float32 tensor per trainable parameter, same shape as the parameter."""
    if not examples:
        raise ValueError("the Fisher needs at least one example")
    params = trainable(model)
    names, tensors = list(params), list(params.values())
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = tensors[0].device
    pad_id = fmt.tok.pad_token_id
    was_training = model.training
    sharded = dist.is_sharded(model)
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        for ex in examples:
            nll, _, _ = batch_loss(model, [fmt.encode(ex)], pad_id, device)
            if sharded:  # every rank on the same example: FSDP hands back this rank's shards
                grads = dist.backward_grads(nll, tensors)
            else:
                grads = torch.autograd.grad(nll, tensors, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    fisher[n] += g.detach().float().pow(2)
    finally:
        model.train(was_training)
    for n in names:
        fisher[n] /= len(examples)
    return fisher


def fisher_mean(fisher: dict[str, torch.Tensor]) -> float:
    """Mean over all entries (of every shard, under FSDP: float() of a sharded sum would be
    this rank's part only)."""
    total = sum(float(dist.full(f.sum())) for f in fisher.values())
    return total / sum(f.numel() for f in fisher.values())


def normalize_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide by the mean over all entries: mean 1, so an EWC weight reads like an L2 weight."""
    mean = fisher_mean(fisher)
    if mean <= 0:
        raise ValueError("the Fisher is zero everywhere (the model fits its set exactly); "
                         "cannot normalize it")
    return {n: f / mean for n, f in fisher.items()}


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """T^2 x SUM over positions of KL(teacher_T || student_T), softmax at temperature T.

    Shapes: logits [n_positions, vocab] -> scalar. Zero when student equals teacher. A sum, so
    that the caller divides by the step's position count, as the answer loss is divided."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * t * t


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------
# Callbacks


class WeightAnchor(StageCallback):
    """EWC (`fisher_examples` given) or L2 (F = 1): weight x sum F (theta - theta*)^2 added to
    every optimizer step's loss, theta* = the weights entering the stage."""

    def __init__(self, cfg: RegularizerConfig, fisher_examples: list[Example] | None = None,
                 out_dir: Path | None = None):
        if cfg.kind == "ewc" and not fisher_examples:
            raise ValueError("ewc needs the previous stage's factoids for its Fisher")
        self.cfg = cfg
        self.fisher_examples = fisher_examples
        self.out_dir = out_dir  # where the Fisher is saved (None: not saved)
        self.params: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] | None = None
        self.sharded = False
        self.last = 0.0
        self.info: dict[str, Any] = {"kind": cfg.kind, "weight": cfg.weight}

    def on_stage_start(self, ctx: StageContext) -> None:
        model = ctx.accelerator.unwrap_model(ctx.model)
        # kept: the parameters the optimizer updates (FSDP swaps whole tensors in and out of
        # the module around forward passes; these are its shards)
        self.params = params = trainable(model)
        self.sharded = dist.is_sharded(model)
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        extra = tensor_bytes(self.anchor.values())
        if self.cfg.kind == "ewc":
            self.fisher = diagonal_fisher(model, ctx.fmt, self.fisher_examples or [])
            raw_mean = fisher_mean(self.fisher)
            self.info.update(fisher_examples=len(self.fisher_examples or []),
                             fisher_mean=raw_mean, normalized=self.cfg.normalize)
            if self.cfg.normalize:
                self.fisher = normalize_fisher(self.fisher)
            self.fisher = {n: f.to(self.anchor[n].dtype) for n, f in self.fisher.items()}
            extra += tensor_bytes(self.fisher.values())
            if self.out_dir is not None:
                self.info["fisher_file"] = self._save_fisher(self.out_dir / FISHER_FILE,
                                                             ctx.accelerator.is_main_process)
        self.info.update(parameters=sum(t.numel() for t in self.anchor.values()),
                         extra_bytes=extra)
        log.info("%s: anchored %d parameters (%.1f MB extra)", self.cfg.kind,
                 self.info["parameters"], extra / 2**20)

    def _save_fisher(self, path: Path, write: bool) -> str:
        """Writes the Fisher; returns the file to read it from (under FSDP, past 5 GB, an
        index over several files, as save_pretrained writes large models)."""
        from safetensors.torch import save_file

        metadata = {"normalized": str(self.cfg.normalize)}
        if self.sharded:  # gathered tensor by tensor, written by rank 0
            stem = path.name.removesuffix(".safetensors")
            names = dist.save_gathered(self.fisher or {}, path.parent, stem, metadata)
            return names[0] if len(names) == 1 else f"{stem}.safetensors.index.json"
        if not write:
            return path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: f.detach().contiguous().cpu() for n, f in self.fisher.items()}, str(tmp),
                  metadata=metadata)
        tmp.replace(path)
        return path.name

    def penalty(self, model=None) -> torch.Tensor:
        """The penalty over the parameters anchored at stage start; under FSDP over this rank's
        shards only (its gradient lands on those shards directly, without FSDP's averaging)."""
        def mine(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: dist.local(t) for n, t in d.items()}

        params = self.params or trainable(model)
        fisher = mine(self.fisher) if self.fisher is not None else None
        return quadratic_penalty(mine(params), mine(self.anchor), fisher)

    def extra_loss(self, ctx: StageContext, items: list[Encoded], share: float):
        if self.cfg.weight == 0:
            return None
        p = self.penalty(ctx.accelerator.unwrap_model(ctx.model))
        self.last = dist.global_sum(p) if self.sharded else float(p.detach())
        # a per-step penalty: each micro-batch adds its share, so the step adds it once
        return self.cfg.weight * p * share

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        row[f"{self.cfg.kind}_penalty"] = self.last  # before the step's update

    def on_stage_end(self, ctx: StageContext) -> None:
        self.params, self.anchor, self.fisher = {}, {}, None  # free the copies

    def report(self) -> dict[str, Any]:
        return dict(self.info)


class Distillation(StageCallback):
    """LwF-style KL to the frozen model entering the stage: weight x T^2 x mean KL over the
    answer positions of the step's items (or of its mixing items only, `on: mix`).

    Normalised like the answer loss: each micro-batch adds its SUM over positions divided by
    the count of such positions in the whole step (all micro-batches, all processes), so the
    penalty does not depend on grad_accum or the process count, nor on which micro-batch
    happens to hold the mixing items."""

    def __init__(self, cfg: RegularizerConfig, mix_ids: set[str] | None = None):
        if cfg.on == "mix" and not mix_ids:
            raise ValueError("kl on: mix needs mixing items in the stage")
        self.cfg = cfg
        self.mix_ids = mix_ids or set()
        self.teacher = None
        self.sharded = False
        self.total, self.count = 0.0, 0
        self.info: dict[str, Any] = {"kind": "kl", "weight": cfg.weight,
                                     "temperature": cfg.temperature, "on": cfg.on}

    def on_stage_start(self, ctx: StageContext) -> None:
        model = ctx.accelerator.unwrap_model(ctx.model)
        self.sharded = dist.is_sharded(model)
        # FSDP modules cannot be deep-copied: the teacher is a sharded copy built shard by shard
        self.teacher = dist.frozen_copy(model) if self.sharded else copy.deepcopy(model).eval()
        self.teacher.requires_grad_(False)
        extra = tensor_bytes(self.teacher.parameters()) + tensor_bytes(self.teacher.buffers())
        self.info["extra_bytes"] = extra
        log.info("kl: frozen teacher (%.1f MB extra)", extra / 2**20)

    def covered(self, e: Encoded) -> bool:
        return self.cfg.on == "stage" or e.id in self.mix_ids

    def extra_loss(self, ctx: StageContext, items: list[Encoded], share: float):
        micro = ctx.micro
        if micro is None or self.cfg.weight == 0:
            return None
        rows = torch.tensor([self.covered(e) for e in micro.items], dtype=torch.bool,
                            device=micro.owner.device)
        keep = rows[micro.owner]
        denominator = sum(e.n_targets for e in ctx.batch_items if self.covered(e))
        counted = ctx.micro_weight > 0 and denominator > 0 and bool(keep.any())
        if not counted and not self.sharded:
            return None
        # the student's logits are the loop's own (one forward); the teacher runs on the same
        # batch, so its logits line up position for position. Under FSDP the teacher's forward
        # is a collective: every process runs it on every pass, counted or not.
        with torch.no_grad():
            teacher, _, _ = target_logits(self.teacher, micro.batch)
        if not counted:
            return None
        kl = distillation_kl(micro.logits[keep], teacher[keep], self.cfg.temperature)
        self.total += float(kl.detach())
        self.count += int(keep.sum())
        world = ctx.accelerator.num_processes  # DDP and FSDP average gradients over processes
        return self.cfg.weight * kl * world / denominator

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        row["kl"] = self.total / self.count if self.count else 0.0  # mean per position (this
        self.total, self.count = 0.0, 0  # process's share of the step)

    def on_stage_end(self, ctx: StageContext) -> None:
        self.teacher = None

    def report(self) -> dict[str, Any]:
        return dict(self.info)


def build_regularizers(stage: StageConfig, previous_factoids: list[Example] | None,
                       mix_ids: set[str], out_dir: Path | None) -> list[StageCallback]:
    """The callbacks of a stage's `regularizers` list. `previous_factoids`: the factoids of the
    previous stage's sets (EWC's Fisher); `mix_ids`: ids of the stage's mixing items (kl on mix)."""
    out: list[StageCallback] = []
    for r in stage.regularizers:
        if r.kind == "kl":
            out.append(Distillation(r, mix_ids))
        else:
            out.append(WeightAnchor(r, previous_factoids if r.kind == "ewc" else None, out_dir))
    return out
