"""The runner flags and the Beam options the pipeline passes on: checked before any work, in one line."""

import argparse

import pytest

from data_pipeline.runners import RunnerChoice, add_runner_flags, check_beam_options, direct_defaults
from kdlib.errors import ConfigError


def ours() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append")
    add_runner_flags(parser)
    return parser


@pytest.mark.parametrize("beam_args", [
    # the README's lines for Beam's other runners, and our own defaults
    ["--flink_master", "host:8081", "--environment_type", "DOCKER", "--parallelism", "4"],
    ["--spark_master_url", "spark://h:7077"],
    ["--project", "P", "--region", "R", "--temp_location", "gs://b/t", "--experiments", "use_runner_v2"],
    direct_defaults([]),
])
def test_beams_documented_options_pass(beam_args):
    check_beam_options(beam_args, ours(), runner=None)


def test_a_dask_option_passes_with_the_dask_runner_and_a_typo_names_the_close_flag():
    check_beam_options(["--dask_npartitions", "4"], ours(), runner="dask")
    with pytest.raises(ConfigError, match=r"^--dask_npartitionz: not an option .*did you mean --dask_npartitions\?"):
        check_beam_options(["--dask_npartitionz=4"], ours(), runner="dask")
    with pytest.raises(ConfigError, match=r"^--sett: not an option .*did you mean --set\?"):
        check_beam_options(["--sett", "x=1"], ours(), runner=None)
    with pytest.raises(ConfigError, match=r"^stray: not an option"):
        check_beam_options(["stray"], ours(), runner=None)


def choice(*argv: str) -> RunnerChoice:
    return RunnerChoice.from_args(ours().parse_args(list(argv)))


def test_runner_choices():
    assert choice() == RunnerChoice(runner=None)
    assert choice("--runner", "dask") == RunnerChoice(runner="dask", local_workers=2, min_workers=2)
    assert choice("--runner", "dask", "--scheduler", "tcp://n1:8786", "--min-workers", "3") == RunnerChoice(
        runner="dask", scheduler="tcp://n1:8786", min_workers=3)
    for argv, message in ((("--min-workers", "2"), "--min-workers: only with --runner dask"),
                          (("--runner", "dask", "--scheduler", "tcp://n1:0"), "--scheduler: expected"),
                          (("--runner", "dask", "--scheduler", "n1:8786"), "--scheduler: expected"),
                          (("--runner", "dask", "--scheduler-file", "f", "--local-workers", "1"), "give one of"),
                          (("--runner", "dask", "--min-workers", "0"), "--min-workers: expected a positive")):
        with pytest.raises(ConfigError, match=message):
            choice(*argv)
