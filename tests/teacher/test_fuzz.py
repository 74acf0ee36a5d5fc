"""Bad input to `python -m teacher` and `python -m teacher.decoder` (issue 33): every field and flag, wrong in each
way tests/fuzz.py knows, ends in exit 2 with one `error:` line naming it, and no file changes. The workspace's name
has a space in it, so every path of the valid configs holds one: it must be accepted (they pass every input
check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlib.cache.manifest import MANIFEST
from kdlib.config import load_config
from kdlib.text.readers import gensim_test_data
from teacher.__main__ import main, parser
from teacher.corpus import check_corpus
from teacher.decoder import main as decoder_main, parser as decoder_parser
from teacher.prepare_decoder import DecoderPrepConfig
from teacher.prepare_mlm import TeacherPrepConfig, check_inputs
from tests.fuzz import (NOT_UTF8, PATH_KINDS, Case, _maker, assert_refused, config_cases, field_cases, flag_cases,
                        path_cases, run_main, write_case)
from tests.tiny_models import make_tiny_bert

CORPUS = {"kind": "text", "path": "{root}/corpus.txt", "text_column": "text", "text_mode": "line", "split": None,
          "max_documents": 40, "encoding": "utf-8"}
VALID = {"encoder": "{root}/encoder", "output_dir": "{root}/out", "corpus": CORPUS,
         "max_length": 16, "mask_prob": 0.15, "batch_size": 4, "positions_per_step": 8, "steps": 2,
         "learning_rate": 0.002, "warmup_steps": 1, "eval_sequences": 2, "max_sequences": 8, "seed": 0, "threads": 1,
         "overwrite": False}
TOKENIZER = {"kind": "wordpiece", "vocab_size": 100, "output_dir": "{root}/student tokenizer"}
DECODER = {"output_dir": "{root}/decoder", "corpus": CORPUS, "tokenizer": "bpe", "vocab_size": 300, "family": "gpt2",
           "layers": 1, "hidden": 16, "heads": 2, "intermediate": 32, "max_length": 16, "steps": 2, "batch_size": 2,
           "learning_rate": 0.002, "warmup_steps": 1, "weight_decay": 0.01, "eval_rows": 2, "seed": 0, "threads": 1,
           "overwrite": False, "student_tokenizers": [TOKENIZER]}
SKIP = {"corpus.split/type": "null only: a text corpus has no splits (its own case: corpus.split/newline)"}
DECODER_SKIP = {**SKIP, "seed/range": "torch takes any integer seed (the decoder draws no numpy numbers)"}


def teacher_folder(path: Path) -> None:
    """Another stage's artefact: a complete masked-LM teacher folder, with its report."""
    make_tiny_bert(path, task="masked_lm", layers=1, seed=1)
    (path / "teacher_report.json").write_text(json.dumps({"config_hash": "another"}))


def transfer_set(path: Path) -> None:
    """Another stage's artefact: a folder data_pipeline wrote (its manifest and a shard)."""
    (path / "shards").mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format_version": 3, "shards": []}))
    (path / "shards" / "shard-00000-of-00001.parquet").write_bytes(b"PAR1")


def holding(content: bytes, encoder: str = ""):
    """A file of `content`, or with `encoder` the encoder folder whose file `encoder` holds `content`."""
    def make(path: Path) -> None:
        if encoder:
            make_tiny_bert(path, task="base", layers=1, seed=0)
        (path / encoder if encoder else path).write_bytes(content)
    return make


def data_case(field: str, what: str, build, *words: str) -> tuple[Case, tuple[str, ...]]:
    """(`field` set to what `build(path)` makes, the words its error must hold besides the field: file and line)."""
    return Case(f"{field}/{what}", (f"'{field}'",), config=((field, _maker(field, what, build)),)), words


def tokenizer_case(what: str, names: tuple[str, ...], **change) -> Case:
    """student_tokenizers holding one spec with `change` (a callable value is made in the workspace)."""
    def specs(workspace: Path) -> list:
        spec = {**TOKENIZER, "output_dir": str(workspace / "student tokenizer")}
        return [{**spec, **{k: v(workspace) if callable(v) else v for k, v in change.items()}}]
    return Case(f"student_tokenizers[0].{what}", names, config=(("student_tokenizers", specs),))


PICKLE = b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00]\x94\x8c\x04text\x94a."  # pickle.dumps(["text"])
CORPUS_DATA = [
    data_case("corpus.path", "line 1 not UTF-8", holding(NOT_UTF8), "line-1-not-UTF-8: line 1: invalid utf-8"),
    data_case("corpus.path", "line 2 not UTF-8", holding(b"a first line\n" + NOT_UTF8), "UTF-8: line 2: invalid"),
    data_case("corpus.path", "no text", holding(b"\n  \n"), "no-text: empty input"),
    data_case("corpus.path", "a pickle", holding(PICKLE), "a-pickle: refusing to read a pickle"),
]
DATA = CORPUS_DATA + [
    data_case("encoder", "config.json not UTF-8", holding(NOT_UTF8, "config.json"), "config.json: line 1"),
    data_case("encoder", "tokenizer.json not UTF-8", holding(NOT_UTF8, "tokenizer.json"), "tokenizer.json: line 1"),
]
CASES = (field_cases(TeacherPrepConfig, VALID, skip=SKIP) + path_cases("output_dir", "output", artefact=transfer_set)
         + path_cases("encoder", "folder")
         + [c for c in path_cases("encoder", "output", artefact=transfer_set) if c.label != "encoder/a file"]
         + path_cases("corpus.path", "text") + flag_cases(parser()) + config_cases() + [case for case, _ in DATA])
OUT = "student_tokenizers[0].output_dir"
DECODER_CASES = (
    field_cases(DecoderPrepConfig, DECODER, skip=DECODER_SKIP)
    + path_cases("output_dir", "output", artefact=teacher_folder) + path_cases("corpus.path", "text")
    + flag_cases(decoder_parser()) + config_cases() + [case for case, _ in CORPUS_DATA]
    + [tokenizer_case("kind/type", ("'student_tokenizers[0].kind'",), kind="no such choice"),
       tokenizer_case("vocab_size/type", ("'student_tokenizers[0].vocab_size'",), vocab_size="seven"),
       tokenizer_case("vocab_size/range", ("'student_tokenizers[0].vocab_size'",), vocab_size=-1),
       tokenizer_case("output_dir/newline", (f"'{OUT}'",), output_dir="a\nb"),
       tokenizer_case("output_dir/inside output_dir", (f"'{OUT}'",), output_dir=lambda ws: str(ws / "decoder" / "t"))]
    + [tokenizer_case(f"output_dir/{what}", (OUT,), output_dir=_maker(OUT, what, build))
       for what, build in {**PATH_KINDS["output"], "another stage's artefact": teacher_folder}.items()])
STAGES = ((main, VALID, CASES, DATA, ""), (decoder_main, DECODER, DECODER_CASES, CORPUS_DATA, "decoder "))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher fuzz")  # a space in every path
    make_tiny_bert(root / "encoder", task="base", layers=1, seed=0)
    lines = gensim_test_data("lee_background.cor").read_text(encoding="utf-8").splitlines()[:40]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A mutation the checks let through fails its case here, before the first write: the masked-LM stage once
    its corpus is packed (what it reads), the decoder once its corpus is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checks let the mutation through: training would start")
    for name in ("teacher.prepare_mlm.extract_features", "teacher.prepare_decoder.save_student_tokenizer",
                 "teacher.prepare_decoder._prepare"):
        monkeypatch.setattr(name, refuse)


def test_the_valid_configs_pass_every_input_check(workspace):
    """So each case below is refused for its own mutation, and a path with a space in it is a legal path."""
    config = workspace / "config.yaml"
    write_case(Case("valid", ()), VALID, workspace, config)
    check_inputs(load_config(config, TeacherPrepConfig), str(config))
    write_case(Case("valid", ()), DECODER, workspace, config)
    check_corpus(load_config(config, DecoderPrepConfig).corpus, str(config))
    assert run_main(decoder_main, ["--config", str(config), "--check"]) == (0, f"{config}: valid\n")
    config.unlink()


@pytest.mark.parametrize("stage,valid,case", [pytest.param(stage, valid, case, id=prefix + case.label)
                                              for stage, valid, cases, _, prefix in STAGES for case in cases])
def test_each_bad_field_is_refused_in_one_line(workspace, stage, valid, case):
    assert_refused(stage, case, valid, workspace)


@pytest.mark.parametrize("stage,valid,case,words", [pytest.param(stage, valid, case, words, id=prefix + case.label)
                                                    for stage, valid, _, data, prefix in STAGES
                                                    for case, words in data])
def test_a_bad_data_file_is_named_with_its_line(workspace, stage, valid, case, words):
    error = assert_refused(stage, case, valid, workspace)
    words = (f"{workspace / 'config.yaml'}: field", *words)  # which config, which field, which file and line
    assert all(w in error for w in words), f"{case}: the error does not hold {words}: {error}"
