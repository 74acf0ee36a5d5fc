"""Bad input to `python -m data_pipeline` (issue 33): every field of its config (the corpus and task readers' sections
included), every flag of its own and a few of Beam's, wrong in each way tests/fuzz.py knows, ends in exit 2 with one
`error:` line naming it, before any work and with no file changed; Beam's documented options and paths with spaces
or shell characters pass. Fast: nothing here reaches Beam (a case that did would fail the no-new-file check)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from data_pipeline import pipeline
from data_pipeline.__main__ import main, parser
from data_pipeline.config import PipelineConfig
from kdlib.tasks.readers import TaskConfig
from tests.fuzz import (NEWLINE, NOT_UTF8, Case, assert_refused, config_cases, field_cases, flag_cases, path_cases,
                        run_main, write_case)
from tests.tiny_models import make_tiny_bert

TEACHER = {"path": "{root}/teacher", "task": "masked_lm", "trust_remote_code": False, "attn_implementation": "eager"}
COMMON = {"teacher": TEACHER, "output_dir": "{root}/out", "labels": [], "task_type": "classification",
          "keep_text": False, "char_offsets": False, "max_length": 32, "min_length": 8,
          "augment": {"copies": 0, "seed": 0, "mask_prob": 0.1, "pos_swap_prob": 0.1, "ngram_prob": 0.25,
                      "ngram_min": 1, "ngram_max": 5, "mlm_replace_prob": 0.0, "mlm_top_k": 15,
                      "mask_token": "[MASK]"},
          "augment_model": {"path": "{root}/teacher", "task": "masked_lm"}, "augment_unit": "line",
          "teacher_outputs": {"top_k": 4, "sampled_tokens": 0, "dense_logits": False, "hidden_layers": [1],
                              "pooled": "mean", "qkv_layers": [], "vector_encoding": "fp16", "topk_encoding": "fp16",
                              "fidelity_positions": 16},
          "batch_size": 4, "num_shards": 2, "pack_groups": 2, "torch_threads": 1, "seed": 0, "overwrite": False,
          "cache_root": None}
CORPUS = {**COMMON, "corpus": {"kind": "text", "path": "{root}/corpus.txt", "text_column": "text",
                               "text_mode": "line", "split": None, "max_documents": 20, "encoding": "utf-8"},
          "masking": {"prob": 0.15, "whole_word": True, "mask_fraction": 0.8, "random_fraction": 0.1, "rows": 1.0}}
TASK = {**COMMON, "labels": ["neg", "pos"], "keep_text": True,
        "task": {"kind": "csv", "path": "{root}/task.csv", "text_column": "text", "label_column": "label",
                 "text_b_column": None, "id_column": None, "max_examples": 20, "encoding": "utf-8"}}
SKIP = {
    "seed/range": "any integer seeds the masking",
    "augment.seed/range": "any integer seeds the augmentation",
}


def made(name: str, build: Callable[[Path, Path], None]) -> Callable[[Path], str]:
    """A path the case makes under the workspace with `build(path, workspace)` (tests/fuzz.py's makers get no
    workspace, and these copy the teacher from it)."""
    def make(workspace: Path) -> str:
        path = workspace / f"fuzz-{name}"
        if not path.exists():
            build(path, workspace)
        return str(path)
    return make


def other_build(path: Path, _workspace: Path) -> None:
    """This stage's own interrupted build, from other inputs: refused without overwrite."""
    path.mkdir()
    (path / "build.json").write_text(json.dumps({"teacher_fingerprint": "0" * 64, "tokenizer_fingerprint": "0" * 64,
                                                 "config_hash": "0" * 64}))


def task_bad_line_4(path: Path, _workspace: Path) -> None:
    path.write_bytes(b"text,label\ngood words,pos\nmore words,neg\n" + NOT_UTF8.rstrip() + b",pos\n")


def teacher_with(name: str, spoil: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    """The workspace's teacher with one of its files not UTF-8 any more."""
    def build(path: Path, workspace: Path) -> None:
        shutil.copytree(workspace / "teacher", path)
        (path / name).write_bytes(spoil((path / name).read_bytes()))
    return build


def field_case(label: str, field: str, maker: Callable[[Path], str]) -> Case:
    return Case(label, (f"'{field}'", f"{field}:"), config=((field, maker),))


def flag(label: str, *argv: str, names: tuple[str, ...] = ()) -> Case:
    return Case(label, names or (label.split("/")[0],), argv=argv)


DASK = ("--runner", "dask")


def scheduler_file(what: str) -> Case:
    """--scheduler-file naming a file the workspace fixture made."""
    return flag(f"--scheduler-file/{what}", *DASK, "--scheduler-file", f"{{root}}/scheduler-{what.replace(' ', '-')}")


BAD_CONFIG_JSON = field_case("teacher.path/config.json not UTF-8", "teacher.path", made("config-json", teacher_with(
    "config.json", lambda data: data.replace(b"{", b"{\n  \"note\": \"" + NOT_UTF8.rstrip() + b"\",", 1))))
BAD_TOKENIZER = field_case("teacher.path/tokenizer.json not UTF-8", "teacher.path", made("tokenizer-json", teacher_with(
    "tokenizer.json", lambda data: data.replace(b'"[UNK]"', b'"[UNK\xe9]"', 1))))
TASK_LINE_4 = field_case("task.path/not UTF-8 on line 4", "task.path", made("task-line-4.csv", task_bad_line_4))
FLAGS = flag_cases(parser()) + [
    flag("--runner/not a runner", "--runner", "NoSuchRunner"),
    flag("--runner/a module that is not there", "--runner", "no_such_module.Runner"),
    flag("--scheduler/newline in a dask run", *DASK, "--scheduler", NEWLINE),
    flag("--scheduler/trailing newline", *DASK, "--scheduler", "tcp://node1:8786\n"),
    flag("--scheduler/port 0", *DASK, "--scheduler", "tcp://node1:0"),
    flag("--scheduler/port 70000", *DASK, "--scheduler", "tcp://node1:70000"),
    flag("--scheduler/no scheme", *DASK, "--scheduler", "node1:8786"),
    flag("--local-workers/0", *DASK, "--local-workers", "0"),
    flag("--local-workers/-1", *DASK, "--local-workers", "-1"),
    flag("--local-workers/257", *DASK, "--local-workers", "257"),
    flag("--local-workers/without dask", "--local-workers", "2"),
    flag("--min-workers/0", *DASK, "--min-workers", "0"),
    flag("--min-workers/-1", *DASK, "--min-workers", "-1"),
    flag("--min-workers/without dask", "--min-workers", "2"),
    flag("--scheduler-file/and --local-workers", *DASK, "--scheduler-file", "{root}/x.json", "--local-workers", "1"),
    scheduler_file("missing"), scheduler_file("a folder"), scheduler_file("not UTF-8"),
    scheduler_file("not a scheduler's"),
    flag("--config/missing", "--config", "{root}/no-such.yaml", names=("no-such.yaml",)),
    flag("--config/a folder", "--config", "{root}/teacher", names=("teacher: is a folder",)),
    flag("--set/no equals sign", "--set", "max_length"),
    flag("--set/into a value", "--set", "max_length.x=1", names=("max_length",)),
    flag("--set/an unknown field", "--set", "max_lenght=9", names=("max_lenght",)),
    # Beam's own options: a value its parser refuses is one line naming the option, not Beam's usage of them all
    flag("--direct_num_workers/type", "--direct_num_workers", "seven"),
    flag("--direct_running_mode/choice", "--direct_running_mode", "no-such-mode"),
    flag("--direct_num_workers/no value", "--direct_num_workers"),
    flag("--dask_npartitions/type", *DASK, "--dask_npartitions", "seven"),
    flag("--dask_npartitionz/mistyped", *DASK, "--dask_npartitionz=4"),
    flag("stray/a positional word", "stray"),
]
CORPUS_CASES = (field_cases(PipelineConfig, CORPUS, skip=SKIP)
                + path_cases("output_dir", "output", artefact=lambda path: make_tiny_bert(path, layers=1, seed=1))
                + [field_case("output_dir/other inputs' build", "output_dir", made("other-build", other_build))]
                + path_cases("teacher.path", "folder") + [BAD_CONFIG_JSON, BAD_TOKENIZER]
                + path_cases("augment_model.path", "folder") + path_cases("corpus.path", "text")
                + path_cases("cache_root", "output") + config_cases() + FLAGS)
TASK_CASES = (field_cases(TaskConfig, TASK["task"], skip=SKIP, prefix="task.") + path_cases("task.path", "text")
              + [TASK_LINE_4])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-pipeline-fuzz")
    make_tiny_bert(root / "teacher", layers=1, seed=0)
    (root / "corpus.txt").write_text("the cat sat on the mat\n" * 20)
    (root / "task.csv").write_text("text,label\n" + "a good film,pos\na bad film,neg\n" * 10)
    (root / "scheduler-a-folder").mkdir()
    (root / "scheduler-not-UTF-8").write_bytes(b'{"address":\n"tcp://' + NOT_UTF8.rstrip() + b'"}')
    (root / "scheduler-not-a-scheduler's").write_text('{"type": "Scheduler"}')
    return root


@pytest.mark.parametrize("case", CORPUS_CASES, ids=str)
def test_each_bad_field_or_flag_is_refused_in_one_line(workspace, case):
    assert_refused(main, case, CORPUS, workspace)


@pytest.mark.parametrize("case", TASK_CASES, ids=str)
def test_each_bad_field_of_a_task_set_is_refused_in_one_line(workspace, case):
    assert_refused(main, case, TASK, workspace)


def by_label(label: str) -> Case:
    return next(case for case in CORPUS_CASES + TASK_CASES if case.label == label)


@pytest.mark.parametrize("case,valid,file", [
    (by_label("corpus.path/not UTF-8"), CORPUS, "fuzz-corpus-path-not-UTF-8"),
    (TASK_LINE_4, TASK, "fuzz-task-line-4.csv"),
    (by_label("--scheduler-file/not UTF-8"), CORPUS, "scheduler-not-UTF-8"),
    (BAD_CONFIG_JSON, CORPUS, "fuzz-config-json/config.json"),
    (BAD_TOKENIZER, CORPUS, "fuzz-tokenizer-json/tokenizer.json"),
], ids=lambda value: value.label if isinstance(value, Case) else None)
def test_a_data_file_that_is_not_utf8_is_named_with_its_line(workspace, case, valid, file):
    error = assert_refused(main, case, valid, workspace)
    data = (workspace / file).read_bytes()
    line = data[:data.index(0xE9)].count(b"\n") + 1
    assert str(workspace / file) in error and f"line {line}:" in error, error


@pytest.mark.parametrize("argv", [
    ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"],  # README: Building a transfer set
    ["--runner", "DataflowRunner", "--project", "P", "--region", "R", "--temp_location", "gs://B/tmp",
     "--requirements_file", "requirements.txt", "--experiments", "use_runner_v2", "--sdk_container_image", "img"],
    ["--runner", "FlinkRunner", "--flink_master", "host:8081", "--environment_type", "DOCKER", "--parallelism", "4"],
    ["--runner", "SparkRunner", "--spark_master_url", "spark://host:7077", "--environment_type", "DOCKER"],
    ["--runner", "portable"],  # Beam's own matching: any case, "Runner" optional
    ["--runner", "apache_beam.runners.direct.direct_runner.DirectRunner"],
    ["--runner", "dask", "--local-workers", "2"],
    ["--runner", "dask", "--scheduler", "tcp://node1:8786", "--min-workers", "3", "--dask_npartitions", "4"],
    ["--runner", "dask", "--scheduler-file", "{root}/scheduler.json", "--min-workers", "8"],
], ids=lambda argv: " ".join(argv[:2]))
def test_beams_documented_options_and_the_runner_flags_pass_the_check(workspace, argv):
    (workspace / "scheduler.json").write_text('{"type": "Scheduler", "address": "tcp://10.0.0.1:8786"}')
    config = workspace / "config.yaml"
    write_case(Case("valid", ()), CORPUS, workspace, config)
    code, printed = run_main(main, ["--config", str(config), "--check",
                                    *(word.replace("{root}", str(workspace)) for word in argv)])
    assert (code, printed.strip().splitlines()[-1]) == (0, f"{config}: valid"), printed


def test_paths_with_spaces_and_shell_characters_are_used_as_typed(workspace, tmp_path, monkeypatch):
    """Every path field, and the config's own path, holding spaces, quotes, `$( )`, backquotes and a `;`: read as
    one path each, up to where Beam would start (stubbed here: the pipeline's own tests build sets)."""
    odd = tmp_path / "a b $(touch pwned) `touch pwned2`; it's \"odd\""
    odd.mkdir()
    shutil.copytree(workspace / "teacher", odd / "my teacher")
    (odd / "my corpus.txt").write_text("the cat sat on the mat\n" * 20)
    valid = {**CORPUS, "teacher": {**TEACHER, "path": "{root}/my teacher"},
             "augment_model": {"path": "{root}/my teacher", "task": "masked_lm"},
             "corpus": {**CORPUS["corpus"], "path": "{root}/my corpus.txt"}, "output_dir": "{root}/out put"}
    built = []
    monkeypatch.setattr(pipeline, "_build", lambda cfg, beam_args, out, info, runner: built.append(
        (out, cfg.teacher.path, cfg.corpus.path, info["folder"])))
    config = odd / "my config.yaml"
    write_case(Case("valid", ()), valid, odd, config)
    monkeypatch.chdir(tmp_path)
    code, printed = run_main(main, ["--config", str(config)])
    assert code == 0, printed
    assert built == [(odd / "out put", str(odd / "my teacher"), str(odd / "my corpus.txt"), odd / "my teacher")]
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))
