"""A study's wall time with `--jobs 1` and `--jobs 2`, side by side on this machine.

    python benchmarks/bench_jobs.py                 # embedded model, 2 variants x 2 seeds
    python benchmarks/bench_jobs.py --seeds 0 1 2   # more variant/seeds per run

A study is many small independent runs (variant x seed). `--jobs 1` trains them one after the
other with every core; `--jobs 2` trains two at a time, each in its own process with half the
cores. Whether that is faster depends on how well one small training uses the cores. This
script runs the same small study both ways, one after the other in fresh output folders of its
own (a temporary folder it deletes), and reports each wall time (the whole `factmem run`
command, model loading included), the ratio, and whether both wrote the same accuracies.
The study: naive and REMIX (random words in stage 1, generic text in stage 2, ratio 1), 8 + 8
KVR facts, 4 epochs a stage, batch 2: the demo's recipe, shrunk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Timer, machine, machine_markdown, table, write_section  # noqa: E402

STUDY = """\
name: jobs-bench
model: {{name: {model}}}
train: {{lr: 2.5e-4, batch_size: 2, warmup_fraction: 0.05, stop: {{rule: epochs, epochs: 4}}}}
sets:
  kvr_a: {{source: kvr, n: 8}}
  kvr_b: {{source: kvr, n: 8, offset: 2000}}
stages:
  - {{name: stage1, set: kvr_a}}
  - {{name: stage2, set: kvr_b}}
track: [kvr_a, kvr_b]
baseline: naive
variants:
  naive: {{}}
  remix:
    stages.stage1.mix: [{{source: random-words, ratio: 1, length: 8}}]
    stages.stage2.mix: [{{source: generic, ratio: 1}}]
seeds: {seeds}
output: {{dir: {out}}}
"""


def run_study(config: Path, jobs: int) -> float:
    command = [sys.executable, "-m", "factmem", "run", str(config), "--jobs", str(jobs),
               "--no-progress"]
    with Timer() as t:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return t.seconds


def accuracies(run_dir: Path) -> dict[str, object]:
    return {str(p.relative_to(run_dir)): json.loads(p.read_text())
            for p in sorted(run_dir.glob("*/seed*/accuracy.json"))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="factmem-bench-jobs-"))
    try:
        seconds, written = {}, {}
        for jobs in (1, 2):
            out = scratch / f"jobs{jobs}"
            config = scratch / f"jobs{jobs}.yaml"
            config.write_text(STUDY.format(model=args.model, seeds=list(args.seeds), out=out))
            seconds[jobs] = run_study(config, jobs)
            written[jobs] = accuracies(out / "jobs-bench")
            print(f"--jobs {jobs}: {seconds[jobs]:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch)

    n = 2 * len(args.seeds)
    same = written[1] == written[2]
    body = (f"## A study's wall time: --jobs 1 vs --jobs 2 ({args.model}, {n} variant/seeds)\n\n"
            "`python benchmarks/bench_jobs.py`: naive and REMIX (ratio 1) x seeds "
            f"{list(args.seeds)}, 8 + 8 KVR facts, 4 epochs a stage, batch 2; the whole "
            "`factmem run` command, one way after the other.\n\n"
            + table(["jobs", "threads per job", "wall s", "speed-up"],
                    [[1, "all cores", f"{seconds[1]:.0f}", "1.00"],
                     [2, "half", f"{seconds[2]:.0f}", f"{seconds[1] / seconds[2]:.2f}"]])
            + f"\n\nSame accuracy.json in both: {'yes' if same else 'no'} (the thread count "
            "differs, which can change float summation order).\n\n"
            + machine_markdown(machine()))
    write_section("jobs", body, args.results)
    print(body)
    return {"seconds": seconds, "same": same}


if __name__ == "__main__":
    main()
