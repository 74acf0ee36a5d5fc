"""Bad input to `python -m finetune` (issue 33): every field and flag, wrong in each way tests/fuzz.py knows, ends
in exit 2 with one `error:` line naming it, and no file changes; each step's flags and output folder alike; a data
file that is not UTF-8 is named with its line; paths with a space are accepted."""

from __future__ import annotations

import dataclasses
import json

import pytest

from finetune.__main__ import build_parser, main
from finetune.config import FinetuneConfig
from finetune.layout import STEPS
from tests.finetune_fixture import write_task, write_topic_task
from tests.fuzz import (NOT_UTF8, PATH_KINDS, Case, _maker, assert_refused, config_cases, field_cases, flag_cases,
                        path_cases, run_main)
from tests.tiny_models import make_tiny_bert

ENGINE = {"zero_stage": 0, "precision": "fp32", "micro_batch": 4, "grad_accum": 1, "gradient_clipping": 1.0,
          "logit_chunk_size": 64, "optim": {"learning_rate": 0.003, "weight_decay": 0.0, "warmup_steps": 2,
                                            "layer_decay": 1.0}}  # no eps: JSON's 1e-08 is a string to YAML 1.1
VALID = {
    "output_dir": "{root}/run", "labels": [], "task_type": "classification", "max_length": 32, "tasks": [],
    "task": {"kind": "fasttext", "path": "{root}/task.txt", "text_column": "text", "label_column": "label",
             "text_b_column": None, "max_examples": 40, "encoding": "utf-8"},
    "teacher": {"init": "{root}/encoder", "finetuned": None, "steps": 30, "eval_every": 5, "patience": 2,
                "engine": ENGINE, "seeds": [], "trust_remote_code": False},
    "transfer": {"augment": {"copies": 0, "seed": 0, "mask_prob": 0.1, "pos_swap_prob": 0.1, "ngram_prob": 0.25,
                             "ngram_min": 1, "ngram_max": 5, "mlm_top_k": 15, "mask_token": "[MASK]"},
                 "augment_model": None, "hidden_layers": [], "num_shards": 2, "batch_size": 8, "torch_threads": 1,
                 "tokenize_per_model": False, "unlabeled": 0},
    "student": {"path": None, "shape": {"num_layers": 1, "init": "every_other"}, "trust_remote_code": False},
    "distill": {"method": "kd", "steps": 24, "eval_every": 8, "engine": ENGINE, "online_teacher": False,
                "layer_map": None, "hard_labels": "original", "phases": [],
                "theseus": {"successor_layers": 1, "replacement_start": 0.3, "replacement_end": 1.0,
                            "replacement_steps": 0, "train_embeddings": False, "train_head": False},
                "multi_teacher": {"combine": "mean_logits", "weights": [], "temperature": 1.0},
                "objectives": [{"name": "kd_kl", "weight": 0.5, "params": {"temperature": 2.0}},
                               {"name": "hard_ce", "weight": 0.5}]},
    "baseline": {"enabled": True},
    "evaluation": {"mode": "folds", "folds": 2, "seeds": [0], "split_seed": 0, "validation_fraction": 0.1,
                   "speed_batch": 8, "speed_threads": 1, "speed_repeats": 1, "labelled": None, "max_valid": None},
    "deploy": {"enabled": False, "threads": 1, "speed_length": 16, "speed_batches": [1, 4], "repeats": 1},
    "multitask": {"sampling": {"alpha": 0.5, "anneal_steps": 0}, "single_task": True,
                  "adashare": {"enabled": False, "search_steps": 300, "warmup_fraction": 0.2,
                               "curriculum_fraction": 0.5, "policy_learning_rate": 0.01, "temperature_start": 5.0, "temperature_end": 0.5,
                               "sparsity_weight": 0.05, "sharing_weight": 0.05, "policy": "sample", "candidates": 8,
                               "min_layers": 1}},
    "threads": 1, "progress_bar": False,
}
SKIP = {
    "transfer.augment.seed/range": "any integer seeds the augmentation",
    "evaluation.split_seed/range": "any integer seeds the split",
}
NEEDS: dict[str, str] = {}  # cases accepted today for want of a check in a shared module: none left


def transfer_set(folder) -> None:
    """A transfer set as data_pipeline leaves it: another stage's artefact."""
    (folder / "shards").mkdir(parents=True)
    (folder / "manifest.json").write_text('{"format_version": 1}\n')
    (folder / "shards" / "shard-00000-of-00001.parquet").write_bytes(b"PAR1")


def bad_config_json(folder) -> None:
    """A model folder whose config.json is Latin-1."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(b'{"model_type": "bert",\n "note": "' + NOT_UTF8.strip() + b'"}\n')
    (folder / "model.safetensors").write_bytes(b"")


def jsonl_bad_third_line(path) -> None:
    path.write_bytes(b'{"text": "good film", "label": "pos"}\n{"text": "bad film", "label": "neg"}\n' + NOT_UTF8)


def case(label: str, field: str, *config, argv: tuple = ()) -> Case:
    return Case(label, (f"'{field}'", f"{field}:"), config=tuple(config), argv=argv)


def made(field: str, what: str, build) -> tuple:
    """(field, a path made at run time by `build`) for a Case's config."""
    return field, _maker(field, what, build)


def model_path_cases() -> list[Case]:
    """Each model-folder field: missing, a file, a folder of someone's notes (path_cases lacks the last)."""
    out = []
    for field, extra in (("teacher.init", ()), ("teacher.finetuned", (("teacher.init", None),)), ("student.path", ()),
                         ("transfer.augment_model", (("transfer.augment.mlm_replace_prob", 0.1),))):
        notes = made(field, "not a model", PATH_KINDS["output"]["the user's folder"])
        cases = path_cases(field, "folder") + [case(f"{field}/not a model", field, notes)]
        out += [dataclasses.replace(c, config=extra + c.config) for c in cases]
    return out


def two_tasks(workspace, second: dict | None = None, name: str = "topic") -> list[dict]:
    topic = workspace / "topic.jsonl"
    if not topic.exists():
        write_topic_task(topic)
    return [{"name": "polarity", "task": {"kind": "fasttext", "path": str(workspace / "task.txt")}},
            {"name": name, "task": second or {"kind": "jsonl", "path": str(topic), "text_column": "sentence",
                                              "label_column": "topic"}}]


def with_tasks(second=None, name: str = "topic") -> tuple:
    """("tasks", a maker of the polarity task and `second(workspace)` (default: the topic task) named `name`)."""
    return "tasks", lambda ws: two_tasks(ws, second(ws) if second else None, name)


def jsonl_task(what: str, build):
    """A maker of a jsonl task entry whose file `build(path)` makes."""
    return lambda ws: {"kind": "jsonl", "path": _maker("tasks", what, build)(ws)}


def multitask_cases() -> list[Case]:
    """A multi-task config's task files and task names."""
    return [case("tasks[1].task.path/not UTF-8", "tasks[1].task.path", ("task", None),
                 with_tasks(jsonl_task("not UTF-8", lambda p: p.write_bytes(NOT_UTF8)))),
            case("tasks[1].task.path/missing", "tasks[1].task.path", ("task", None),
                 with_tasks(jsonl_task("missing", lambda p: None))),
            case("tasks[1].name/space", "tasks[1].name", ("task", None), with_tasks(name="my topic")),
            case("tasks[1].name/newline", "tasks[1].name", ("task", None), with_tasks(name="to\npic"))]


def multitask_output_cases() -> list[Case]:
    """A multi-task output_dir is checked as a whole, not only each task's subfolder in it (which a transfer set or
    a file would not hold)."""
    return [dataclasses.replace(c, label=f"tasks {c.label}", config=(("task", None), with_tasks()) + c.config)
            for c in path_cases("output_dir", "output", artefact=transfer_set)]


def flag_range_cases() -> list[Case]:
    """--fold / --seed / --arm values the config does not have, under --check too (flag_cases tries words only)."""
    return [Case("--fold/range", ("--fold",), argv=("--fold", "7")),
            Case("--fold/negative", ("--fold",), argv=("--fold", "-1")),
            Case("--seed/range", ("--seed",), argv=("--seed", "9")),
            Case("--arm/disabled", ("--arm",), config=(("baseline.enabled", False),), argv=("--arm", "baseline")),
            Case("--check --fold/range", ("--fold",), argv=("--check", "--fold", "7"))]


def marked(cases: list[Case]) -> list:
    """Cases needing a shared change, as strict xfails run with --check (accepted, they would train for minutes)."""
    return [pytest.param(dataclasses.replace(c, argv=c.argv + ("--check",)), id=c.label,
                         marks=pytest.mark.xfail(strict=True, reason=f"needs {NEEDS[c.label]}"))
            if c.label in NEEDS else pytest.param(c, id=c.label) for c in cases]


OUTPUT_CASES = path_cases("output_dir", "output", artefact=transfer_set) + multitask_output_cases()
CASES = (field_cases(FinetuneConfig, VALID, skip=SKIP) + OUTPUT_CASES + path_cases("task.path", "text")
         + model_path_cases() + multitask_cases() + flag_cases(build_parser()) + flag_range_cases() + config_cases())
STEP_CASES = [pytest.param(step, c, id=f"{step} {c.label}") for step in STEPS
              for c in flag_cases(build_parser()) + flag_range_cases() + OUTPUT_CASES]
DATA_FILES = [  # (case, the file its error must name, under the workspace, and the line)
    (case("task.path/not UTF-8", "task.path", made("task.path", "latin-1", lambda p: p.write_bytes(NOT_UTF8))),
     "fuzz-task-path-latin-1", 1),
    (case("task.path/jsonl line 3", "task.path", ("task.kind", "jsonl"),
          made("task.path", "jsonl line 3", jsonl_bad_third_line)), "fuzz-task-path-jsonl-line-3", 3),
    (multitask_cases()[0], "fuzz-tasks-not-UTF-8", 1),
    (case("teacher.init/config.json not UTF-8", "teacher.init", made("teacher.init", "latin-1", bad_config_json)),
     "fuzz-teacher-init-latin-1/config.json", 2),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-fuzz")
    make_tiny_bert(root / "encoder", layers=2, seed=0)
    write_task(root / "task.txt")
    return root


@pytest.mark.parametrize("case", marked(CASES))
def test_each_bad_field_is_refused_in_one_line(workspace, case):
    assert_refused(main, case, VALID, workspace)


@pytest.mark.parametrize("step,case", STEP_CASES)
def test_each_step_refuses_bad_flags_and_output_folders(workspace, step, case):
    assert_refused(main, case, VALID, workspace, argv_before=(step,))


@pytest.mark.parametrize("case,file,line", [
    pytest.param(dataclasses.replace(c, argv=("--check",)), file, n, id=c.label,
                 marks=[pytest.mark.xfail(strict=True, reason=f"needs {NEEDS[c.label]}")] if c.label in NEEDS else [])
    for c, file, n in DATA_FILES])
def test_a_data_file_that_is_not_utf8_is_named_with_its_line(workspace, case, file, line):
    error = assert_refused(main, case, VALID, workspace)
    assert f"{workspace / file}: line {line}:" in error, error


def test_paths_with_a_space_are_accepted_and_kept_whole(tmp_path):
    root = tmp_path / "my data"
    make_tiny_bert(root / "an encoder", layers=2, seed=0)
    write_task(root / "the task.txt")
    data = json.loads(json.dumps(VALID).replace("{root}/encoder", "{root}/an encoder")
                      .replace("{root}/task.txt", "{root}/the task.txt").replace("{root}/run", "{root}/my run")
                      .replace("{root}", str(root)))
    config = root / "my config.yaml"
    config.write_text(json.dumps(data))
    assert run_main(main, ["--config", str(config), "--check"])[0] == 0
    code, printed = run_main(main, ["folds", "--config", str(config)])
    assert code == 0, printed
    assert sorted(p.name for p in (root / "my run" / "folds" / "fold-1").iterdir()) == ["test.jsonl", "train.jsonl",
                                                                                     "valid.jsonl"]


def test_a_multitask_output_dir_of_its_own_is_accepted_again(workspace, tmp_path):
    data = json.loads(json.dumps(VALID).replace("{root}", str(workspace)))
    data.update(task=None, output_dir=str(tmp_path / "multi"), tasks=two_tasks(workspace))
    config = tmp_path / "multi.yaml"
    config.write_text(json.dumps(data))
    assert run_main(main, ["folds", "--config", str(config)])[0] == 0
    (tmp_path / "multi" / "multitask" / "fold-0").mkdir(parents=True)  # as the multi-task students leave it
    code, printed = run_main(main, ["folds", "--config", str(config)])
    assert code == 0 and sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["multitask", "polarity", "topic"]


def test_an_output_dir_holding_only_the_slurm_launchers_logs_is_its_own(workspace, tmp_path):
    """`python -m launch slurm` makes output_dir/slurm/ before the job's first step runs."""
    data = json.loads(json.dumps(VALID).replace("{root}", str(workspace)))
    data["output_dir"] = str(tmp_path / "run")
    (tmp_path / "run" / "slurm" / "job-1").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(data))
    code, printed = run_main(main, ["folds", "--config", str(config)])
    assert code == 0, printed
    assert (tmp_path / "run" / "folds" / "labels.json").is_file()
