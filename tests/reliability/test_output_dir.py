"""An output directory the run cannot use (a regular file, a NUL in its name, not writable) is
one line, exit 2, from the dry run and the run alike, before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factmem.cli import main

from .test_bad_inputs import write_config

MODES = {"run": [], "dry run": ["--dry-run"]}
# a directory even root cannot write into (Linux: /proc/1 is not writable for anyone)
UNWRITABLE = Path("/proc/1")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("mode", list(MODES))
def test_output_dir_that_is_a_regular_file(mode, tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["run", str(cfg), "--no-progress", *MODES[mode],
                 "--set", f"output.dir={afile}"]) == 2
    err = one_line(capsys)
    assert f"output.dir: {afile} is a file, not a directory" in err, err
    assert main(["run", str(cfg), "--no-progress", *MODES[mode], "--output", str(afile)]) == 2
    assert f"--output: {afile} is a file, not a directory" in one_line(capsys)
    # a file further up the path
    assert main(["run", str(cfg), "--no-progress", *MODES[mode],
                 "--output", str(afile / "sub")]) == 2
    assert f"--output: {afile} is a file, not a directory" in one_line(capsys)
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_directory_that_is_a_regular_file(mode, tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("mine")
    for extra in ([], ["--restart"]):
        assert main(["run", str(cfg), "--no-progress", *MODES[mode], *extra]) == 2
        err = one_line(capsys)
        assert f"{tmp_path / 'runs' / 'tiny'} is a file, not a directory" in err, err
    assert (tmp_path / "runs" / "tiny").read_text() == "mine"


@pytest.mark.parametrize("mode", list(MODES))
def test_output_dir_with_a_nul(mode, tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    assert main(["run", str(cfg), "--no-progress", *MODES[mode],
                 "--set", f'output.dir="{tmp_path}/a\\0b"']) == 2
    assert "output.dir: contains a NUL character" in one_line(capsys)
    assert main(["run", str(cfg), "--no-progress", *MODES[mode],
                 "--output", f"{tmp_path}/a\0b"]) == 2
    assert "--output: contains a NUL character" in one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["exp.yaml"]


@pytest.mark.skipif(os.access(UNWRITABLE, os.W_OK) or not UNWRITABLE.is_dir(),
                    reason="needs a directory no one can write into (/proc/1 on Linux)")
@pytest.mark.parametrize("mode", list(MODES))
def test_output_dir_that_cannot_be_written(mode, tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    target = UNWRITABLE / "runs"
    assert main(["run", str(cfg), "--no-progress", *MODES[mode], "--output", str(target)]) == 2
    err = one_line(capsys)
    assert f"--output: cannot write into {UNWRITABLE} (permission denied)" in err, err
