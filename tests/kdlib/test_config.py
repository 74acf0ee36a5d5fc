"""Every config mistake stops with one ConfigError naming the file, the field path and what was expected."""

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from kdlib.config import config_hash, from_dict, load_config
from kdlib.runtime.outputs import save_resolved
from kdlib.errors import ConfigError
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.schemas import StudentConfig, TeacherOutputsConfig, check_against_teacher
from kdlib.tasks.readers import TaskConfig
from data_pipeline.config import PipelineConfig
from pretrain.config import PretrainConfig
from report.config import ReportConfig
from teacher.prepare_decoder import DecoderPrepConfig
from teacher.prepare_mlm import TeacherPrepConfig

TEACHER_CONFIG = {"vocab_size": 30522, "num_hidden_layers": 6, "hidden_size": 384}


@dataclass
class Inner:
    rate: float = 0.1  # a probability

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate: expected a probability in [0, 1], got {self.rate}")


@dataclass
class Outer:
    name: str
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    layers: list[int] = field(default_factory=list)
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    maybe: Optional[int] = None


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, cls=Outer):
    with pytest.raises(ConfigError) as info:
        load_config(path, cls)
    return str(info.value)


def test_valid_yaml_and_json_build_nested_dataclasses(tmp_path):
    yaml_path = write(tmp_path, "name: x\ninner: {rate: 0.5}\nlayers: [1, 2]\nobjectives:\n  - {name: kd_kl, weight: 2.0}\n")
    cfg = load_config(yaml_path, Outer)
    assert cfg.inner.rate == 0.5 and cfg.layers == [1, 2] and cfg.objectives[0].weight == 2.0
    json_path = write(tmp_path, json.dumps({"name": "x", "inner": {"rate": 0.5}, "layers": [1, 2],
                                            "objectives": [{"name": "kd_kl", "weight": 2.0}]}), "c.json")
    assert config_hash(load_config(json_path, Outer)) == config_hash(cfg)


@pytest.mark.parametrize("text, field_path, expected", [
    ("name: x\nstepz: 3\n", "stepz", "unknown field; Outer accepts"),
    ("steps: 3\n", "name", "missing required field"),
    ("name: x\nsteps: three\n", "steps", "expected an integer, got 'three'"),
    ("name: x\nsteps: true\n", "steps", "expected an integer"),
    ("name: x\nmode: c\n", "mode", "expected one of 'a', 'b'"),
    ("name: x\ninner: {rate: 1.5}\n", "inner.rate", "expected a probability in [0, 1], got 1.5"),
    ("name: x\ninner: {rat: 0.1}\n", "inner.rat", "unknown field; Inner accepts: rate"),
    ("name: x\nlayers: [1, two]\n", "layers[1]", "expected an integer"),
    ("name: x\nmaybe: [1]\n", "maybe", "expected an integer"),
    ("name: x\nobjectives:\n  - {name: kd_kl, params: {temperature: -2.0}}\n", "objectives[0].params.temperature", "temperature"),
    ("name: x\nobjectives:\n  - {name: no_such_loss}\n", "objectives[0].name", "kd_kl"),
])
def test_each_mistake_names_file_field_and_expectation(tmp_path, text, field_path, expected):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: field '")
    assert f"'{field_path}'" in message or f"'{field_path.rsplit('.', 1)[0]}'" in message
    assert expected in message


def test_negative_temperature_is_refused_by_objective_validation(tmp_path):
    message = error_of(write(tmp_path, "name: x\nobjectives:\n  - {name: kd_kl, params: {temperature: -2.0}}\n"))
    assert "objectives[0]" in message and "-2.0" in message


def test_unreadable_empty_and_non_mapping_files(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
    assert "the file is empty" in error_of(write(tmp_path, ""))
    assert "expected a mapping at the top level" in error_of(write(tmp_path, "- 1\n- 2\n"))
    assert "not valid YAML" in error_of(write(tmp_path, "name: [unclosed\n"))


def test_top_k_larger_than_vocabulary_is_refused():
    outputs = from_dict(TeacherOutputsConfig, {"top_k": 40000})
    with pytest.raises(ConfigError, match=r"x.yaml: field 'teacher_outputs.top_k': expected at most the teacher's vocabulary size 30522, got 40000"):
        check_against_teacher("x.yaml", TEACHER_CONFIG, outputs=outputs)
    check_against_teacher("x.yaml", TEACHER_CONFIG, outputs=from_dict(TeacherOutputsConfig, {"top_k": 30522}))


def test_student_deeper_than_the_init_map_allows_is_refused():
    ok = from_dict(StudentConfig, {"num_layers": 3, "init": "every_other"})
    check_against_teacher("s.yaml", TEACHER_CONFIG, student=ok)
    deep = from_dict(StudentConfig, {"num_layers": 4, "init": "every_other"})
    with pytest.raises(ConfigError, match=r"s.yaml: field 'student.num_layers': init=every_other needs teacher layers \[2, 4, 6, 8\]"):
        check_against_teacher("s.yaml", TEACHER_CONFIG, student=deep)
    with pytest.raises(ConfigError, match=r"field 'init_layers': init=explicit needs one teacher layer per student layer \(2\), got 3"):
        from_dict(StudentConfig, {"num_layers": 2, "init": "explicit", "init_layers": [1, 2, 3]}, "s.yaml")
    with pytest.raises(ConfigError, match=r"field 'student.init_layers': init=explicit needs teacher layers \[1, 9\]"):
        check_against_teacher("s.yaml", TEACHER_CONFIG,
                              student=from_dict(StudentConfig, {"num_layers": 2, "init": "explicit", "init_layers": [1, 9]}))


def test_teacher_prep_config_values(tmp_path):
    message = error_of(write(tmp_path, "encoder: package:x\noutput_dir: o\nmask_prob: 1.5\n"), TeacherPrepConfig)
    assert "field 'mask_prob': expected a probability in (0, 1), got 1.5" in message
    message = error_of(write(tmp_path, "encoder: package:x\noutput_dir: o\ncorpus: {kind: pdf}\n"), TeacherPrepConfig)
    assert "field 'corpus.kind'" in message


def test_hash_is_stable_and_resolved_config_is_saved(tmp_path):
    a = from_dict(Outer, {"name": "x", "layers": [1]})
    b = from_dict(Outer, {"layers": [1], "name": "x"})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(from_dict(Outer, {"name": "x", "layers": [2]}))
    saved = save_resolved(a, tmp_path / "run")
    text = saved.read_text()
    assert text.startswith(f"# config_hash: {config_hash(a)}")
    assert config_hash(load_config(saved, Outer)) == config_hash(a)


from evaluate.config import EvaluateConfig  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from deploy.config import DeployConfig  # noqa: E402

# Each shipped config and the class that reads it; a new file in configs/ must be added here.
SHIPPED = {
    "tasks/tweets_sentiment.yaml": TaskConfig,
    "demo_teacher.yaml": TeacherPrepConfig,
    "finetune_adashare.yaml": FinetuneConfig,
    "finetune_demo.yaml": FinetuneConfig,
    "finetune_multitask.yaml": FinetuneConfig,
    "finetune_pkd.yaml": FinetuneConfig,
    "finetune_theseus.yaml": FinetuneConfig,
    "finetune_tweets.yaml": FinetuneConfig,
    "finetune_tinybert.yaml": FinetuneConfig,
    "demo_pipeline.yaml": PipelineConfig,
    "example_task_pipeline.yaml": PipelineConfig,
    "pretrain_demo.yaml": PretrainConfig,
    "pretrain_online_minilm.yaml": PretrainConfig,
    "pretrain_zero3_bf16.yaml": PretrainConfig,
    "evaluate_demo.yaml": EvaluateConfig,
    "deploy_demo.yaml": DeployConfig,
    "demo_report.yaml": ReportConfig,
    "recipes/transfer_set.yaml": PipelineConfig,
    "chain/assistant.yaml": PretrainConfig,
    "chain/assistant_transfer_set.yaml": PipelineConfig,
    "chain/student.yaml": PretrainConfig,
    "chain/direct.yaml": PretrainConfig,
    "chain/evaluate.yaml": EvaluateConfig,
    "evaluate_bottleneck.yaml": EvaluateConfig,
    "sparse/transfer_set.yaml": PipelineConfig,
    "sparse/pretrain.yaml": PretrainConfig,
    "decoder/teacher.yaml": DecoderPrepConfig,
    "decoder/transfer_set.yaml": PipelineConfig,
    "decoder/pretrain.yaml": PretrainConfig,
    "decoder/cross_tokenizer.yaml": PretrainConfig,  # its student.config folder: decoder/llama_student/config.json
    **{f"recipes/{name}.yaml": PretrainConfig for name in ("distilbert", "tinybert", "minilm", "minilmv2", "bert_emd",
                                                           "pooled", "sentence", "shape_width_svd",
                                                           "shape_bottleneck")},
    **{f"task_methods/{name}.yaml": FinetuneConfig for name in (
        "soft_kd", "logit_mse", "prob_shift", "dynamic_temperature", "temperature_schedule", "weight_schedule", "pkd",
        "tinybert", "theseus", "dml", "rkd", "fsp", "nst", "multi_teacher", "bam")},
}


def test_every_shipped_config_validates():
    from pathlib import Path

    shipped = sorted(p.relative_to("configs").as_posix() for p in Path("configs").rglob("*.yaml"))
    assert shipped == sorted(SHIPPED), "every file in configs/ needs an entry in SHIPPED"
    for name, cls in SHIPPED.items():
        load_config(Path("configs") / name, cls)
