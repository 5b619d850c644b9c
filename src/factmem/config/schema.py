"""The experiment schema: one dataclass per config section, one docstring per field.

Each class checks its own fields in `__post_init__` (a ValueError whose message starts with
the field name, so the loader can prefix the dotted path). Checks that span sections (a stage
naming a set, replay of an earlier stage) live in `checks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """embedded model name, Hugging Face hub id, or local directory"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on a GPU that supports it, float32 otherwise"""
    system_prompt: str | None = None
    """system turn for every example; null keeps chat templates from injecting their default"""
    template: Literal["auto", "plain", "reference"] = "auto"
    """how examples become text: auto = the tokenizer's chat template (plain when it has none);
    plain = `User: ...\nAssistant: ...`; reference = the paper's reference code,
    `<|user|>\n...\n<|assistant|>\n...` as plain text for every model"""
    max_length: int = 2048
    """longest tokenised example accepted (longer ones are an error, never truncated)"""
    trust_remote_code: bool = False
    """run code shipped with a hub model (only if you trust it)"""
    attn_implementation: str | None = None
    """e.g. sdpa, eager, flash_attention_2; default: sdpa where the family supports it (on 2
    CPU cores it trains SmolLM2 ~15% faster than eager: benchmarks/RESULTS.md), eager where it
    does not (Gemma2, whose attention soft-capping SDPA cannot compute)"""
    architecture: str | None = None
    """a config.json (or a directory holding one) with the model's architecture, read by
    `--dry-run`'s memory plan instead of the model's own config: plans a hub model without the
    hub (configs/models/ holds published ones); training always uses the model's own"""

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError("max_length: must be >= 8")


@dataclass
class StopConfig:
    rule: Literal["epochs", "loss_below", "until_memorized"] = "epochs"
    """epochs: train exactly `epochs`; loss_below: stop once the loss stays under `threshold`
    for `patience` steps; until_memorized: stop once exact match is 100% on the stage's set"""
    epochs: int = 20
    """the number of epochs (rule epochs) or the most epochs (the other rules)"""
    threshold: float = 1e-4
    """loss_below: the loss threshold"""
    patience: int = 10
    """loss_below: optimizer steps with the loss under the threshold before the stage stops"""
    count: Literal["consecutive", "cumulative"] = "consecutive"
    """loss_below: `consecutive` steps (a step above the threshold resets the count), or
    `cumulative` (every low-loss step counts and the count never resets: the paper's reference
    code, configs/paper/*.yaml)"""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs: must be >= 1")
        if self.threshold <= 0:
            raise ValueError("threshold: must be > 0")
        if self.patience < 1:
            raise ValueError("patience: must be >= 1")


@dataclass
class TrainConfig:
    lr: float = 5e-5
    """peak learning rate"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_fraction: float = 0.05
    """fraction of the planned optimizer steps spent warming up (then cosine decay to 0)"""
    grad_clip: float | None = 1.0
    """max gradient norm; null disables clipping"""
    batch_size: int = 32
    """examples per optimizer step (global: across processes and accumulation)"""
    grad_accum: int = 1
    """micro-batches per optimizer step; batch_size must divide evenly"""
    batching: Literal["mixed", "length_grouped"] = "mixed"
    """mixed: every batch carries the stage's mixture (each component in proportion to its
    size, as the paper's uniform shuffle); length_grouped: items of similar length share a
    batch, which keeps facts and long mixed passages apart and so CHANGES what mixing does"""
    packing: bool = True
    """pack each micro-batch's items end to end into rows (position_ids restart per item,
    attention stays inside an item): next to no padding; false pads every item to the
    micro-batch's longest"""
    pack_width: int | None = None
    """packed rows hold at most this many tokens (items are never split); null: as many as the
    micro-batch's longest item, so no row is wider than a padded row would be (attention costs
    the square of the row's length); with flash attention, whose cost does not, a large value
    such as 65536 packs each micro-batch into one row"""
    label_padding: Literal["ignore", "reference"] = "ignore"
    """ignore: only assistant tokens carry loss; reference: the paper's reference code, every
    item padded to the stage's longest with labelled end-of-sequence tokens (an ablation: it
    dilutes the facts' share of the loss)"""
    stop: StopConfig = field(default_factory=StopConfig)
    """when the stage ends"""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {list(self.betas)}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("eps must be > 0 and weight_decay >= 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("grad_clip: must be > 0 or null")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.pack_width is not None and self.pack_width < 8:
            raise ValueError(f"pack_width: must be >= 8 or null, got {self.pack_width}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                             f"({self.grad_accum})")


@dataclass
class EvalConfig:
    mode: Literal["fast", "generate"] = "fast"
    """fast: greedy exact match decided from one teacher-forced pass; generate: model.generate"""
    batch_size: int = 32
    """examples per evaluation forward pass"""
    max_new_tokens: int = 64
    """generate mode: tokens generated past the prompt (at least the gold length + 1 is used)"""
    match: Literal["exact", "contains"] = "exact"
    """exact: normalised prediction equals an answer; contains: an answer occurs in it"""
    retention_every: int | None = None
    """retention curves: evaluate the tracked sets (fast mode) every N optimizer steps of every
    stage and write per-fact rows to the stage's retention.jsonl (null: off)"""
    retention_sets: list[str] | None = None
    """retention curves of these tracked sets only (null: every tracked set); each point costs
    one teacher-forced pass per set"""
    retention_stages: list[str] | None = None
    """retention curves during these stages only (null: every stage)"""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens: must be >= 1")
        if self.retention_every is not None and self.retention_every < 1:
            raise ValueError("retention_every: must be >= 1 (or null to turn it off)")


@dataclass
class SetConfig:
    """A named data set: a source with its selection (n, offset, seed) and own parameters."""

    source: str
    """registered source name (kvr, random-words, generic, jsonl, ...)"""
    n: int | None = None
    """number of items (required for generated sources; default for files: all)"""
    offset: int = 0
    """index of the first item: disjoint A/B copies of one source use different offsets"""
    seed: int = 0
    """data seed (which items a generated source produces), independent of the training seed"""
    max_tokens: int | None = None
    """drop items longer than this many tokens (formatted for the model); the count dropped is
    logged and written to the run directory's data.json"""
    filter: Literal["none", "unknown_to_model"] = "none"
    """unknown_to_model: keep only the facts the base model gets wrong few-shot (yet-to-learn)"""
    filter_shots: int = 4
    """filter: few-shot examples in the prompt, taken from items just after the selection"""
    keep: int | None = None
    """after max_tokens and filter: keep the first `keep` items (the paper keeps 2,000
    yet-to-learn facts per set); fewer left is an error, never a smaller set"""
    params: Any = None
    """the source's own parameters (written flat beside `source` in YAML)"""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 8:
            raise ValueError(f"max_tokens: must be >= 8, got {self.max_tokens}")
        if self.filter_shots < 0:
            raise ValueError(f"filter_shots: must be >= 0, got {self.filter_shots}")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep: must be >= 1, got {self.keep}")


@dataclass
class MixConfig:
    """A REMIX component: items of a source added to a stage, `ratio` x the main set's size."""

    source: str
    """registered source name, e.g. random-words or generic"""
    ratio: float | None = None
    """items added = round(ratio x size of the stage's set)"""
    count: int | None = None
    """items added, as a number (instead of ratio)"""
    offset: int = 0
    """index of the first item taken from the source"""
    params: Any = None
    """the source's own parameters (written flat beside `source` in YAML)"""


@dataclass
class ReplayConfig:
    """Replay: items of an earlier stage's set (or any named set) mixed into this stage."""

    stage: str | None = None
    """name of an earlier stage whose set is replayed"""
    set: str | None = None
    """or: the name of a set"""
    ratio: float | None = None
    """items replayed = round(ratio x size of this stage's set)"""
    count: int | None = None
    """items replayed, as a number (instead of ratio)"""


@dataclass
class RegularizerConfig:
    """A continual-learning penalty of a stage, anchored to the model as it enters the stage
    (the previous stage's result)."""

    kind: Literal["ewc", "l2", "kl"]
    """ewc: weight x sum F (theta - theta*)^2 with F the diagonal Fisher over the previous
    stage's factoids; l2: the same with F = 1; kl: distillation to the frozen previous model"""
    weight: float = 1.0
    """lambda: the penalty's weight against the answer loss"""
    temperature: float = 1.0
    """kl: softmax temperature of teacher and student (the KL is scaled by T^2)"""
    on: Literal["stage", "mix"] = "stage"
    """kl: distil on every item of the stage's batches (stage) or on its mixing items only (mix)"""
    normalize: bool = False
    """ewc: divide the Fisher by its mean, so `weight` is on the scale of the l2 weight"""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight: must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


@dataclass
class LoraConfig:
    """Train the stage through a LoRA adapter (PEFT) instead of the full weights."""

    rank: int = 8
    """adapter rank r"""
    alpha: float = 16.0
    """scaling numerator: the update is (alpha / r) B A"""
    dropout: float = 0.0
    """dropout on the adapter's input"""
    target_modules: list[str] | None = None
    """module names (suffixes) that get an adapter, e.g. q_proj, v_proj, up_proj; null: every
    linear projection of each decoder layer's attention block, found on the model (q_proj,
    k_proj, v_proj, o_proj on Llama; qkv_proj, o_proj on Phi-3; query_key_value, dense on
    GPT-NeoX)"""
    merge: bool = True
    """merge the adapter into the weights after the stage; false keeps it as an adapter, which a
    next stage with the same lora settings goes on training (a next stage without lora merges)"""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: give at least one module name, or null for the "
                             "attention projections")


@dataclass
class FreezeConfig:
    """Parameters kept fixed during a stage (trainable again in the next stage)."""

    embeddings: bool = False
    """freeze the input embeddings (and so a tied output layer)"""
    layers: list[int] = field(default_factory=list)
    """indices of decoder layers to freeze (0 = the first; negative counts from the last)"""


@dataclass
class StageConfig:
    name: str
    """stage name (used in the run directory and tables)"""
    set: str
    """name of the set this stage memorizes or learns (a key of `sets`)"""
    mix: list[MixConfig] = field(default_factory=list)
    """REMIX components mixed into this stage"""
    replay: list[ReplayConfig] = field(default_factory=list)
    """replay of earlier sets mixed into this stage"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """this stage's training settings: the top-level `train` with this stage's overrides"""
    regularizers: list[RegularizerConfig] = field(default_factory=list)
    """continual-learning penalties (ewc, l2, kl) toward the model this stage starts from"""
    lora: LoraConfig | None = None
    """train this stage through a LoRA adapter (null: full fine-tuning)"""
    freeze: FreezeConfig | None = None
    """parameters kept fixed in this stage"""
    joint: list[str] = field(default_factory=list)
    """more sets trained in full together with `set` (joint training of all sets at once,
    the upper-bound reference); memorization is checked on all of them"""


@dataclass
class OutputConfig:
    dir: str = "runs"
    """parent directory of run directories"""
    save_checkpoints: bool | list[str] = False
    """save the model (a Hugging Face directory) after every stage (true) or after the stages
    named (e.g. [stage2]), for the model-based analyses; set per variant to keep only those the
    analysis needs (`variants: {naive: {output.save_checkpoints: [stage2]}}`)"""
    save_predictions: bool = True
    """write per-example predictions (JSONL) for every tracked set after every stage"""
    checkpoint_every: int | None = 50
    """save a resumable in-stage checkpoint every N optimizer steps (null: only between stages;
    an interrupted stage then restarts from its beginning)"""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=list)
    """experiment trackers (accelerate's) that get per-step loss, learning rate and token
    accuracy, memorization checks, retention points and every stage's accuracy, one tracking run
    per variant and seed; e.g. [tensorboard] (written under RUN_DIR/tensorboard/)"""

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be >= 1 or null, got {self.checkpoint_every}")

    def saves_checkpoint(self, stage: str) -> bool:
        """Whether the model after the stage named `stage` is saved (save_checkpoints)."""
        if isinstance(self.save_checkpoints, bool):
            return self.save_checkpoints
        return stage in self.save_checkpoints


@dataclass
class ExperimentConfig:
    """One resolved variant of an experiment (variants and grids already applied)."""

    name: str
    """experiment name: the run directory is output.dir/name"""
    sets: dict[str, SetConfig]
    """named data sets"""
    stages: list[StageConfig]
    """training stages, in order"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """base model"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """training settings shared by all stages (a stage's `train` overrides single keys)"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation settings"""
    track: list[str] = field(default_factory=list)
    """sets evaluated before training and after every stage (default: every stage's set)"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """training seeds; results are reported as mean and standard deviation over them"""
    output: OutputConfig = field(default_factory=OutputConfig)
    """where and what to write"""
    variants: dict[str, Any] = field(default_factory=dict)
    """name -> dotted overrides ({} = the config as written); a `grid` key expands into
    one variant per combination, e.g. grid: {train.lr: [1e-5, 5e-5]}"""
    baseline: str | None = None
    """a variant every variant is compared with, fact by fact, after the last stage (paired
    differences with 95% CIs in comparison.md); a variant may name its own baseline"""
    compare_with: list[str] = field(default_factory=list)
    """further variants this one is compared with, beside its baseline, e.g. a non-factoid
    D_B against each factoid D_B (one comparison row per pair)"""


_NO_DEFAULT = object()


def default_at(path: str, cls: type = ExperimentConfig) -> Any:
    """The default of the field at dotted `path` of a resolved config (list indices and dict
    keys, such as stage numbers and set names, step into the element type), or _NO_DEFAULT.
    A run directory written before a field existed ran with that field's default."""
    import dataclasses
    import typing

    head, _, rest = path.partition(".")
    if not dataclasses.is_dataclass(cls):
        return _NO_DEFAULT
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return _NO_DEFAULT
    f = fields[head]
    if not rest:
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return _NO_DEFAULT
    hint = typing.get_type_hints(cls)[head]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, dict) and args:  # step over the index or key
        _, _, rest = rest.partition(".")
        hint = args[-1]
        if not rest:
            return _NO_DEFAULT
    inner = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
    return _NO_DEFAULT if inner is None else default_at(rest, inner)


def is_new_default(path: str, value: Any) -> bool:
    """Whether `value` at `path` is what a field that did not exist yet would have meant."""
    d = default_at(path)
    return d is not _NO_DEFAULT and d == value
