"""`python -m deploy --config X.yaml [--set key=value ...]`: export a model to ONNX fp32 + int8 and measure them.

Writes model.onnx, model.int8.onnx, config.json, the tokenizer files, deploy.json, deploy.md and deploy.png into
output_dir. Exit status 0 done, 2 a user error (config, a missing model folder or eval file), named before any work.
"""

import os
import sys

from deploy.config import DeployConfig
from deploy.run import run
from kdlib.runtime.cli import run_stage

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    return run_stage("deploy", __doc__, DeployConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
