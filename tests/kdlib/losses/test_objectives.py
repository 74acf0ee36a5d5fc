"""ObjectiveConfig validation against the registry, duplicate rejection, evaluation with schedules."""
import inspect

import numpy as np
import pytest
import torch

from kdlib.losses import UnknownLossError, get_loss, get_spec, known_losses, register_loss
from kdlib.losses.objectives import ObjectiveConfig, evaluate_objective, total_loss, validate_objectives
from kdlib.losses.schedules import ScheduleConfig

EXPECTED = {
    "attention_kl", "attention_mse", "bert_emd", "distilbert_cosine", "dml", "embedding_mse", "fsp", "hard_ce", "hard_mse",
    "hidden_mse", "kd_ce", "kd_dynamic_temperature", "kd_kl", "kd_prob_shift", "kd_topk", "logit_mse",
    "minilmv2_relations", "mlm_ce", "nst_mmd", "pkd_patient", "rkd_angle", "rkd_distance",
    "teacher_annealing_ce", "value_relation_kl",
    "pooled_contrastive", "pooled_cosine", "pooled_mse", "pooled_relation_kl", "kd_sparse", "uld",
    "next_token_ce", "adashare_sparsity", "adashare_sharing", "reverse_kl", "jsd", "tvd",
}


def test_registry_contents_and_docstrings():
    assert set(known_losses()) == EXPECTED
    for name in known_losses():
        spec = get_spec(name)
        assert " -- " in spec.formula, name  # "formula -- source" on the first docstring line
        assert spec.paper and spec.kind in ("output", "intermediate", "relational", "mutual", "regularizer")
        token_level = bool({"mask", "aligned_mask"} & set(inspect.signature(spec.fn).parameters))
        assert token_level or name in ("pkd_patient", "rkd_distance", "rkd_angle", "bert_emd", "hard_mse") \
            or name.startswith(("pooled_", "adashare_")), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_registered_name_is_constructible(name):
    cfg = ObjectiveConfig(name=name)
    assert cfg.weight == 1.0 and cfg.params == {}


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        ObjectiveConfig(name="kd_kll")
    assert "kd_kll" in str(err.value) and all(n in str(err.value) for n in EXPECTED)
    with pytest.raises(KeyError):
        get_loss("kd_kll")
    with pytest.raises(UnknownLossError, match="known losses: adashare_sharing, adashare_sparsity, attention_kl"):
        get_loss("nope")


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "kd_kl", "weight": -1.0}, "weight"),
    ({"name": "kd_kl", "params": {"temprature": 2.0}}, "params.temprature"),
    ({"name": "kd_kl", "params": {"temperature": 0.0}}, "temperature"),
    ({"name": "kd_kl", "params": {"temperature": -2}}, "temperature"),
    ({"name": "hidden_mse", "params": {"projection": None}}, "params.projection"),  # runtime input, not option
    ({"name": "kd_topk", "params": {"missing_mass": "drop"}}, "missing_mass"),
    ({"name": "hard_ce", "temperature_schedule": ScheduleConfig("linear")}, "no temperature"),
    ({"name": "kd_kl", "temperature_schedule": ScheduleConfig("linear", start=1.0, end=0.0)}, "> 0"),
    ({"name": "kd_kl", "weight_schedule": ScheduleConfig("linear", start=1.0, end=-1.0)}, ">= 0"),
])
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kwargs)


def test_valid_params_and_duplicates():
    a = ObjectiveConfig("kd_topk", weight=0.5, params={"temperature": 2.0, "missing_mass": "rest_bucket"})
    b = ObjectiveConfig("hidden_mse", weight_schedule={"name": "linear", "start": 0.0, "end": 1.0})
    assert isinstance(b.weight_schedule, ScheduleConfig)
    assert validate_objectives([a, b]) == [a, b]
    with pytest.raises(ValueError, match="duplicate loss 'kd_topk'"):
        validate_objectives([a, b, ObjectiveConfig("kd_topk")])
    with pytest.raises(ValueError, match="empty"):
        validate_objectives([])


def test_register_loss_rejects_duplicates_and_missing_docstring():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("kd_kl", kind="output", paper="x")(lambda: None)
    with pytest.raises(ValueError, match="docstring"):
        register_loss("undocumented_loss", kind="output", paper="x")(lambda x: x)


def test_evaluate_objective_with_schedules():
    rng = np.random.default_rng(0)
    s, t = torch.tensor(rng.normal(size=(2, 3, 5))), torch.tensor(rng.normal(size=(2, 3, 5)))
    mask = torch.ones(2, 3, dtype=torch.bool)
    labels = torch.tensor(rng.integers(0, 5, size=(2, 3)))
    inputs = {"student_logits": s, "teacher_logits": t, "mask": mask, "labels": labels, "unused": 1}
    kd = ObjectiveConfig("kd_kl", weight=0.3, params={"temperature": 2.0},
                         temperature_schedule=ScheduleConfig("linear", start=4.0, end=1.0),
                         weight_schedule=ScheduleConfig("linear", start=0.0, end=1.0))
    got = evaluate_objective(kd, inputs, step=50, total_steps=100)
    # weight and weight schedule multiply (0.3 * 0.5); the temperature schedule replaces the fixed 2.0.
    raw = get_loss("kd_kl")(s, t, mask, temperature=2.5)
    expected = 0.3 * 0.5 * raw
    assert got.item() == pytest.approx(expected.item(), abs=1e-12 * (1.0 + abs(raw.item())))
    ce = ObjectiveConfig("hard_ce", weight=2.0)
    tot = total_loss([kd, ce], inputs, step=50, total_steps=100)
    assert tot.item() == pytest.approx(expected.item() + 2.0 * get_loss("hard_ce")(s, labels, mask).item())
    annealed = evaluate_objective(ObjectiveConfig("teacher_annealing_ce"), inputs, step=3, total_steps=10)
    assert annealed.item() == pytest.approx(get_loss("teacher_annealing_ce")(s, t, labels, mask, 3, 10).item())
    with pytest.raises(ValueError, match="missing input 'teacher_hidden'"):
        evaluate_objective(ObjectiveConfig("hidden_mse"), {"student_hidden": s, "mask": mask})


def test_the_registry_marks_the_losses_that_read_class_distributions():
    """A regression head has one output: finetune refuses exactly these losses there (finetune.validate)."""
    marked = {name for name in known_losses() if get_spec(name).reads_class_distribution}
    assert marked == {"kd_kl", "kd_ce", "hard_ce", "kd_prob_shift", "kd_dynamic_temperature", "teacher_annealing_ce",
                      "dml", "reverse_kl", "jsd", "tvd"}
