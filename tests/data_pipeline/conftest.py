"""One tiny teacher and one DirectRunner transfer set, shared by the pipeline's test modules (each costs a run)."""

import pytest

from tests.pipeline_fixture import corpus_config, run_pipeline
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="package")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="package")
def teacher(work):
    return make_tiny_bert(work / "teacher", task="masked_lm", layers=2, hidden=32, heads=4, seed=0)


@pytest.fixture(scope="package")
def reference(work, teacher):
    out = work / "reference"
    run_pipeline(work, corpus_config(teacher, out))
    return out
