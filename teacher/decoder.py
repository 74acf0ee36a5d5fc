"""`python -m teacher.decoder --config configs/decoder/teacher.yaml`: train a decoder teacher (and student
tokenizers) from scratch on a local corpus."""

import sys

from kdlib.runtime.cli import run_stage
from teacher.prepare_decoder import DecoderPrepConfig, prepare_decoder

if __name__ == "__main__":
    sys.exit(run_stage(__doc__, DecoderPrepConfig, prepare_decoder))
