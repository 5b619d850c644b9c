"""The stage loop: AdamW + cosine schedule with warm-up, gradient clipping and accumulation, on
accelerate. Reads top to bottom: setup -> epochs of steps -> stop rule -> result."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from factmem import distributed as dist
from factmem.batch import ModelBatch, make_batch, pack_rows, packing_supported, target_logits
from factmem.config import EvalConfig, TrainConfig
from factmem.data import Example
from factmem.evaluate import evaluate_examples, summarize
from factmem.models import Encoded, Formatter
from factmem.train.batching import padding_fraction, split_micro, stage_batches
from factmem.train.stopping import StopRule

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    epochs: int
    steps: int
    stop_reason: str
    final_loss: float
    memorized_epoch: int | None  # first epoch after which the stage's set was 100% (if checked)
    padding_fraction: float  # share of computed positions that were padding, mean over epochs
    tokens: int  # tokens processed (padding excluded)
    layout: str  # packed (one row per micro-batch) or padded
    seconds: float  # training seconds, the run before a stop included (resume)
    log: list[dict[str, Any]] = field(default_factory=list)  # one row per optimizer step
    seconds_before_resume: float = 0.0  # of `seconds`, those spent before the stop it resumed

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("log")
        for timing in ("seconds", "seconds_before_resume"):
            d.pop(timing)  # timings live apart from metrics, which must be reproducible
        return d


@dataclass
class StageContext:
    """What callbacks see of a running stage."""

    model: Any  # as prepared by accelerate (unwrap with accelerator.unwrap_model)
    accelerator: Any
    fmt: Formatter
    cfg: TrainConfig
    optimizer: Any
    scheduler: Any
    rule: StopRule
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (1-based)
    log: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0  # tokens processed so far (padding excluded)
    position: int = 0  # batches of `epoch` finished (the data order is a function of seed, epoch)
    batch_ids: list[str] = field(default_factory=list)  # example ids of the current step's batch
    batch_items: list[Encoded] = field(default_factory=list)  # the step's global batch, encoded
    micro: MicroStep | None = None  # the micro-batch being trained (set before `extra_loss`)
    grad_norm: torch.Tensor | None = None  # the step's total gradient norm, before clipping
    micro_weight: float = 1.0  # 0 for a pass FSDP runs only to keep the processes in step
    resume: ResumePoint | None = None  # set in on_stage_start by a callback that restores a stage
    started: float = field(default_factory=time.perf_counter)  # when this process began the stage

    def seconds(self) -> float:
        """Training seconds of the stage so far, those before a stop it resumed included."""
        before = self.resume.seconds if self.resume else 0.0
        return before + time.perf_counter() - self.started


@dataclass
class ResumePoint:
    """Where a restored stage continues: the loop skips the first `position` batches of
    `epoch` and carries its running totals on. Model, optimizer, scheduler, stop rule, `ctx.step`
    and `ctx.log` are restored by the callback itself."""

    epoch: int
    position: int
    tokens: int
    memorized_epoch: int | None
    loss: float
    seconds: float = 0.0  # training seconds before the stop (0 from a checkpoint without them)


class StageCallback:
    """Extension points of the stage loop; every method is optional. Regularizers, retention
    curves and checkpointing plug in here instead of growing the loop."""

    def on_stage_start(self, ctx: StageContext) -> None: ...

    def extra_loss(self, ctx: StageContext, items: list[Encoded],
                   share: float) -> torch.Tensor | None:
        """A term added to a micro-batch's loss before backward. `share` is the micro-batch's
        fraction of this process's batch: a per-step penalty P should return P * share (a
        process with no items of the step is called once with `items=[]` and share 1).
        A per-token term should sum over `ctx.micro`'s positions and divide by its count over
        the whole step (`ctx.batch_items`), times the process count (DDP averages gradients),
        as the answer loss does. `ctx.micro` holds the micro-batch's logits at its targets."""
        return None

    def on_before_optimizer_step(self, ctx: StageContext) -> None:
        """Gradients of the step are complete (and clipped) here."""

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        """After each optimizer step; `row` is the step's log row (add keys to record more)."""

    def on_epoch_end(self, ctx: StageContext) -> None: ...

    def on_stage_end(self, ctx: StageContext) -> None: ...


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:  # the fused kernel: ~5x faster steps on CPU (0.15 s vs 0.7 s for 135M parameters)
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warm-up for `warmup_fraction` of the planned steps, then cosine decay to 0. The
    plan is the most epochs the stop rule allows (early stopping ends mid-schedule)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(cfg.warmup_fraction,
                                                                   total_steps), total_steps)


def warmup_steps(fraction: float, total_steps: int) -> int:
    """ceil(fraction x steps), as the reference code (`math.ceil(total * warmup_ratio)`): a
    64-step stage at 5% warms up for 4 steps (3.2 rounded up), not 3."""
    return math.ceil(fraction * total_steps)


@dataclass
class MicroStep:
    """A micro-batch's forward: its items, the model batch, and the logits at its target
    positions (with gradient), for callbacks that add terms on the same positions."""

    items: list[Encoded]
    batch: ModelBatch
    logits: torch.Tensor  # [n_targets, vocab]
    gold: torch.Tensor  # [n_targets]
    owner: torch.Tensor  # [n_targets]: index into `items`


def forward_targets(model, items: list[Encoded], pad_id: int, device, pack: bool = False,
                    pack_width: int | None = None) -> MicroStep:
    batch = make_batch(items, pad_id, pack, pack_width).to(device)
    logits, gold, owner = target_logits(model, batch)
    return MicroStep(items, batch, logits, gold, owner)


def step_loss(micro: MicroStep) -> tuple[torch.Tensor, int, int]:
    """Summed token cross-entropy over every labelled token (all assistant turns), the number
    of those tokens, and the argmax hits among them. Prompt and padding never enter the loss."""
    picked = micro.logits.float()  # [n_targets, vocab]
    loss_sum = F.cross_entropy(picked, micro.gold, reduction="sum")
    hits = int((picked.argmax(-1) == micro.gold).sum())
    return loss_sum, int(micro.gold.numel()), hits


def batch_loss(model, items: list[Encoded], pad_id: int, device, pack: bool = False
               ) -> tuple[torch.Tensor, int, int]:
    """`step_loss` of one forward over `items`."""
    return step_loss(forward_targets(model, items, pad_id, device, pack))



# --------------------------------------------------------------------------------------------
# A stage's items, tokenised once


@dataclass
class StageItems:
    encoded: list[Encoded]
    groups: list[int]  # component of each item (0 = the stage's own set)
    lengths: list[int]

    @classmethod
    def build(cls, fmt: Formatter, examples: list[Example], groups: Sequence[int] | None,
              label_padding: str) -> StageItems:
        encoded = [fmt.encode(e) for e in examples]
        if label_padding == "reference":
            encoded = reference_label_padding(encoded, fmt.eos_id)
        groups = list(groups) if groups is not None else [0] * len(encoded)
        if len(groups) != len(encoded):
            raise ValueError("one group per example")
        return cls(encoded, groups, [len(e) for e in encoded])


def reference_label_padding(items: list[Encoded], eos_id: int) -> list[Encoded]:
    """What the paper's reference code trains on (`train.label_padding: reference`): every item
    right-padded to the longest item of the whole stage with the end-of-sequence id, and the
    padding LABELLED with that id (its pad id is eos, and it pads labels with the pad id instead
    of -100). In a REMIX stage a 34-token fact then carries 100+ labelled eos tokens, and facts
    are a few percent of the loss. The padding is attended, as there (right padding: real tokens
    never see it)."""
    width = max(len(e) for e in items)
    return [Encoded(e.id, e.input_ids + [eos_id] * (width - len(e)),
                    e.labels + [eos_id] * (width - len(e)), e.prompt_len) for e in items]


def choose_layout(model, cfg: TrainConfig) -> bool:
    """True: pack each micro-batch into one row. Falls back to padding, with a log line, where
    the model's attention does not keep packed items apart."""
    if not cfg.packing:
        return False
    if packing_supported(model):
        return True
    log.warning("packing: %s does not keep packed items apart (its attention ignores packed "
                "position_ids); padding each micro-batch instead", type(model).__name__)
    return False


def layout_padding(lengths: Sequence[int], batches: list[list[int]], cfg: TrainConfig,
                   pack: bool) -> float:
    """Share of the computed positions that are padding, as the micro-batches are laid out
    (one process; other process counts split the same batches further)."""
    micro = [m for b in batches for m in split_micro(b, cfg.grad_accum)]
    if not pack:
        return padding_fraction(lengths, micro)
    real = padded = 0
    for m in micro:
        rows = pack_rows([lengths[i] for i in m], cfg.pack_width)
        spans = [sum(lengths[m[i]] for i in r) for r in rows]
        real, padded = real + sum(spans), padded + max(spans) * len(spans)
    return 1 - real / padded if padded else 0.0


# --------------------------------------------------------------------------------------------
# The stage loop


def train_stage(
    model,
    accelerator,
    fmt: Formatter,
    examples: list[Example],
    cfg: TrainConfig,
    seed: int,
    memorize_check: list[Example] | None = None,
    eval_cfg: EvalConfig | None = None,
    desc: str = "train",
    progress: bool = True,
    callbacks: list[StageCallback] | None = None,
    groups: Sequence[int] | None = None,
) -> StageResult:
    """Train `model` (already `accelerator.prepare`d) on `examples` until the stop rule says so.

    `groups[i]` names the mixture component of example i (0 = the stage's own set; default: one
    component). `memorize_check` is the set that `until_memorized` watches, scored as the
    evaluation scores it (`eval_cfg.match`): the stage's own set (default: `examples`)."""
    start = time.perf_counter()
    data = StageItems.build(fmt, examples, groups, cfg.label_padding)  # tokenised once
    ctx, pack = setup_stage(model, accelerator, fmt, cfg, len(data.encoded))
    ctx.started = start
    run = _Run(ctx, data, seed, pack, callbacks or [], progress, desc)
    check = memorize_check if memorize_check is not None else examples
    run.run_epochs(check, eval_cfg or EvalConfig())
    accelerator.free_memory(ctx.optimizer, ctx.scheduler)  # drop accelerate's references to them
    return run.result()


def setup_stage(model, accelerator, fmt: Formatter, cfg: TrainConfig, n_items: int
                ) -> tuple[StageContext, bool]:
    """The stage's context (stop rule, optimizer and schedule over the most epochs the rule
    allows, prepared for the process layout) and whether micro-batches are packed."""
    rule = StopRule(cfg.stop)
    steps_per_epoch = math.ceil(n_items / cfg.batch_size)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * rule.max_epochs)
    optimizer, scheduler = dist.prepare_training(accelerator, optimizer, scheduler)
    pack = choose_layout(accelerator.unwrap_model(model), cfg)
    return StageContext(model, accelerator, fmt, cfg, optimizer, scheduler, rule), pack


class _Run:
    """The mutable state of one `train_stage` call and its steps, in the order they run."""

    def __init__(self, ctx: StageContext, data: StageItems, seed: int, pack: bool,
                 callbacks: list[StageCallback], progress: bool, desc: str):
        self.ctx, self.data, self.seed, self.pack = ctx, data, seed, pack
        self.callbacks, self.progress, self.desc = callbacks, progress, desc
        self.cfg = ctx.cfg
        self.pad_id = ctx.fmt.tok.pad_token_id
        self.pad_fracs: list[float] = []
        self.loss = float("nan")
        self.memorized_epoch: int | None = None
        self.em: float | None = None
        self.skip = 0  # batches of the first epoch already done (resume)
        self.grad_norm = float("nan")
        self.sharded = dist.is_sharded(ctx.model)

    def batches(self, epoch: int) -> list[list[int]]:
        return stage_batches(self.cfg.batching, self.data.lengths, self.data.groups,
                             self.cfg.batch_size, self.seed, epoch)

    def restore(self) -> int:
        """The first epoch to run: 1, or where a restored checkpoint left off."""
        resume = self.ctx.resume
        if resume is None:
            return 1
        self.ctx.tokens, self.memorized_epoch = resume.tokens, resume.memorized_epoch
        self.loss, self.skip = resume.loss, resume.position
        self.pad_fracs = [layout_padding(self.data.lengths, self.batches(e), self.cfg, self.pack)
                          for e in range(1, resume.epoch)]
        return resume.epoch

    def run_epochs(self, check: list[Example], eval_cfg: EvalConfig) -> None:
        """Epochs until the stop rule says so, from the start or from a restored point."""
        ctx, rule = self.ctx, self.ctx.rule
        ctx.model.train()
        for cb in self.callbacks:
            cb.on_stage_start(ctx)
        first_epoch = self.restore()
        last_epoch = first_epoch - 1 if rule.state.stopped else rule.max_epochs
        for epoch in range(first_epoch, last_epoch + 1):
            self.epoch(epoch)
            if rule.state.stopped:
                break
            if rule.checks_memorization and check:
                self.check_memorization(epoch, check, eval_cfg)
            for cb in self.callbacks:
                cb.on_epoch_end(ctx)
            if rule.after_epoch(epoch, self.em):
                break
        for cb in self.callbacks:
            cb.on_stage_end(ctx)

    def result(self) -> StageResult:
        ctx = self.ctx
        return StageResult(
            epochs=ctx.log[-1]["epoch"] if ctx.log else 0, steps=ctx.step,
            stop_reason=ctx.rule.state.reason, final_loss=self.loss,
            memorized_epoch=self.memorized_epoch,
            padding_fraction=sum(self.pad_fracs) / max(len(self.pad_fracs), 1),
            tokens=ctx.tokens, layout="packed" if self.pack else "padded",
            seconds=ctx.seconds(), log=ctx.log,
            seconds_before_resume=ctx.resume.seconds if ctx.resume else 0.0,
        )

    def epoch(self, epoch: int) -> None:
        ctx = self.ctx
        ctx.epoch = epoch
        batches = self.batches(epoch)
        self.pad_fracs.append(layout_padding(self.data.lengths, batches, self.cfg, self.pack))
        skip, self.skip = self.skip, 0
        ctx.position = skip
        bar = tqdm(batches[skip:], desc=f"{self.desc} epoch {epoch}/{ctx.rule.max_epochs}",
                   leave=False, disable=not (self.progress and ctx.accelerator.is_main_process),
                   mininterval=0.5, dynamic_ncols=True)
        for batch in bar:
            loss, tok_acc = self.step(batch)
            row = {"step": ctx.step, "epoch": epoch, "loss": loss, "tok_acc": tok_acc,
                   "lr": ctx.scheduler.get_last_lr()[0], "grad_norm": self.grad_norm}
            ctx.log.append(row)
            stop = ctx.rule.after_step(loss)  # before the callbacks: checkpoints see its counters
            for cb in self.callbacks:
                cb.on_step_end(ctx, row)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{tok_acc:.2f}",
                            **({"em": f"{self.em:.2f}"} if self.em is not None else {}))
            if stop:
                break
        bar.close()

    def step(self, batch: list[int]) -> tuple[float, float]:
        """One optimizer step on a global batch; returns its loss and token accuracy."""
        ctx = self.ctx
        # Every process sees the same global batch and takes its share; the loss is normalised
        # by the global number of answer tokens, so any process count or accumulation setting
        # computes the same gradient.
        ctx.batch_items = [self.data.encoded[i] for i in batch]
        ctx.batch_ids = [e.id for e in ctx.batch_items]
        n_tokens = sum(e.n_targets for e in ctx.batch_items)
        loss_total, hits_total = self.accumulate(batch, n_tokens)
        self.optimizer_step(batch)
        return self.global_stats(loss_total, hits_total, n_tokens)

    def accumulate(self, batch: list[int], n_tokens: int) -> tuple[float, int]:
        """Forward and backward over this process's share of `batch`, micro-batch by
        micro-batch; returns the summed loss and argmax hits of its real passes."""
        acc = self.ctx.accelerator
        world, rank = acc.num_processes, acc.process_index
        shard = batch[rank::world]
        micro = split_micro(shard, self.cfg.grad_accum)
        real = len(micro)
        if self.sharded:  # FSDP: as many passes as the busiest rank, the extra ones weigh 0
            micro = dist.pad_micro_batches(micro, batch, world, self.cfg.grad_accum)
        loss_total, hits_total = 0.0, 0
        for j, mb in enumerate(micro):
            weight = 1.0 if j < real else 0.0
            # per-step penalties are added once per process and step: by the real passes'
            # shares, or spread over the padding passes of a process that got no items
            share = len(mb) / len(shard) if weight else (1.0 / len(micro) if real == 0 else 0.0)
            loss_sum, hits = self.micro_pass(mb, weight, share, n_tokens,
                                             skip_sync=j < len(micro) - 1 and world > 1)
            if weight:
                loss_total += loss_sum.item()
                hits_total += hits
        self.ctx.micro, self.ctx.micro_weight = None, 1.0
        if not micro:  # more processes than items in this batch: join with the penalties only
            zero = sum(p.sum() for p in self.ctx.model.parameters()) * 0.0
            acc.backward(self.with_extra(zero, [], 1.0))
        return loss_total, hits_total

    def micro_pass(self, mb: list[int], weight: float, share: float, n_tokens: int,
                   skip_sync: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward of one micro-batch; its summed loss and argmax hits."""
        ctx, acc = self.ctx, self.ctx.accelerator
        with dist.no_sync(acc, ctx.model, skip=skip_sync):
            items = [self.data.encoded[i] for i in mb]
            ctx.micro = forward_targets(ctx.model, items, self.pad_id, acc.device, self.pack,
                                        self.cfg.pack_width)
            ctx.micro_weight = weight
            loss_sum, _, hits = step_loss(ctx.micro)
            # DDP and FSDP average gradients over processes: scale back up by `world`
            loss = loss_sum * acc.num_processes / n_tokens if weight else loss_sum * 0.0
            acc.backward(self.with_extra(loss, items, share))
        return loss_sum, hits

    def optimizer_step(self, batch: list[int]) -> None:
        """Clip (measuring the gradient norm), step optimizer and schedule, count the step."""
        ctx, acc = self.ctx, self.ctx.accelerator
        # the total gradient norm, before clipping (clipping at infinity measures it without
        # clipping); FiniteGuard reads it: non-finite iff some gradient is (one pass over the
        # gradients instead of an isfinite per tensor, 0.17 s of a 0.8 s SmolLM2 step)
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        ctx.grad_norm = acc.clip_grad_norm_(ctx.model.parameters(), clip)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(ctx)
        ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.step += 1
        ctx.position += 1
        ctx.tokens += sum(self.data.lengths[i] for i in batch)
        self.grad_norm = float(dist.full(ctx.grad_norm))

    def global_stats(self, loss_total: float, hits_total: int, n_tokens: int
                     ) -> tuple[float, float]:
        """The step's loss and token accuracy over every process's passes."""
        acc = self.ctx.accelerator
        stats = torch.tensor([loss_total, hits_total], dtype=torch.float64, device=acc.device)
        stats = acc.reduce(stats, reduction="sum") if acc.num_processes > 1 else stats
        self.loss = stats[0].item() / n_tokens
        return self.loss, stats[1].item() / n_tokens

    def with_extra(self, loss: torch.Tensor, items: list[Encoded], share: float) -> torch.Tensor:
        for cb in self.callbacks:
            extra = cb.extra_loss(self.ctx, items, share)
            if extra is not None:
                loss = loss + extra
        return loss

    def check_memorization(self, epoch: int, check: list[Example], eval_cfg: EvalConfig) -> None:
        """Exact match on the stage's own set, scored as the evaluation scores it."""
        ctx = self.ctx
        preds = evaluate_examples(ctx.accelerator.unwrap_model(ctx.model), ctx.fmt, check,
                                  mode=eval_cfg.mode, batch_size=eval_cfg.batch_size,
                                  max_new_tokens=eval_cfg.max_new_tokens, match=eval_cfg.match)
        self.em = summarize(preds)["accuracy"]
        ctx.log[-1]["memorized_accuracy"] = self.em
        if self.em >= 1.0 and self.memorized_epoch is None:
            self.memorized_epoch = epoch
