"""factmem: continual memorization of factoids in language models.

Pipeline (data flows one way):
    config -> sources -> stage mixtures -> train stage k -> evaluate tracked sets -> ... -> results

Python API: `factmem.run(config_or_path, overrides)` runs an experiment as `factmem run` does;
`factmem.load_run(run_dir)` reads a run's accuracy matrix, forgetting and per-fact predictions as
pandas DataFrames (see factmem.api).
"""

from factmem.api import RunResults, load_run, run

__version__ = "0.1.0"
__all__ = ["RunResults", "__version__", "load_run", "run"]
