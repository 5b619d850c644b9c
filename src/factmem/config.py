"""Typed experiment configuration: YAML -> dataclasses, dotted overrides, variants, validation.

Every field carries a docstring (the string literal under it). Loading checks everything before
any work starts: unknown keys (with the nearest valid one), wrong types, out-of-range values,
unknown sources and set names. Errors are one line naming the file and the dotted key.

Variants are dotted overrides of the raw YAML, applied before parsing, so `train.lr` in a variant
reaches every stage and a variant can change anything a config can say.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from factmem.data import get_source
from factmem.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Sections


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
    """e.g. sdpa, eager, flash_attention_2; default sdpa (on 2 CPU cores it trains SmolLM2
    ~15% faster than eager: benchmarks/RESULTS.md)"""

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
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                               "o_proj"])
    """module names (suffixes) that get an adapter, e.g. q_proj, v_proj, up_proj"""
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
        if not self.target_modules:
            raise ValueError("target_modules: give at least one module name")


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
    save_checkpoints: bool = False
    """save the model (safetensors) after every stage, for analysis"""
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


# --------------------------------------------------------------------------------------------
# Generic dict -> dataclass parsing with paths in every message


class _Invalid(ValueError):
    def __init__(self, path: str, msg: str):
        super().__init__(f"{path}: {msg}" if path else msg)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except _Invalid as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _Invalid(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _Invalid(path, f"{value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, _join(path, i)) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Invalid(path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(path, f"expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, _join(path, k)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # `.nan`, `.inf`, `1e999`: no setting means anything there
            raise _Invalid(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in factmem, not input


def _unknown_key(path: str, key: str, valid: list[str]) -> _Invalid:
    near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return _Invalid(_join(path, key), f"unknown key; {hint}valid keys: {', '.join(valid)}")


def parse(cls: type, data: Any, path: str = "", extra_ok: bool = False) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and the class's own checks."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Invalid(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "params"}
    if not extra_ok:
        for key in data:
            if key not in fields:
                raise _unknown_key(path, key, list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(path, f"missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, _Invalid):
            raise
        msg = str(e)
        head, _, rest = msg.partition(": ")
        if head in fields and rest:  # "lr: must be > 0" -> "train.lr: must be > 0"
            raise _Invalid(_join(path, head), rest) from None
        raise _Invalid(path, msg) from None


def _parse_with_source_params(cls: type, data: Any, path: str, common: tuple[str, ...]) -> Any:
    """Sets and mix components: common keys plus the named source's own parameters, flat."""
    if not isinstance(data, dict):
        raise _Invalid(path, f"expected a mapping with a `source` key, got {data!r}")
    if "source" not in data:
        raise _Invalid(path, "missing required key 'source'")
    try:
        spec = get_source(str(data["source"]))
    except ConfigError as e:
        raise _Invalid(_join(path, "source"), str(e)) from None
    own = {k: v for k, v in data.items() if k not in common}
    param_keys = [f.name for f in dataclasses.fields(spec.params)]
    for key in own:
        if key not in param_keys:
            raise _unknown_key(path, key, [*common, *param_keys])
    obj = parse(cls, {k: v for k, v in data.items() if k in common}, path)
    obj.params = parse(spec.params, own, path)
    return obj


def _parse_experiment(raw: dict[str, Any], path: str = "") -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    sets_raw = raw.pop("sets", None)
    stages_raw = raw.pop("stages", None)
    if not isinstance(sets_raw, dict) or not sets_raw:
        raise _Invalid("sets", "give at least one named set, e.g. sets: {kvr_a: {source: kvr, n: 32}}")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise _Invalid("stages", "give a list of at least one stage, e.g. [{name: s1, set: kvr_a}]")
    set_common = ("source", "n", "offset", "seed", "max_tokens", "filter", "filter_shots", "keep")
    sets = {str(k): _parse_with_source_params(SetConfig, v, f"sets.{k}", set_common)
            for k, v in sets_raw.items()}
    for name, s in sets.items():
        _check_selection(s.n, s.offset, f"sets.{name}")

    train_raw = raw.get("train") or {}
    parse(TrainConfig, train_raw, "train")  # errors in the shared settings name `train.`
    stages = []
    for i, st in enumerate(stages_raw):
        p = f"stages.{i}"
        if not isinstance(st, dict):
            raise _Invalid(p, f"expected a mapping, got {st!r}")
        st = dict(st)
        mix = [_parse_with_source_params(MixConfig, m, f"{p}.mix.{j}",
                                         ("source", "ratio", "count", "offset"))
               for j, m in enumerate(_as_list(st.pop("mix", []), f"{p}.mix"))]
        merged_train = _deep_merge(train_raw, st.pop("train", None) or {})
        stage = parse(StageConfig, {**st, "train": {}}, p)
        stage.mix = mix
        stage.train = parse(TrainConfig, merged_train, f"{p}.train")
        stages.append(stage)
    raw["stages"] = []
    cfg = parse(ExperimentConfig, {**raw, "sets": {}, "stages": []}, path)
    cfg.sets, cfg.stages = sets, stages
    if not cfg.track:
        cfg.track = list(dict.fromkeys(x for s in stages for x in (s.set, *s.joint)))
    _check_references(cfg)
    _check_run_name(cfg.name)
    return cfg


def _check_run_name(name: str) -> None:
    """The run directory is output.dir/name: a name must not lead anywhere else."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise _Invalid("name", f"{name!r} is not a plain directory name (no '/', '..' or "
                       "absolute paths: the run directory must stay inside output.dir)")


def parse_set(raw: dict[str, Any], where: str = "set") -> SetConfig:
    """One set from a flat mapping (`{source: kvr, n: 10, length: 8}`), as the CLI builds it."""
    try:
        cfg = _parse_with_source_params(SetConfig, raw, "", ("source", "n", "offset", "seed"))
        _check_selection(cfg.n, cfg.offset, "")
    except _Invalid as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _check_selection(n: int | None, offset: int, path: str) -> None:
    if n is not None and n < 1:
        raise _Invalid(_join(path, "n"), f"must be >= 1, got {n} (an empty set cannot be trained)")
    if offset < 0:
        raise _Invalid(_join(path, "offset"), f"must be >= 0, got {offset}")


def _check_references(cfg: ExperimentConfig) -> None:
    names = list(cfg.sets)
    seen_stages: list[str] = []
    for i, st in enumerate(cfg.stages):
        p = f"stages.{i}"
        if st.name in seen_stages:
            raise _Invalid(f"{p}.name", f"duplicate stage name {st.name!r}")
        if st.set not in cfg.sets:
            raise _unknown_ref(f"{p}.set", st.set, names, "set")
        for j, m in enumerate(st.mix):
            _check_amount(m.ratio, m.count, f"{p}.mix.{j}")
            _check_selection(1, m.offset, f"{p}.mix.{j}")
        for j, r in enumerate(st.replay):
            q = f"{p}.replay.{j}"
            _check_amount(r.ratio, r.count, q)
            if (r.stage is None) == (r.set is None):
                raise _Invalid(q, "give exactly one of `stage` (an earlier stage) or `set`")
            if r.stage is not None and r.stage not in seen_stages:
                raise _unknown_ref(f"{q}.stage", r.stage, seen_stages, "earlier stage")
            if r.set is not None and r.set not in cfg.sets:
                raise _unknown_ref(f"{q}.set", r.set, names, "set")
        _check_baselines(cfg, i)
        seen_stages.append(st.name)
    for j, t in enumerate(cfg.track):
        if t not in cfg.sets:
            raise _unknown_ref(f"track.{j}", t, names, "set")
    for j, t in enumerate(cfg.eval.retention_sets or []):
        if t not in cfg.track:
            raise _unknown_ref(f"eval.retention_sets.{j}", t, cfg.track, "tracked set")
    for j, t in enumerate(cfg.eval.retention_stages or []):
        if t not in seen_stages:
            raise _unknown_ref(f"eval.retention_stages.{j}", t, seen_stages, "stage")
    if not cfg.seeds:
        raise _Invalid("seeds", "give at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise _Invalid("seeds", f"duplicate seeds in {cfg.seeds}")


def _check_baselines(cfg: ExperimentConfig, i: int) -> None:
    """Stage options of the continual-learning baselines that depend on other stages."""
    st, p = cfg.stages[i], f"stages.{i}"
    for j, name in enumerate(st.joint):
        if name not in cfg.sets:
            raise _unknown_ref(f"{p}.joint.{j}", name, list(cfg.sets), "set")
    for j, r in enumerate(st.regularizers):
        if r.kind == "ewc" and i == 0:
            raise _Invalid(f"{p}.regularizers.{j}", "ewc needs an earlier stage (its Fisher is "
                           "estimated on the previous stage's set)")
        if r.kind == "kl" and r.on == "mix" and not st.mix:
            raise _Invalid(f"{p}.regularizers.{j}.on", "`mix` needs mix components in this stage")
    prev = cfg.stages[i - 1] if i > 0 else None
    if prev is not None and prev.lora is not None and not prev.lora.merge and st.lora is not None:
        if to_dict(st.lora) != to_dict(prev.lora):
            raise _Invalid(f"{p}.lora", f"stage {prev.name!r} keeps its adapter (merge: false); "
                           "a stage that goes on training it needs the same lora settings")


def _check_amount(ratio: float | None, count: int | None, path: str) -> None:
    if (ratio is None) == (count is None):
        raise _Invalid(path, "give exactly one of `ratio` or `count`")
    if ratio is not None and ratio < 0:
        raise _Invalid(_join(path, "ratio"), f"must be >= 0, got {ratio}")
    if count is not None and count < 0:
        raise _Invalid(_join(path, "count"), f"must be >= 0, got {count}")


def _unknown_ref(path: str, name: str, valid: list[str], what: str) -> _Invalid:
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return _Invalid(path, f"no {what} named {name!r}{hint}; valid: {', '.join(valid) or 'none'}")


def _as_list(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list, got {value!r}")
    return value


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base.get(k), v) if k in base else v
        return out
    return copy.deepcopy(over)


# --------------------------------------------------------------------------------------------
# Dotted overrides (`--set train.lr=1e-5`, variants) on the raw YAML


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-5` -> ("train.lr", 1e-05); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
    key, value = text.split("=", 1)
    try:
        return key.strip(), load_yaml_text(value) if value.strip() else None
    except DuplicateKeyError as e:
        raise ConfigError(f"--set {text!r}: {e}") from None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in the raw config. List items are addressed by index or, for stages, by
    name (`stages.stage2.mix`)."""
    parts = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
                return
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise _Invalid(where, f"cannot set a key inside {node!r}")


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise _Invalid(where, f"index out of range (the list has {len(node)} items)")
        return idx
    names = [item.get("name") for item in node if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise _unknown_ref(where, part, [n for n in names if n], "list item")


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Experiment:
    """A whole experiment: the raw config and its resolved variants."""

    source: str  # where the config came from (file path or "<dict>")
    raw: dict[str, Any]
    variants: dict[str, ExperimentConfig]

    @property
    def name(self) -> str:
        return next(iter(self.variants.values())).name

    @property
    def base(self) -> ExperimentConfig:
        return next(iter(self.variants.values()))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (plain YAML lets the last one silently win)."""

    def __init__(self, key: Any, first_line: int, line: int):
        where = f"lines {first_line} and {line}" if line != first_line else f"twice on line {line}"
        super().__init__(f"duplicate key {key!r} ({where}); keep one of them")
        self.key, self.first_line, self.line = key, first_line, line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # unhashable key: SafeLoader reports it below
                pass
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans: only true/false. YAML 1.1 (PyYAML's default) also reads on/off/yes/no as
# booleans, keys included, so `{kind: kl, on: mix}` became `{kind: kl, True: mix}`.
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml_text(text: str) -> Any:
    """YAML -> Python with duplicate keys refused (config files and `--set` values)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = load_yaml_text(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    return experiment_from_dict(read_yaml(path), overrides, source=str(path))


def experiment_from_dict(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>"
) -> Experiment:
    raw = copy.deepcopy(raw)
    try:
        for text in overrides:
            apply_override(raw, *parse_override(text))
        raw.setdefault("name", Path(source).stem if source != "<dict>" else "experiment")
        base = _parse_experiment(raw)  # validates the config as written
        variants: dict[str, ExperimentConfig] = {}
        for name, spec in expand_variants(base.variants).items():
            vraw = copy.deepcopy(raw)
            for key, value in spec.items():
                try:
                    apply_override(vraw, key, value)
                except _Invalid as e:
                    raise _Invalid(f"variants.{name}", str(e)) from None
            try:
                variants[name] = _parse_experiment(vraw)
            except _Invalid as e:
                raise _Invalid(f"variants.{name}", str(e)) from None
        for name, v in variants.items():
            if v.baseline is not None and v.baseline not in variants:
                where = "baseline" if v.baseline == base.baseline else f"variants.{name}.baseline"
                raise _unknown_ref(where, v.baseline, list(variants), "variant")
    except _Invalid as e:
        raise ConfigError(f"{source}: {e}") from None
    return Experiment(source, raw, variants)


def expand_variants(variants: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: overrides}; a `grid` entry expands into one variant per combination."""
    if not variants:
        return {"default": {}}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in variants.items():
        spec = dict(spec or {})
        if not isinstance(spec, dict):
            raise _Invalid(f"variants.{name}", "expected a mapping of dotted overrides")
        grid = spec.pop("grid", None)
        if grid is None:
            out[str(name)] = spec
            continue
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise _Invalid(f"variants.{name}.grid", "expected {dotted.key: [value, ...]}")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
            out[f"{name}[{label}]"] = {**spec, **dict(zip(keys, combo))}
    return out


def to_dict(obj: Any) -> Any:
    """Resolved config -> plain data (sets and mix components written flat, as in YAML)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "params":
                out.update(to_dict(value) if value is not None else {})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
