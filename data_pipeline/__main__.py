"""`python -m data_pipeline --config X.yaml [--set key=value ...] [Beam pipeline options]`.

Arguments this parser does not know are Beam pipeline options (`--runner`, `--project`,
`--direct_num_workers`, ...), passed through unchanged to the runner.
"""

import logging
import sys

from data_pipeline.config import PipelineConfig
from data_pipeline.pipeline import default_beam_args, run
from kdlib.runtime.cli import config_parser, exit_code_of, parse_overrides
from kdlib.config import load_config


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # The job service logs each worker failure with its whole traceback; the pipeline reports the error in
    # one line and keeps Beam's detail in <output_dir>/logs/ instead.
    for name in ("apache_beam.runners.portability.local_job_service", "apache_beam.runners.common"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    parser = config_parser(__doc__.splitlines()[0])
    args, beam_args = parser.parse_known_args(argv)
    return exit_code_of(lambda: run(load_config(args.config, PipelineConfig, parse_overrides(args.set)),
                                     default_beam_args(beam_args), source=args.config))


if __name__ == "__main__":
    sys.exit(main())
