"""Bad input to `python -m deploy` (issue 33): every field and flag, wrong in each way tests/fuzz.py knows, ends
in exit 2 with one `error:` line naming it, and no file changes; a data file's error names the file and line. The
workspace's name has a space in it, so every path of the valid config holds one: it must be accepted (the valid
config passes every input check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deploy.__main__
from deploy.__main__ import main
from deploy.config import DeployConfig
from deploy.run import check_inputs
from kdlib.cache.manifest import MANIFEST
from kdlib.config import load_config
from kdlib.runtime.cli import stage_parser
from tests.fuzz import (NOT_UTF8, Case, _maker, assert_refused, config_cases, field_cases, flag_cases, path_cases,
                        write_case)
from tests.tiny_models import make_tiny_bert

VALID = {"model": "{root}/model", "output_dir": "{root}/out", "eval_data": "{root}/eval.jsonl", "max_length": 16,
         "batch_size": 2, "threads": 1, "speed_length": 16, "speed_batches": [1, 2], "repeats": 1, "warmup": 0,
         "opset": 17, "progress_bar": False, "overwrite": False}
LINES = [{"text": "a fine day", "label": "LABEL_1"}, {"text": "a bad day", "label": 0}]


def transfer_set(path: Path) -> None:
    """Another stage's artefact: a folder data_pipeline wrote (its manifest and a shard)."""
    (path / "shards").mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format_version": 3, "shards": []}))
    (path / "shards" / "shard-00000-of-00001.parquet").write_bytes(b"PAR1")


def model_with(name: str, content: bytes):
    """The valid model folder, its file `name` holding `content` (a damaged or foreign model folder)."""
    def make(path: Path) -> None:
        make_tiny_bert(path, task="sequence_classification", layers=1, seed=0)
        (path / name).write_bytes(content)
    return make


def eval_lines(content: bytes):
    """An eval file whose first line is fine and whose second is `content`."""
    def make(path: Path) -> None:
        path.write_bytes(json.dumps(LINES[0]).encode() + b"\n" + content)
    return make


def data_case(field: str, what: str, build, *words: str) -> tuple[Case, tuple[str, ...]]:
    """(`field` set to what `build(path)` makes, the words its error must hold besides the field: file and line)."""
    return Case(f"{field}/{what}", (f"'{field}'",), config=((field, _maker(field, what, build)),)), words


DATA = [
    data_case("eval_data", "line 2 not UTF-8", eval_lines(NOT_UTF8), "line 2: not utf-8", "eval_data-line-2"),
    data_case("eval_data", "line 2 not JSON", eval_lines(b"{text: 1\n"), "line 2: malformed JSON"),
    data_case("eval_data", "line 2 a list", eval_lines(b"[1, 2]\n"), "line 2: expected a JSON object"),
    data_case("eval_data", "line 2 no text", eval_lines(b'{"label": 0}\n'), "line 2: expected an object with"),
    data_case("eval_data", "line 2 a newline label", eval_lines(b'{"text": "x", "label": "a\\nb"}\n'), "line 2: label"),
    data_case("model", "config.json not UTF-8", model_with("config.json", NOT_UTF8), "config.json: line 1"),
    data_case("model", "tokenizer.json not UTF-8", model_with("tokenizer.json", NOT_UTF8), "tokenizer.json: line 1"),
    data_case("model", "config.json a list", model_with("config.json", b"[1, 2]\n"), "config.json"),
]
CASES = (field_cases(DeployConfig, VALID) + path_cases("output_dir", "output", artefact=transfer_set)
         + path_cases("model", "folder")
         + [c for c in path_cases("model", "output", artefact=transfer_set) if c.label != "model/a file"]
         + path_cases("eval_data", "text") + flag_cases(stage_parser("deploy", deploy.__main__.__doc__))
         + config_cases() + [case for case, _ in DATA])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy fuzz")  # a space in every path
    make_tiny_bert(root / "model", task="sequence_classification", layers=1, seed=0)
    (root / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return root


def test_the_valid_config_passes_every_input_check(workspace):
    """So each case below is refused for its own mutation, and a path with a space in it is a legal path."""
    config = workspace / "config.yaml"
    write_case(Case("valid", ()), VALID, workspace, config)
    inputs = check_inputs(load_config(config, DeployConfig), str(config))
    assert " " in str(inputs.folder) and inputs.texts == ["a fine day", "a bad day"] and inputs.labels == [1, 0]
    config.unlink()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_bad_field_is_refused_in_one_line(workspace, case):
    assert_refused(main, case, VALID, workspace)


@pytest.mark.parametrize("case,words", DATA, ids=[case.label for case, _ in DATA])
def test_a_bad_data_file_is_named_with_its_line(workspace, case, words):
    error = assert_refused(main, case, VALID, workspace)
    words = (f"{workspace / 'config.yaml'}: field", *words)  # which config, which field, which file and line
    assert all(w in error for w in words), f"{case}: the error does not hold {words}: {error}"
