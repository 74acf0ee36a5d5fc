"""`python -m evaluate --config X.yaml [--set key=value ...]`: score model folders against a teacher.

Writes evaluation.json, evaluation.md and evaluation.png into output_dir. Exit status 0 done, 2 a user
error (config, a missing model folder, a transfer set without held-out text), named before any work.
"""

import os
import sys

from evaluate.config import EvaluateConfig
from evaluate.run import run
from kdlib.runtime.cli import run_stage

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", __doc__, EvaluateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
