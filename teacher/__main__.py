"""`python -m teacher --config configs/demo_teacher.yaml`: train a masked-LM head over a frozen encoder."""

import sys

from kdlib.runtime.cli import run_stage
from teacher.prepare_mlm import TeacherPrepConfig, prepare_teacher

if __name__ == "__main__":
    sys.exit(run_stage(__doc__, TeacherPrepConfig, prepare_teacher))
