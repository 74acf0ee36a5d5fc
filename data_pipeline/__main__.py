"""`python -m data_pipeline --config X.yaml [--set key=value ...] [Beam pipeline options]`: build a transfer set
(the teacher's outputs over a corpus) with Apache Beam.

Arguments this parser does not know are Beam pipeline options (`--runner`, `--project`,
`--direct_num_workers`, ...), passed through unchanged to the runner.
"""

import logging
import sys

from data_pipeline.config import PipelineConfig
from kdlib.runtime.cli import run_config, stage_parser

BEAM_OPTIONS = ("other arguments are Apache Beam pipeline options (--runner, --project, --direct_num_workers, ...),\n"
                "passed through unchanged to the runner")


def main(argv=None) -> int:
    parser = stage_parser("data_pipeline", __doc__, epilog=BEAM_OPTIONS)
    args, beam_args = parser.parse_known_args(argv)
    # imported after parsing: the pipeline loads Beam and torch, which `--help` must not wait for
    from data_pipeline.pipeline import default_beam_args, run

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # The job service logs each worker failure with its whole traceback; the pipeline reports the error in
    # one line and keeps Beam's detail in <output_dir>/logs/ instead.
    for name in ("apache_beam.runners.portability.local_job_service", "apache_beam.runners.common"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return run_config(args, PipelineConfig, lambda cfg, source: run(cfg, default_beam_args(beam_args), source=source))


if __name__ == "__main__":
    sys.exit(main())
