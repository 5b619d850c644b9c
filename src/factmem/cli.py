"""`factmem` command line. Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from factmem.errors import FactmemError
from factmem.logs import quiet_library_bars, quiet_library_loggers
from factmem.signals import EXIT_STATUS, Terminated

log = logging.getLogger("factmem")


def _cmd_run(args: argparse.Namespace) -> int:
    from factmem.config import load_experiment
    from factmem.experiment import run_experiment
    from factmem.jobs import check_jobs
    from factmem.results import to_markdown

    if args.no_progress:
        quiet_library_bars()
    check_jobs(args.jobs, args.threads_per_job)
    exp = load_experiment(args.config, args.set)
    if args.dry_run:
        return _dry_run(args, exp)
    summary = run_experiment(exp, output_dir=args.output, overwrite=args.overwrite,
                             progress=not args.no_progress, jobs=args.jobs,
                             threads_per_job=args.threads_per_job, break_lock=args.break_lock)
    if not is_main_process():  # under `accelerate launch` every process gets here; one prints
        return 0
    print()
    print(to_markdown(summary))
    if "comparison" in summary:
        from factmem.compare import to_markdown as comparison_markdown

        print(comparison_markdown(summary["comparison"]))
    print(f"Results: {summary['run_dir']}/summary.md (and summary.json"
          + (", comparison.md" if "comparison" in summary else "") + ")")
    return 0


def _dry_run(args: argparse.Namespace, exp) -> int:
    """Every check of the real run and the plan; the memory plan (from the model's config
    alone) comes first, so that it is printed even where the data plan cannot be made (a hub
    model's tokenizer without the network)."""
    from factmem.experiment import dry_run
    from factmem.memory import format_memory, memory_plan
    from factmem.models import without_model_writes
    from factmem.plan import format_plan

    main_process = is_main_process()  # under `accelerate launch`: every process checks, one prints
    try:
        with without_model_writes():  # a dry run writes nothing, a converted model neither
            memory = memory_plan(exp.first_variant)
    except FactmemError as e:
        memory, reason = None, str(e)
    try:
        plan, where = dry_run(exp, output_dir=args.output, overwrite=args.overwrite)
    except FactmemError:
        if main_process:
            print(format_memory(memory, None) if memory is not None
                  else f"memory plan: not made ({reason})", flush=True)
        raise
    if not main_process:
        return 0
    print(f"{args.config}: valid (every check of the real run passed; model "
          f"{exp.first_variant.model.name}: tokenizer loaded, weights not); variants: "
          f"{', '.join(exp.variants)}; seeds: {exp.first_variant.seeds}")
    print(format_plan(plan))
    print(format_memory(memory, plan) if memory is not None else f"memory plan: not made "
          f"({reason})")
    print(where)
    return 0


def is_main_process() -> bool:
    """Rank 0 of a launched job (`accelerate launch`/torchrun set RANK), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def _set_from_args(args: argparse.Namespace):
    """`SOURCE --n --offset --seed --param k=v` -> a validated SetConfig."""
    from factmem.config import parse_override, parse_set

    raw = {"source": args.source, **dict(parse_override(p) for p in args.param)}
    if args.n is not None:
        raw["n"] = args.n
    raw["offset"], raw["seed"] = args.offset, args.seed
    return parse_set(raw, where=f"data {args.data_cmd} {args.source}")


def _cmd_data_build(args: argparse.Namespace) -> int:
    from factmem import files
    from factmem.sets import build_set

    examples = build_set(_set_from_args(args))
    files.write_jsonl(args.out, (e.to_json() for e in examples))
    print(f"wrote {len(examples)} examples to {args.out}")
    return 0


def _cmd_data_filter(args: argparse.Namespace) -> int:
    """Yet-to-learn filtering: keep the facts the base model gets wrong few-shot."""
    from factmem import files
    from factmem.config import ModelConfig, to_dict
    from factmem.filter import filter_unknown, shot_examples
    from factmem.sets import build_set

    cfg = _set_from_args(args)
    if args.shots < 0:
        raise FactmemError(f"--shots: must be >= 0, got {args.shots}")
    examples = build_set(cfg)
    shots = shot_examples(cfg.source, cfg.params, cfg.n, cfg.offset, cfg.seed, args.shots)
    res = filter_unknown(examples, shots, ModelConfig(name=args.model), to_dict(cfg),
                         match=args.match, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, verdicts_dir=args.cache_dir)
    c = res.counts()
    print(f"{args.source}: {c['known']} known, {c['unknown']} unknown of {c['total']} "
          f"({args.shots}-shot, {args.match} match, {res.seconds:.1f}s"
          f"{', cached' if res.cached else ''}); verdicts: {res.cache_path}")
    if args.out:
        keep = set(res.unknown)
        files.write_jsonl(args.out, (e.to_json() for e in examples if e.id in keep))
        print(f"wrote {len(keep)} yet-to-learn examples to {args.out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from factmem.analysis import compare_layers
    from factmem.analysis.analyze import analyze, parse_what

    if args.no_progress:
        quiet_library_bars()
    summary = analyze(args.run_dir, parse_what(args.what), block=args.block,
                      batch_size=args.batch_size, variants=args.variant,
                      progress=not args.no_progress)
    for row in summary.get("lens", []):
        seed = "all seeds" if row["seed"] == "all" else f"seed{row['seed']}"
        std = "-" if row["std"] is None else f"{row['std']:.2f}"  # one fact: no spread
        stats = ("" if row["mean"] is None else
                 f", first layer mean {row['mean']:.2f}, std {std}, "
                 f"entropy {row['entropy_bits']:.2f} bits")
        print(f"lens {row['variant']} {seed} {row['stage']} {row['set']}: "
              f"{row['decodable']}/{row['n']} decodable{stats}")
    print(f"Tables: {args.run_dir}/analysis/ (summary.json)")
    if compare_layers.LENS_KEY in summary or compare_layers.REVERSION_KEY in summary:
        print(f"Variants against their baseline: {args.run_dir}/analysis/"
              f"{compare_layers.LAYERS_MD}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from factmem.report import write_report

    md, html = write_report(args.run_dir)
    print(f"Report: {md} and {html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factmem", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment: stages x variants x seeds -> table")
    run.add_argument("config", help="experiment YAML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=1e-5 (repeatable)")
    run.add_argument("--output", help="parent directory of the run (default: output.dir)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing run directory (only one factmem wrote)")
    run.add_argument("--restart", dest="overwrite", action="store_true",
                     help="same as --overwrite: discard an existing (interrupted) run and start "
                     "over; without it, the same command on an existing run directory continues "
                     "it. Deletes only a directory factmem wrote, never through a symbolic link")
    run.add_argument("--break-lock", action="store_true",
                     help="take over the run directory's lock even if its process may still run "
                     "(e.g. on another host, whose lock is otherwise taken over after 10 minutes "
                     "without a heartbeat); only when you know that process is gone")
    run.add_argument("--dry-run", action="store_true",
                     help="run every check of the real run (sets, mixtures of every seed, "
                     "tokenizer; no weights) and print the plan: items, tokens and steps per "
                     "stage, total training tokens; writes nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run N variant/seeds at a time, each in a process of its own (one "
                     "that copies another's stages waits for them); workers log to "
                     "RUN_DIR/logs/, one line per finished stage here (default 1)")
    run.add_argument("--threads-per-job", type=int, metavar="T",
                     help="torch threads per job (default: the cores divided by --jobs)")
    run.set_defaults(fn=_cmd_run)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    build = data.add_parser("build", help="materialise a source as JSONL")
    build.add_argument("source", help="source name, e.g. kvr")
    build.add_argument("--n", type=int)
    build.add_argument("--offset", type=int, default=0)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a source parameter, e.g. --param length=32")
    build.add_argument("--out", required=True, help="output .jsonl path")
    build.set_defaults(fn=_cmd_data_build)

    filt = data.add_parser("filter", help="keep the facts a base model does not know (few-shot)")
    filt.add_argument("source", help="source name, e.g. popqa or entities")
    filt.add_argument("--model", required=True, help="embedded name, hub id or local directory")
    filt.add_argument("--shots", type=int, default=4,
                      help="few-shot examples, taken from items outside the selection")
    filt.add_argument("--n", type=int)
    filt.add_argument("--offset", type=int, default=0)
    filt.add_argument("--seed", type=int, default=0)
    filt.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                      help="a source parameter, e.g. --param path=data/popqa.tsv")
    filt.add_argument("--match", choices=["contains", "exact"], default="contains",
                      help="when a generated answer counts as knowing the fact")
    filt.add_argument("--batch-size", type=int, default=16)
    filt.add_argument("--max-new-tokens", type=int, default=32)
    filt.add_argument("--cache-dir",
                      help="where verdicts are cached (default $FACTMEM_CACHE/filter, "
                           "FACTMEM_CACHE defaulting to ~/.cache/factmem)")
    filt.add_argument("--out", help="write the yet-to-learn examples to this .jsonl")
    filt.set_defaults(fn=_cmd_data_filter)

    an = sub.add_parser("analyze", help="retention, graded retention, logit lens, layer "
                        "reversion, probes over a run directory -> RUN_DIR/analysis/")
    an.add_argument("run_dir", help="a run directory written by `factmem run`")
    an.add_argument("--what", default="all",
                    help="comma-separated: retention,graded,lens,reversion,probes (default all)")
    an.add_argument("--block", type=int, default=1, help="layers reverted together (default 1)")
    an.add_argument("--batch-size", type=int, help="evaluation batch (default: eval.batch_size)")
    an.add_argument("--variant", action="append", default=[], metavar="NAME",
                    help="analyze only this variant (repeatable); other variants' rows are kept")
    an.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    an.set_defaults(fn=_cmd_analyze)

    rep = sub.add_parser("report", help="report.md and a self-contained report.html with figures")
    rep.add_argument("run_dir",
                     help="a run directory (run `factmem analyze` first for all figures)")
    rep.set_defaults(fn=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_library_loggers()
    try:
        return args.fn(args)
    except FactmemError as e:
        print(f"factmem: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:  # factmem.signals: the lock is released, the run resumable
        print(f"factmem: stopped by SIGTERM: {e}; run the same command again to continue",
              file=sys.stderr)
        return EXIT_STATUS
    except KeyboardInterrupt:
        print("factmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
