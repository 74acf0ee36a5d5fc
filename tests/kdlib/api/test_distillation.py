"""kdlib.api.Distillation: the stage's objectives as one loss object. Its terms equal the training module's
(DistillModule, what `python -m pretrain` trains) bit for bit on the same student and batch, with the same gradients;
from a plain transformers output they equal the losses computed by hand; and a configuration the stage refuses is
refused here up front, with the stage's own words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, BertForMaskedLM

from kdlib.api import Distillation, TransferSet
from kdlib.config import load_config
from kdlib.errors import ConfigError, FingerprintMismatch
from kdlib.losses import get_spec
from kdlib.training.module import DistillModule
from pretrain.config import PretrainConfig
from pretrain.validate import validate
from tests.tiny_models import make_tiny_bert
from tests.transfer_fixture import base_config, write_config

ROWS = list(range(8, 16))


def student(paths, *, layers=2, hidden=None, heads=None, seed=0) -> BertForMaskedLM:
    config = AutoConfig.from_pretrained(str(paths["teacher"]))
    config.num_hidden_layers = layers
    if hidden is not None:
        config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    if heads is not None:
        config.num_attention_heads = heads
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


CASES = {  # name: (objectives, Distillation keywords, student keywords)
    "topk_mlm_chunked": ([{"name": "kd_topk", "params": {"temperature": 2.0}}, {"name": "mlm_ce", "weight": 0.5}],
                         {}, {}),
    "hidden_narrow_projection": ([{"name": "hidden_mse"}, {"name": "kd_topk"}, {"name": "embedding_mse", "weight": 0.3}],
                                 {"layer_map": {"name": "uniform"}}, {"hidden": 16}),
    "cached_attention": ([{"name": "attention_kl"}, {"name": "value_relation_kl"}, {"name": "mlm_ce"}],
                         {"layer_map": {"name": "uniform"}}, {}),
    "pooled": ([{"name": "pooled_cosine"}, {"name": "rkd_distance", "weight": 0.2}], {}, {}),
    "online_teacher": ([{"name": "attention_mse"}, {"name": "kd_kl", "params": {"temperature": 2.0}}],
                       {"layer_map": {"name": "skip"}, "online": True}, {}),
    "scheduled": ([{"name": "kd_topk", "weight_schedule": {"name": "linear", "start": 1.0, "end": 0.0},
                    "temperature_schedule": {"name": "linear", "start": 4.0, "end": 1.0}}], {}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_terms_and_gradients_equal_the_stage_module(api_paths, case):
    objectives, kwargs, shape = CASES[case]
    kwargs = dict(kwargs)
    teacher = str(api_paths["teacher"]) if kwargs.pop("online", False) else None
    ts = TransferSet(api_paths["transfer"])
    model = student(api_paths, **shape)
    kd = Distillation(objectives, teacher=teacher, student=model, transfer_set=ts, seed=0, **kwargs)
    module = DistillModule(model, kd.objectives, kd.offer, teacher_width=32, seed=0, logit_chunk_size=kd.chunk_size)
    assert kd.projections.keys() == module.projections.keys()
    if case == "hidden_narrow_projection":
        assert sorted(kd.projections) == ["embeddings", "hidden"]
        module.projections.load_state_dict(kd.projections.state_dict())
    batch = ts.batch(ROWS)
    step, total_steps = 3, 10
    teacher_view = kd.teacher_outputs(batch)
    theirs_total, theirs = module(batch, teacher_view, step, total_steps)
    theirs_total.backward()
    theirs_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, terms = kd(kd.run_student(model, batch), batch, step=step, total_steps=total_steps)
    total.backward()
    assert terms.keys() == theirs.keys() == {o["name"] for o in objectives}
    assert torch.equal(total, theirs_total), (total, theirs_total)
    assert all(torch.equal(terms[k], theirs[k]) for k in terms), (terms, theirs)
    assert total.item() > 0 and all(torch.isfinite(v) for v in terms.values())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == theirs_grads.keys() and grads
    assert all(torch.equal(grads[n], theirs_grads[n]) for n in grads)


def test_from_a_plain_transformers_output_the_terms_are_the_hand_computed_losses(api_paths):
    ts = TransferSet(api_paths["transfer"])
    model = student(api_paths)
    kd = Distillation([{"name": "kd_topk", "params": {"temperature": 2.0}}, {"name": "mlm_ce", "weight": 0.5}],
                      student=model, transfer_set=ts)
    batch = ts.batch(ROWS)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kd.student_kwargs)
    total, terms = kd(out, batch)
    # masked-LM cross-entropy by hand, float64
    logits = out.logits.detach().double().numpy()
    labels = batch["mlm_labels"].numpy()
    at = labels != -100
    z = logits[at]
    log_p = z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1))[:, None]
    mlm = -log_p[np.arange(len(z)), labels[at]].mean()
    assert abs(terms["mlm_ce"].item() - 0.5 * mlm) <= 1e-6 * abs(mlm)
    # cached top-k KD: the registered function on the same tensors
    direct = get_spec("kd_topk").fn(student_logits=out.logits, topk_ids=batch["topk_ids"],
                                    topk_logits=batch["topk_logits"], teacher_lse=batch["teacher_lse"],
                                    mask=batch["attention_mask"], temperature=2.0)
    assert torch.equal(terms["kd_topk"], direct)
    assert torch.equal(total, terms["kd_topk"] + terms["mlm_ce"])
    # the chunked path (run_student) gives the same values to float32 rounding
    chunked_total, _ = kd(kd.run_student(model, batch), batch)
    assert abs(chunked_total.item() - total.item()) <= 16 * np.finfo(np.float32).eps * total.item()


def test_outputs_without_what_the_objectives_read_are_refused(api_paths):
    ts = TransferSet(api_paths["transfer"])
    model = student(api_paths)
    batch = ts.batch(ROWS)
    kd = Distillation([{"name": "pooled_cosine"}], student=model, transfer_set=ts)
    assert kd.student_kwargs == {"output_hidden_states": True}
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        kd(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    kd = Distillation([{"name": "attention_kl"}], student=model, transfer_set=ts, layer_map={"name": "uniform"})
    with pytest.raises(ValueError, match="run_student"):
        kd(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True), batch)


STAGE_REFUSALS = {  # what python -m pretrain refuses before training, and how
    "no_layer_map": ({"objectives": [{"name": "hidden_mse"}]}, {}),
    "uncached_qkv_layers": ({"objectives": [{"name": "attention_kl"}],
                             "layer_map": {"name": "explicit", "pairs": [[1, 1], [3, 2]]}}, {}),
    "other_head_count": ({"objectives": [{"name": "attention_mse"}], "layer_map": {"name": "uniform"},
                          "student.num_attention_heads": 2}, {"heads": 2}),
    "unknown_loss": ({"objectives": [{"name": "kd_topkk"}]}, {}),
    "bad_option": ({"objectives": [{"name": "kd_topk", "params": {"temprature": 2.0}}]}, {}),
    "uncached_teacher_logits": ({"objectives": [{"name": "kd_kl"}]}, {}),
}


@pytest.mark.parametrize("case", sorted(STAGE_REFUSALS))
def test_refused_up_front_in_the_stage_words(api_paths, tmp_path, case):
    overrides, shape = STAGE_REFUSALS[case]
    cfg = base_config(api_paths, tmp_path / "run", **overrides)
    source = str(write_config(cfg, tmp_path / "stage.yaml"))
    with pytest.raises(ConfigError) as stage:
        validate(load_config(source, PretrainConfig), source)
    layer_map = cfg.get("layer_map")
    if layer_map and "pairs" in layer_map:
        layer_map = {**layer_map, "pairs": [tuple(p) for p in layer_map["pairs"]]}
    with pytest.raises(ConfigError) as api:
        Distillation(cfg["objectives"], student=student(api_paths, **shape), transfer_set=api_paths["transfer"],
                     layer_map=layer_map)
    stage_words = str(stage.value).split(f"{source}: ", 1)[1]
    assert str(api.value) == f"Distillation: {stage_words}"


def test_what_only_the_stage_offers_is_refused_naming_it(api_paths):
    model = student(api_paths)
    with pytest.raises(ConfigError, match="dml needs a peer student's logits .*cannot train a second student"):
        Distillation([{"name": "dml"}], student=model, transfer_set=api_paths["transfer"])
    with pytest.raises(ConfigError, match="field 'layer_map': emd learns"):
        Distillation([{"name": "bert_emd"}], student=model, transfer_set=api_paths["transfer"],
                     layer_map={"name": "emd"})


def test_an_online_teacher_that_did_not_make_the_transfer_set_is_refused(api_paths, tmp_path):
    other = make_tiny_bert(tmp_path / "other", layers=4, seed=7)
    with pytest.raises(FingerprintMismatch, match="made by teacher .* but this run uses teacher"):
        Distillation([{"name": "kd_topk"}], teacher=str(other), student=student(api_paths),
                     transfer_set=api_paths["transfer"])


@pytest.mark.parametrize("overrides,shape,teacher", [
    ({}, {}, False),
    ({"objectives": [{"name": "hidden_mse"}, {"name": "pooled_cosine"}], "layer_map": {"name": "uniform"},
      "student.hidden_size": 16, "student.intermediate_size": 32}, {"hidden": 16}, False),
    ({"objectives": [{"name": "attention_mse"}], "layer_map": {"name": "skip"}, "online_teacher": True}, {}, True),
])
def test_the_offer_is_the_stages(api_paths, tmp_path, overrides, shape, teacher):
    """What the losses may read, per position or per sequence, from which layers: the Offer python -m pretrain
    validates with (only `peer` differs: the stage can build a second student for dml, the API cannot)."""
    import dataclasses

    cfg = base_config(api_paths, tmp_path / "run", **overrides)
    source = str(write_config(cfg, tmp_path / "stage.yaml"))
    stage = validate(load_config(source, PretrainConfig), source).offer
    kd = Distillation(cfg["objectives"], teacher=str(api_paths["teacher"]) if teacher else None,
                      student=student(api_paths, **shape), transfer_set=api_paths["transfer"],
                      layer_map=cfg.get("layer_map"))
    assert kd.offer == dataclasses.replace(stage, peer=False)
    assert kd.offer.token_level and stage.peer
