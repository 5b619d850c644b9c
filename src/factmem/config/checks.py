"""Checks across sections, run once the sections are parsed: names that must refer to something
(sets, earlier stages, tracked sets, variants), amounts given exactly one way, selections in
range, the options of the continual-learning baselines, and a run name that stays a name.
"""

from __future__ import annotations

from pathlib import Path

from factmem.config.coerce import _Invalid, _join, _unknown_ref, to_dict
from factmem.config.schema import ExperimentConfig
from factmem.data import SOURCES, get_source


def _check_run_name(name: str) -> None:
    """The run directory is output.dir/name: a name must not lead anywhere else."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise _Invalid("name", f"{name!r} is not a plain directory name (no '/', '..' or "
                       "absolute paths: the run directory must stay inside output.dir)")


def _check_selection(n: int | None, offset: int, path: str) -> None:
    if n is not None and n < 1:
        raise _Invalid(_join(path, "n"), f"must be >= 1, got {n} (an empty set cannot be trained)")
    if offset < 0:
        raise _Invalid(_join(path, "offset"), f"must be >= 0, got {offset}")


def _check_amount(ratio: float | None, count: int | None, path: str) -> None:
    if (ratio is None) == (count is None):
        raise _Invalid(path, "give exactly one of `ratio` or `count`")
    if ratio is not None and ratio < 0:
        raise _Invalid(_join(path, "ratio"), f"must be >= 0, got {ratio}")
    if count is not None and count < 0:
        raise _Invalid(_join(path, "count"), f"must be >= 0, got {count}")


def _check_references(cfg: ExperimentConfig) -> None:
    seen_stages: list[str] = []
    for i, st in enumerate(cfg.stages):
        _check_stage(cfg, i, seen_stages)
        _check_baselines(cfg, i)
        seen_stages.append(st.name)
    _check_tracking(cfg, seen_stages)
    _check_checkpoint_stages(cfg, seen_stages)
    if not cfg.seeds:
        raise _Invalid("seeds", "give at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise _Invalid("seeds", f"duplicate seeds in {cfg.seeds}")


def _check_stage(cfg: ExperimentConfig, i: int, seen_stages: list[str]) -> None:
    """Stage i's own name, set, mix components and replay (of stages before it)."""
    st, p, names = cfg.stages[i], f"stages.{i}", list(cfg.sets)
    if st.name in seen_stages:
        raise _Invalid(f"{p}.name", f"duplicate stage name {st.name!r}")
    if st.set not in cfg.sets:
        raise _unknown_ref(f"{p}.set", st.set, names, "set")
    for j, m in enumerate(st.mix):
        _check_mix_source(m.source, f"{p}.mix.{j}.source")
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


def _check_mix_source(source: str, path: str) -> None:
    """REMIX mixes unrelated data. A factoid or task source drawn as "mix" would be trained
    without being tracked, and can repeat the run's own sets (kvr with data seed 0 draws the
    very facts of a `kvr` set at offset 0)."""
    kind = get_source(source).kind
    if kind != "mix":
        valid = ", ".join(sorted(n for n, s in SOURCES.items() if s.kind == "mix"))
        raise _Invalid(path, f"{source!r} makes {kind} items, not mixing data; mix takes {valid} "
                       "(train another set beside this one with `joint:` or `replay:`)")


def _check_tracking(cfg: ExperimentConfig, stages: list[str]) -> None:
    """Tracked sets, and the sets and stages retention curves are drawn for."""
    for j, t in enumerate(cfg.track):
        if t not in cfg.sets:
            raise _unknown_ref(f"track.{j}", t, list(cfg.sets), "set")
    for j, t in enumerate(cfg.eval.retention_sets or []):
        if t not in cfg.track:
            raise _unknown_ref(f"eval.retention_sets.{j}", t, cfg.track, "tracked set")
    for j, t in enumerate(cfg.eval.retention_stages or []):
        if t not in stages:
            raise _unknown_ref(f"eval.retention_stages.{j}", t, stages, "stage")


def _check_checkpoint_stages(cfg: ExperimentConfig, stages: list[str]) -> None:
    """output.save_checkpoints as a list names stages."""
    if isinstance(cfg.output.save_checkpoints, bool):
        return
    for j, t in enumerate(cfg.output.save_checkpoints):
        if t not in stages:
            raise _unknown_ref(f"output.save_checkpoints.{j}", t, stages, "stage")


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
    if prev is None or prev.lora is None or prev.lora.merge or st.lora is None:
        return  # no adapter kept from the previous stage, or none trained on in this one
    if to_dict(st.lora) != to_dict(prev.lora):
        raise _Invalid(f"{p}.lora", f"stage {prev.name!r} keeps its adapter (merge: false); "
                       "a stage that goes on training it needs the same lora settings")


def _check_variant_baselines(variants: dict[str, ExperimentConfig],
                             base_baseline: str | None) -> None:
    """Every variant's baseline and `compare_with` are variants (the top-level baseline or its
    own)."""
    for name, v in variants.items():
        if v.baseline is not None and v.baseline not in variants:
            where = "baseline" if v.baseline == base_baseline else f"variants.{name}.baseline"
            raise _unknown_ref(where, v.baseline, list(variants), "variant")
        for j, other in enumerate(v.compare_with):
            if other not in variants:
                raise _unknown_ref(f"variants.{name}.compare_with.{j}", other, list(variants),
                                   "variant")
