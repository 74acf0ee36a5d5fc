"""MobileBERT-style bottleneck students (kdlib.students.bottleneck): built from a tiny teacher's config with
transformers' own MobileBertForMaskedLM, initialised from the teacher's embeddings and MLM head, trained by
the real `python -m pretrain` entry point (in this process, DeepSpeed on CPU) with feature-map and
attention transfer against an online teacher, and exported as a folder plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from kdlib.config import from_dict
from kdlib.errors import ConfigError
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.schemas import StudentConfig, check_against_teacher
from kdlib.training.internals import AttentionViews, attention_blocks, capture_qkv
from pretrain.config import PretrainConfig
from pretrain.student import build_student
from pretrain.train import train
from pretrain.validate import validate
from tests.transfer_fixture import (base_config, build_transfer_set, export_weights, free_port,
                                    probe_export_in_clean_process)

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

SHAPE = {"num_layers": 4, "architecture": "bottleneck", "init": "embeddings",
         "bottleneck": {"intra_size": 8, "feedforward_networks": 2}}  # teacher: 4 layers, width 32, 4 heads


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("bottleneck_fixture"), rows=96, teacher_steps=20, dropout=0.0)


@pytest.fixture(scope="module")
def teacher(paths):
    return load_model(ModelConfig(path=str(paths["teacher"]), task="masked_lm")).eval()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return ids, mask


def test_config_is_derived_from_the_teacher_and_the_embeddings_and_head_are_the_teachers(paths, teacher):
    shape = from_dict(StudentConfig, SHAPE)
    student = build_student(ModelConfig(path=str(paths["teacher"]), task="masked_lm"), teacher.config, shape, 0).eval()
    cfg, t = student.config, teacher.config
    assert type(student).__name__ == "MobileBertForMaskedLM"
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size, cfg.pad_token_id, cfg.hidden_act) == \
        (t.vocab_size, t.max_position_embeddings, t.type_vocab_size, t.pad_token_id, t.hidden_act)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.true_hidden_size, cfg.intermediate_size, cfg.embedding_size,
            cfg.num_feedforward_networks) == (32, 4, 8, 32, 32, 2)  # intermediate: 4 x intra_size by default
    ids, mask = batch()
    with torch.no_grad():
        mine = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        theirs = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        head = student.cls(theirs.hidden_states[-1])
    assert len(mine.hidden_states) == shape.num_layers + 1  # embeddings + one per block, as hidden_mse indexes them
    assert all(h.shape == (3, 17, 32) for h in mine.hidden_states)
    # Layer 0 is the teacher's embedding output except for LayerNorm's eps: MobileBERT's embedding LayerNorm
    # keeps torch's default 1e-5 (BERT: 1e-12), so recompute it by hand from the teacher's tables with that eps.
    e = teacher.bert.embeddings
    summed = e.word_embeddings(ids) + e.position_embeddings.weight[:17] + e.token_type_embeddings.weight[0]
    by_hand = torch.nn.functional.layer_norm(summed, (32,), e.LayerNorm.weight, e.LayerNorm.bias, eps=1e-5)
    assert (mine.hidden_states[0] - by_hand).abs().max() < 1e-5
    assert (head - theirs.logits).abs().max() < 1e-5  # the head is the teacher's (float32 rounding only)
    assert torch.equal(student.cls.predictions.decoder.weight, student.mobilebert.embeddings.word_embeddings.weight)
    assert student.cls.predictions.dense.weight.shape == (0, t.vocab_size)  # embedding_size = width: no extra rows


def test_a_narrower_embedding_keeps_the_head_exact(paths, teacher):
    shape = from_dict(StudentConfig, {**SHAPE, "bottleneck": {"intra_size": 8, "embedding_size": 16,
                                                                 "trigram_input": True}})
    student = build_student(ModelConfig(path=str(paths["teacher"]), task="masked_lm"), teacher.config, shape, 0).eval()
    words = teacher.bert.embeddings.word_embeddings.weight
    kept = words.norm(dim=0).argsort(descending=True)[:16].sort().values
    assert torch.equal(student.mobilebert.embeddings.word_embeddings.weight, words[:, kept])
    ids, mask = batch(1)
    with torch.no_grad():
        theirs = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        head = student.cls(theirs.hidden_states[-1])
    assert (head - theirs.logits).abs().max() < 1e-5  # transform outputs permuted: kept columns, then the rest


def test_attention_capture_finds_every_block_and_recomputes_its_probabilities(paths, teacher):
    shape = from_dict(StudentConfig, SHAPE)
    student = build_student(ModelConfig(path=str(paths["teacher"]), task="masked_lm"), teacher.config, shape, 0).eval()
    student.config._attn_implementation = "eager"  # so the model returns its own probabilities to compare with
    ids, mask = batch(2)
    assert len(attention_blocks(student)) == 4
    with torch.no_grad(), capture_qkv(student) as store:
        out = student(input_ids=ids, attention_mask=mask, output_attentions=True)
    views = AttentionViews(store, student.config.num_attention_heads, mask)
    for layer in range(1, 5):
        assert store[layer]["query"].shape == (3, 17, 8)  # attention runs in the 8-wide bottleneck
        real = mask[:, None, :, None].bool().expand_as(views.probs(layer))
        assert (views.probs(layer) - out.attentions[layer - 1])[real].abs().max() < 1e-6


def test_bad_shape_fields_are_named(paths):
    teacher_dict = json.loads((paths["teacher"] / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"field 'init': a bottleneck student has no teacher-shaped layers"):
        from_dict(StudentConfig, {**SHAPE, "init": "every_other"}, "s.yaml")
    with pytest.raises(ConfigError, match=r"field 'bottleneck': only used with architecture=bottleneck"):
        from_dict(StudentConfig, {"num_layers": 2, "bottleneck": {"intra_size": 8}}, "s.yaml")
    with pytest.raises(ConfigError, match=r"field 'bottleneck.feedforward_networks': expected a positive"):
        from_dict(StudentConfig, {**SHAPE, "bottleneck": {"feedforward_networks": 0}}, "s.yaml")
    with pytest.raises(ConfigError, match=r"field 'num_attention_heads': expected a divisor of "
                                          r"bottleneck.intra_size 8, got 3"):
        from_dict(StudentConfig, {**SHAPE, "num_attention_heads": 3}, "s.yaml")
    with pytest.raises(ConfigError, match=r"field 'student.bottleneck.intra_size': expected a multiple of the 4"):
        check_against_teacher("s.yaml", teacher_dict, student=from_dict(StudentConfig, {**SHAPE, "bottleneck": {
            "intra_size": 6}}))
    with pytest.raises(ConfigError, match=r"field 'student.hidden_size': init=embeddings copies"):
        check_against_teacher("s.yaml", teacher_dict, student=from_dict(StudentConfig, {**SHAPE, "hidden_size": 16}))


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3 must gather the weights MobileBERT's head reads from its children
def test_pretrain_trains_a_bottleneck_student_with_feature_map_and_attention_transfer(paths, tmp_path, monkeypatch,
                                                                                       stage):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "run"
    objectives = [{"name": "kd_topk", "weight": 1.0}, {"name": "hidden_mse", "weight": 1.0},
                  {"name": "attention_kl", "weight": 1.0}]
    cfg = from_dict(PretrainConfig, base_config(paths, out, student=SHAPE, objectives=objectives, online_teacher=True,
                                                layer_map={"name": "uniform"}, steps=8, eval_rows=16,
                                                checkpoint_every=100, **{"engine.zero_stage": stage,
                                                                        "engine.grad_accum": 1,
                                                                        "engine.optim.learning_rate": 1e-2}))
    setup = validate(cfg, "bottleneck.yaml")
    assert setup.pairs == [(1, 1), (2, 2), (3, 3), (4, 4)]  # one teacher layer per block: MobileBERT's transfer
    assert train(cfg, setup) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for name in ("kd_topk", "hidden_mse", "attention_kl"):
        first, last = records[0][name], records[-1][name]
        assert 0 < last < first, (name, first, last)  # each transfer loss falls over 8 steps at lr 1e-2
    assert abs(records[0]["loss"] - sum(records[0][n] for n in ("kd_topk", "hidden_mse", "attention_kl"))) < 1e-5

    folder = out / "export"
    weights = export_weights(folder)
    assert not any(k.startswith("projections") for k in weights)  # widths match: no projection was ever made
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mobilebert"
    assert probe_export_in_clean_process(out, expect_class='MobileBertForMaskedLM') == 0.0  # the trained module's own logits, bit for bit
