"""`python -m data_pipeline --config X.yaml [--set key=value ...] [--runner dask ...] [Beam pipeline options]`: build
a transfer set (the teacher's outputs over a corpus) with Apache Beam, here or on a Dask cluster.

Arguments this parser does not know are Beam pipeline options (`--project`, `--direct_num_workers`, ...), passed
through unchanged to the runner; one that no Beam options class knows is an error, not dropped.

`python -m data_pipeline ls|gc --cache-root DIR`: list a transfer-set store (`cache_root`), or remove its sets
that no output_dir links to any more.
"""

import argparse
import logging
import sys

from data_pipeline.config import PipelineConfig
from data_pipeline.runners import RunnerChoice, add_runner_flags, check_beam_options
from data_pipeline.store_cli import COMMANDS as STORE_COMMANDS, main as store_main
from kdlib.runtime.cli import check_flag, run_config, stage_parser

BEAM_OPTIONS = ("other arguments are Apache Beam pipeline options (--project, --direct_num_workers, ...), passed\n"
                "to the runner; one that is not an option of Beam's is an error")


def parser() -> argparse.ArgumentParser:
    """The stage's own flags (--config, --set, --check and the runner's); the rest of argv is Beam's."""
    ours = stage_parser("data_pipeline", __doc__, epilog=BEAM_OPTIONS, flags=check_flag)
    add_runner_flags(ours)
    return ours


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in STORE_COMMANDS:  # `ls` / `gc` of a store (data_pipeline/store_cli.py): no Beam, no torch
        return store_main(argv)
    ours = parser()
    args, beam_args = ours.parse_known_args(argv)
    # imported after parsing: the pipeline loads Beam and torch, which `--help` must not wait for
    from data_pipeline.pipeline import run

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # The job service logs each worker failure with its whole traceback; the pipeline reports the error in
    # one line and keeps Beam's detail in <output_dir>/logs/ instead.
    for name in ("apache_beam.runners.portability.local_job_service", "apache_beam.runners.common"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    def build(cfg: PipelineConfig, source: str) -> None:
        choice = RunnerChoice.from_args(args)  # the runner flags are checked with the config, before any work
        check_beam_options(beam_args, ours, choice.runner)
        if args.check:
            print(f"{source}: valid")
            return
        run(cfg, beam_args, source=source, runner=choice)  # a Dask cluster starts only if there is work for it

    return run_config(args, PipelineConfig, build)


if __name__ == "__main__":
    sys.exit(main())
