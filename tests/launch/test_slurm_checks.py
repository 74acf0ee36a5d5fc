"""`python -m launch slurm --dry-run` refusing what SLURM would only refuse later, or never (issue 33): a --partition
the cluster's `sinfo` does not list (a stand-in sinfo on PATH plays the cluster), and counts out of range. Fast: no
cluster, no sbatch; the stage's own --check runs as in every launch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.launch.test_dask_block import data_pipeline_slurm


def path_with(folder: Path, sinfo: str | None) -> dict:
    """The environment with `folder` alone on PATH, holding a stand-in `sinfo` script when one is given (python is
    called by its absolute path, so nothing else needs PATH)."""
    folder.mkdir()
    if sinfo is not None:
        (folder / "sinfo").write_text(f"#!/bin/bash\n{sinfo}\n")
        (folder / "sinfo").chmod(0o755)
    return dict(os.environ, PATH=str(folder))


def errors_of(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


CLUSTER = r"printf 'debug*\ncpu\ncpu\n'"  # what `sinfo -h -o %R` prints (a partition once per node state)


@pytest.mark.parametrize("partition", ["cpu", "debug", "debug,cpu"])
def test_a_partition_that_sinfo_lists_renders(tmp_path, partition):
    proc = data_pipeline_slurm(tmp_path, "--partition", partition, env=path_with(tmp_path / "bin", CLUSTER))
    assert proc.returncode == 0, proc.stderr
    assert f"#SBATCH --partition={partition}" in proc.stdout.splitlines()
    assert "not checked" not in proc.stderr and not any(tmp_path.glob("out*"))


@pytest.mark.parametrize("partition,unknown", [("gpu", "gpu"), ("cpu,gpu", "gpu"), ("cpu,Debug", "Debug")])
def test_a_partition_that_sinfo_does_not_list_is_refused_in_one_line(tmp_path, partition, unknown):
    proc = data_pipeline_slurm(tmp_path, "--partition", partition, env=path_with(tmp_path / "bin", CLUSTER))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert errors_of(proc) == [f"error: --partition: {unknown!r} is not a partition of this cluster "
                               "(sinfo lists: debug, cpu)"], proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr and not any(tmp_path.glob("out*"))


@pytest.mark.parametrize("sinfo,reason", [
    (None, "sinfo is not on this machine"),
    ("echo 'sinfo: fatal: Could not establish a configuration source' >&2; exit 1",
     "sinfo failed (exit 1: sinfo: fatal: Could not establish a configuration source)"),
])
def test_without_a_working_sinfo_the_partition_is_rendered_unchecked_and_says_so(tmp_path, sinfo, reason):
    proc = data_pipeline_slurm(tmp_path, "--partition", "gpu", env=path_with(tmp_path / "bin", sinfo))
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "not checked" in line] == [
        f"[launch] --partition 'gpu' not checked: {reason}"]
    assert "#SBATCH --partition=gpu" in proc.stdout.splitlines() and errors_of(proc) == []


def test_no_partition_asks_nothing_of_sinfo(tmp_path):
    record = tmp_path / "asked"
    proc = data_pipeline_slurm(tmp_path, env=path_with(tmp_path / "bin", f": > {record}; exit 1"))
    assert proc.returncode == 0, proc.stderr
    assert "# (default partition)" in proc.stdout.splitlines() and not record.exists() and proc.stderr == ""


@pytest.mark.parametrize("flag,value,expected", [
    ("--tasks-per-node", "-1", "--tasks-per-node: expected 0 or more, got -1"),
    ("--nodes", "0", "--nodes: expected at least 1, got 0"),
    ("--gpus-per-node", "-1", "--gpus-per-node: expected 0 or more, got -1"),
])
def test_a_count_out_of_range_is_refused_in_one_line(tmp_path, flag, value, expected):
    proc = data_pipeline_slurm(tmp_path, flag, value)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert errors_of(proc) == [f"error: {expected}"], proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr and not any(tmp_path.glob("out*"))
