"""Bad input to `python -m pretrain` (issue 33): every field and flag, wrong in each way tests/fuzz.py knows, ends
in exit 2 with one `error:` line naming it, and no file changes, before DeepSpeed starts: the valid config passes
validation and would train, so `train` is stubbed to fail the case loudly if a mutation ever gets that far. The
workspace's name has a space in it, so every path of the valid config holds one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlib.cache.manifest import MANIFEST
from kdlib.losses.objectives import ObjectiveConfig
from pretrain.__main__ import main, parser
from pretrain.config import PretrainConfig
from tests.fuzz import (NOT_UTF8, PATH_KINDS, Case, _maker, assert_refused, config_cases, field_cases, flag_cases,
                        path_cases, run_main, write_case)
from tests.tiny_models import make_tiny_bert
from tests.transfer_fixture import build_transfer_set

OPTIM = {"learning_rate": 0.003, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 0.0001, "warmup_steps": 2,
         "decay_steps": None, "layer_decay": 1.0, "implementation": "torch"}
ENGINE = {"zero_stage": 2, "precision": "fp32", "micro_batch": 8, "grad_accum": 2, "global_batch": None,
          "gradient_clipping": 1.0, "dist_backend": "auto", "deepspeed_json": None, "optim": OPTIM,
          "chunked_logits": "auto", "logit_chunk_size": 256}
STUDENT = {"num_layers": 2, "hidden_size": None, "num_attention_heads": None, "intermediate_size": None,
           "init": "random", "init_layers": [], "architecture": "bert", "bottleneck": None, "config": None,
           "tokenizer": None}
OBJECTIVES = [{"name": "kd_topk", "weight": 1.0, "params": {"temperature": 2.0}, "weight_schedule": None,
               "temperature_schedule": None},
              {"name": "mlm_ce", "weight": 0.5}]
VALID = {"teacher": {"path": "{root}/teacher", "task": "masked_lm", "trust_remote_code": False,
                     "attn_implementation": None},
         "transfer_set": "{root}/transfer", "output_dir": "{root}/out", "objectives": OBJECTIVES, "student": STUDENT,
         "online_teacher": False, "layer_map": None, "engine": ENGINE, "eval_rows": 64, "progressive": None,
         "steps": 6, "seed": 0, "eval_every": 0, "checkpoint_every": 3, "keep_checkpoints": 3, "log_every": 1,
         "progress_bar": False, "threads": 1, "resume": True, "prefetch": 2, "early_stopping": None}


def item_cases(cls: type, items: list, field: str, index: int = 0) -> list[Case]:
    """field_cases for item `index` of list field `field` (tests/fuzz.py walks dataclasses, not lists): each sets
    the whole list with that item mutated, and must name `<field>[<index>].<key>`."""
    out = []
    for case in field_cases(cls, items[index], prefix=f"{field}[{index}]."):
        (dotted, value), = case.config
        changed = json.loads(json.dumps(items))
        *parents, leaf = dotted[len(f"{field}[{index}]."):].split(".")
        node = changed[index]
        for key in parents:
            node = node[key]
        node[leaf] = value
        out.append(Case(case.label, case.names, config=((field, changed),)))
    return out


def transfer_set(path: Path) -> None:
    """Another stage's artefact: a folder data_pipeline wrote (its manifest and a shard)."""
    (path / "shards").mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format_version": 3, "shards": []}))
    (path / "shards" / "shard-00000-of-00001.parquet").write_bytes(b"PAR1")


def model_folder(path: Path) -> None:
    """Another stage's artefact: a model folder (`python -m teacher`'s, or a finetune export)."""
    make_tiny_bert(path, task="masked_lm", layers=1, seed=1)


def with_file(make, name: str, content: bytes):
    """`make(path)`, then file `name` in it replaced by `content` (a damaged or foreign artefact)."""
    def build(path: Path) -> None:
        make(path)
        (path / name).write_bytes(content)
    return build


def data_case(field: str, what: str, build, *words: str) -> tuple[Case, tuple[str, ...]]:
    """(`field` set to what `build(path)` makes, the words its error must hold besides the field: file and line)."""
    return Case(f"{field}/{what}", (f"'{field}'",), config=((field, _maker(field, what, build)),)), words


def marked(params: list, xfail: dict[str, str]) -> list:
    """(id, *values) tuples as pytest.params, those whose id is in `xfail` marked strict xfail."""
    return [pytest.param(*values, id=name, marks=[pytest.mark.xfail(strict=True, reason=xfail[name])]
                         if name in xfail else []) for name, *values in params]


# --export-init DIR: made by the workspace fixture (argv cannot carry a maker), refused naming the flag
INIT_DIRS = {**PATH_KINDS["output"], "a model folder": model_folder, "a transfer set": transfer_set}
INIT_CASES = [Case(f"--export-init/{what}", ("--export-init",), argv=("--export-init", f"{{root}}/init {what}"))
              for what in INIT_DIRS] + [Case("--export-init/empty", ("--export-init",), argv=("--export-init", ""))]
SET_CASES = [Case("--set/no value", ("--set",), argv=("--set", "steps")),
             Case("--set/unknown field", ("'nosuch'",), argv=("--set", "nosuch=1")),
             Case("--set/into a number", ("--set",), argv=("--set", "steps.deeper=1"))]
DATA = [
    data_case("teacher.path", "config.json not UTF-8", with_file(model_folder, "config.json", NOT_UTF8),
              "config.json: line 1"),
    data_case("student.config", "config.json not UTF-8", with_file(model_folder, "config.json", NOT_UTF8),
              "config.json: line 1"),
    data_case("transfer_set", "manifest.json a list", with_file(transfer_set, MANIFEST, b"[1]"), "manifest.json: not"),
    data_case("transfer_set", "manifest.json not UTF-8", with_file(transfer_set, MANIFEST, NOT_UTF8),
              "manifest.json: line 1"),
    data_case("engine.deepspeed_json", "line 2 not UTF-8", lambda path: path.write_bytes(b"{\n" + NOT_UTF8),
              "line 2"),
]
# the optional sections, set: a layer map, progressive stages, early stopping, a bottleneck student, schedules
LAYERED = {**VALID, "online_teacher": True, "eval_every": 2,
           "layer_map": {"name": "uniform", "pairs": [], "include_embeddings": False, "emd_temperature": 1.0},
           "progressive": {"steps_per_layer": 1, "lower_layers_lr": 0.0},
           "early_stopping": {"metric": "top1_agreement", "mode": "max", "patience": 3, "min_delta": 0.0},
           "student": {**STUDENT, "architecture": "bottleneck", "hidden_size": 32, "bottleneck": {
               "intra_size": 8, "feedforward_networks": 2, "embedding_size": None, "trigram_input": False,
               "shared_query_key": True, "normalization": "layer_norm"}},
           "objectives": [OBJECTIVES[0],
                          {"name": "hidden_mse", "weight": 1.0, "params": {}, "temperature_schedule": None,
                           "weight_schedule": {"name": "linear", "start": 1.0, "end": 0.0, "milestones": [],
                                               "gamma": 0.1}},
                          {"name": "kd_kl", "weight": 1.0, "params": {"temperature": 2.0}, "weight_schedule": None,
                           "temperature_schedule": {"name": "cosine", "start": 2.0, "end": 1.0, "milestones": [],
                                                    "gamma": 0.1}}]}
SECTIONS = ("layer_map.", "progressive.", "early_stopping.", "student.bottleneck.")  # None in VALID
LAYERED_CASES = ([c for c in field_cases(PretrainConfig, LAYERED) if c.label.startswith(SECTIONS)]
                 + item_cases(ObjectiveConfig, LAYERED["objectives"], "objectives", 1)
                 + item_cases(ObjectiveConfig, LAYERED["objectives"], "objectives", 2)
                 + [Case("early_stopping.metric/unknown", ("'early_stopping.metric'",),
                         config=(("early_stopping.metric", "accuracy"),))])
XFAIL: dict[str, str] = {}  # label: a change a shared module still needs (none left)
XFAIL_WORDS: dict[str, str] = {}  # refused, but not yet naming the file and line (none left)
CASES = (field_cases(PretrainConfig, VALID) + item_cases(ObjectiveConfig, OBJECTIVES, "objectives")
         + path_cases("output_dir", "output", artefact=transfer_set)
         + path_cases("teacher.path", "folder")
         + [c for c in path_cases("teacher.path", "output", artefact=transfer_set) if c.label != "teacher.path/a file"]
         + path_cases("transfer_set", "folder")
         + [c for c in path_cases("transfer_set", "output", artefact=model_folder)
            if c.label != "transfer_set/a file"]
         + path_cases("student.config", "folder") + path_cases("engine.deepspeed_json", "text")
         + flag_cases(parser()) + INIT_CASES + SET_CASES + config_cases() + [case for case, _ in DATA])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain fuzz")  # a space in every path
    build_transfer_set(root, rows=96, teacher_steps=0)
    for what, make in INIT_DIRS.items():
        make(root / f"init {what}")
    return root


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A mutation that validation lets through fails its case here, before DeepSpeed or any write."""
    def refuse(*args, **kwargs):
        raise AssertionError("validation let the mutation through: training would start")
    monkeypatch.setattr("pretrain.train.train", refuse)


def test_the_valid_config_passes_validation(workspace):
    """So each case below is refused for its own mutation, and a path with a space in it is a legal path."""
    config = workspace / "config.yaml"
    for valid in (LAYERED, VALID):  # VALID last: the export below is of its student
        write_case(Case("valid", ()), valid, workspace, config)
        code, printed = run_main(main, ["--config", str(config), "--check"])
        assert code == 0 and printed.strip().endswith("valid for 1 rank(s)"), printed
    for _ in range(2):  # the second replaces the first export, which it knows by its stamp
        code, printed = run_main(main, ["--config", str(config), "--export-init", str(workspace / "init export")])
        assert code == 0 and "untrained student written to" in printed, printed
    assert (workspace / "init export" / "model.safetensors").is_file()
    config.unlink()


@pytest.mark.parametrize("valid,case", marked([(case.label, valid, case) for valid, cases in
                                                 ((VALID, CASES), (LAYERED, LAYERED_CASES)) for case in cases], XFAIL))
def test_each_bad_field_is_refused_in_one_line(workspace, valid, case):
    assert_refused(main, case, valid, workspace)


@pytest.mark.parametrize("case,words", marked([(c.label, c, w) for c, w in DATA], {**XFAIL, **XFAIL_WORDS}))
def test_a_bad_data_file_is_named_with_its_line(workspace, case, words):
    error = assert_refused(main, case, VALID, workspace)
    words = (f"{workspace / 'config.yaml'}: field", *words)  # which config, which field, which file and line
    assert all(w in error for w in words), f"{case}: the error does not hold {words}: {error}"
