"""Shared helpers of the benchmarks: the machine's description and RESULTS.md sections.

Each benchmark owns one section of RESULTS.md (between `<!-- begin NAME -->` and
`<!-- end NAME -->`) and rewrites only that, so the scripts can be run in any order."""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
HEADER = """# Benchmark results

Written by the scripts in this folder (`python benchmarks/bench_eval.py`, `bench_train.py`,
`bench_flops.py`, `bench_mixing.py`, `bench_jobs.py`); each rewrites its own section. Figures
are wall-clock on the machine named in the section. The load average is recorded because the
machine may be shared: a load above the core count means other work competed for
the CPU and the figures are pessimistic and noisy.
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    import torch
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load average (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_markdown(info: dict[str, str]) -> str:
    return "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + "."


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `name` of the results file."""
    text = path.read_text() if path.is_file() else HEADER
    block = f"<!-- begin {name} -->\n{body.strip()}\n<!-- end {name} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->",
                         re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def peak_rss_mib() -> float:
    """This process's peak resident set size (getrusage ru_maxrss; KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
