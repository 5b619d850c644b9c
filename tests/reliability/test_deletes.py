"""`--overwrite`/`--restart` delete only a run directory factmem wrote (its marker, or the
config.yaml + resolved.json of a run from before the marker); anything else is refused with one
line, by the dry run too. A delete never follows a symbolic link."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from factmem.cli import main

from .test_bad_inputs import write_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_run"
MODES = {"run": [], "dry run": ["--dry-run"]}
MARKER_FILE = ".factmem-run"  # factmem.rundir.MARKER_FILE: an on-disk format, pinned here


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """A config and the run directory factmem made from it (copied by each test)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tiny_model_dir, tmp)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    return tmp


def copy_run(finished: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(finished, dest, symlinks=True)
    cfg = dest / "exp.yaml"
    cfg.write_text(cfg.read_text().replace(str(finished), str(dest)))
    return cfg, dest / "runs" / "tiny"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("flag", ["--overwrite", "--restart"])
def test_a_folder_factmem_did_not_write_is_never_deleted(flag, mode, tiny_model_dir, tmp_path,
                                                         capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    mine = tmp_path / "runs" / "tiny"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert main(["run", str(cfg), "--no-progress", flag, *MODES[mode]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert f"{mine} exists and is not a factmem run" in err and "deletes only" in err, err
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny"]  # no lock left


def test_a_dry_run_into_a_source_tree_does_not_plan_to_delete_it(tiny_model_dir, tmp_path,
                                                                  capsys):
    """`--output src` with a run named like the package: the package is not a run."""
    pkg = tmp_path / "src" / "factmem"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""the package"""\n')
    cfg = write_config(tiny_model_dir, tmp_path)
    args = ["run", str(cfg), "--no-progress", "--output", str(tmp_path / "src"),
            "--set", "name=factmem", "--overwrite"]
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "would delete" not in err and f"{pkg} exists and is not a factmem run" in err, err
    assert main(args) == 2
    assert (pkg / "__init__.py").is_file()


def test_a_factmem_run_is_restarted_and_holds_the_marker(finished, tmp_path, capsys):
    cfg, run = copy_run(finished, tmp_path / "copy")
    assert (run / MARKER_FILE).is_file()
    assert main(["run", str(cfg), "--no-progress", "--restart", "--dry-run"]) == 0
    assert f"would delete and rewrite the run directory {run}" in capsys.readouterr().out
    (run / "naive").mkdir()  # something of the old run that the new one does not write
    assert main(["run", str(cfg), "--no-progress", "--restart"]) == 0
    assert not (run / "naive").exists() and (run / MARKER_FILE).is_file()


def test_a_run_from_before_the_marker_is_still_factmems(tmp_path, monkeypatch, capsys):
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    assert not (old / "runs" / "old" / MARKER_FILE).exists()
    monkeypatch.chdir(old)  # its config names the model as ./model
    assert main(["run", "config.yaml", "--no-progress", "--restart", "--dry-run"]) == 0
    assert "would delete and rewrite the run directory runs/old" in capsys.readouterr().out


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_directory_that_is_a_symlink_is_not_deleted_through(mode, finished, tmp_path,
                                                                   capsys):
    cfg, run = copy_run(finished, tmp_path / "copy")
    real = tmp_path / "elsewhere"
    run.rename(real)
    run.symlink_to(real, target_is_directory=True)
    assert main(["run", str(cfg), "--no-progress", "--restart", *MODES[mode]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert f"{run} is a symbolic link" in err, err
    assert (real / "config.yaml").is_file()
    assert run.is_symlink()


@pytest.mark.slow
def test_a_symlink_inside_a_run_is_removed_not_followed(finished, tmp_path):
    cfg, run = copy_run(finished, tmp_path / "copy")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (run / "link").symlink_to(outside, target_is_directory=True)
    assert main(["run", str(cfg), "--no-progress", "--restart"]) == 0
    assert not (run / "link").exists() and (outside / "keep.txt").read_text() == "mine"


def test_a_marker_that_is_a_symlink_does_not_count(finished, tmp_path, capsys):
    cfg, run = copy_run(finished, tmp_path / "copy")
    mine = tmp_path / "runs2" / "tiny"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / MARKER_FILE).symlink_to(run / MARKER_FILE)
    assert main(["run", str(cfg), "--no-progress", "--restart",
                 "--output", str(tmp_path / "runs2")]) == 2
    assert "is not a factmem run" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"
