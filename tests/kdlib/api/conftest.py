"""One tiny real transfer set for the kdlib.api tests: a 4-layer teacher's top-k, hidden states of layers 0, 2 and 4,
Q/K/V of layers 2 and 4 and the mean-pooled embedding over 96 masked rows (tests/transfer_fixture.py), built once."""

import pytest

from tests.transfer_fixture import build_transfer_set


@pytest.fixture(scope="session")
def api_paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("api_fixture"), rows=96, teacher_steps=10, hidden_layers=(0, 2, 4),
                              qkv_layers=(2, 4), pooled="mean", dropout=0.0)
