"""Checks across sections, run once the sections are parsed: names that must refer to something
(sets, earlier stages, tracked sets, variants), amounts given exactly one way, selections in
range, the options of the continual-learning baselines, and names that stay names.
"""

from __future__ import annotations

import re
from typing import Any

from factmem.config.coerce import _Invalid, _join, _unknown_ref, to_dict
from factmem.config.schema import ExperimentConfig
from factmem.data import SOURCES, get_source
from factmem.files import safe_name

# Names that become file or folder names of a run (the run, sets, stages, variants): one path
# component on every file system, so never '/', '\\', '..', '.', NUL, control characters, an
# absolute path or an empty name. ASCII letters and digits and `_ - . + = ,`, starting with a
# letter, digit or `_` (so never hidden, never '.' or '..', never read as an option); at most
# 100 characters (a file name holds 255 bytes, and factmem adds `01-`, `.jsonl`, `.tmpPID`).
# Grid-made variant names (`v[lr=0.001]`) are made by factmem from a checked base name; their
# folders are checked in `_check_variant_folders`.
NAME_MAX = 100
NAME_PATTERN = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.+=,-]{{0,{NAME_MAX - 1}}}")
NAME_RULE = (f"use 1 to {NAME_MAX} letters, digits and _ - . + = , starting with a letter, "
             "digit or _; it names a file or folder of the run")


def _check_name(name: Any, path: str) -> None:
    """`name` (found at `path` of the config) is a plain name: see NAME_PATTERN."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return
    if isinstance(name, str) and len(name) > NAME_MAX and NAME_PATTERN.fullmatch(name[:NAME_MAX]):
        raise _Invalid(path, f"{name[:20]!r}... is {len(name)} characters long ({NAME_RULE})")
    raise _Invalid(path, f"{name!r} is not a plain name ({NAME_RULE})")


def _check_names(cfg: ExperimentConfig) -> None:
    """The run's, the sets' and the stages' names. Sets name files (`predictions/SET.jsonl`):
    two that differ only in case would share one on a case-insensitive file system (macOS,
    Windows). Stage folders are numbered (`01-NAME`), so stage names cannot collide."""
    _check_name(cfg.name, "name")
    for name in cfg.sets:
        _check_name(name, "sets")
    _check_case_collisions(list(cfg.sets), "sets")
    for i, st in enumerate(cfg.stages):
        _check_name(st.name, f"stages.{i}.name")


def _check_case_collisions(names: list[str], path: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise _Invalid(path, f"{other!r} and {name!r} differ only in case (they would share "
                           "a file or folder on a case-insensitive file system); rename one")


def _check_variant_folders(names: list[str]) -> None:
    """Every variant gets a folder of its own. A grid-made name becomes a folder by
    `files.safe_name` (characters outside the pattern become '_'), so two grid values can map
    to the same folder ('a b' and 'a_b'), as can names that differ only in case."""
    folders: dict[str, str] = {}
    for name in names:
        folder = safe_name(name)
        if len(folder) > 2 * NAME_MAX:
            raise _Invalid("variants", f"the grid-made variant {name[:40]!r}... makes a folder "
                           f"name of {len(folder)} characters (at most {2 * NAME_MAX}); grid "
                           "over shorter values or name the variants one by one")
        other = folders.setdefault(folder.casefold(), name)
        if other == name:
            continue
        if safe_name(other) == folder:
            raise _Invalid("variants", f"{other!r} and {name!r} would share the folder "
                           f"{folder!r}; make their values differ in letters or digits")
        raise _Invalid("variants", f"{other!r} and {name!r} differ only in case (they would "
                       "share a folder on a case-insensitive file system); rename one")


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
