"""Bad input to `python -m evaluate` (issue 33): every field and flag, wrong in each way tests/fuzz.py knows, ends
in exit 2 with one `error:` line naming it, and no file changes."""

from __future__ import annotations

import pytest

from evaluate.__main__ import main
from evaluate.config import EvaluateConfig
from kdlib.runtime.cli import stage_parser
from tests.fuzz import assert_refused, config_cases, field_cases, flag_cases, path_cases
from tests.tiny_models import make_tiny_bert

VALID = {"models": {"t": "{root}/teacher"}, "teacher": "t", "output_dir": "{root}/out",
         "transfer_set": None, "heldout": {"enabled": False, "max_length": 16, "seed": 0},
         "speed": {"enabled": False, "batch_size": 2, "length": 8, "seed": 0}, "word_similarity": False,
         "word_batch_size": 8, "threads": 1, "progress_bar": False, "overwrite": False}
SKIP = {
    "heldout.seed/range": "any integer seeds the mask",
    "speed.seed/range": "any integer seeds the timed ids",
}
CASES = (field_cases(EvaluateConfig, VALID, skip=SKIP) + path_cases("output_dir", "output")
         + path_cases("models.t", "folder") + path_cases("transfer_set", "folder") + flag_cases(stage_parser("evaluate", "")) + config_cases())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-fuzz")
    make_tiny_bert(root / "teacher", layers=1, seed=0)
    return root


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_bad_field_is_refused_in_one_line(workspace, case):
    assert_refused(main, case, VALID, workspace)
