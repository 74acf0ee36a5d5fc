"""Intermediate targets from the cache: hidden states and attention Q/K/V stored (fp16 or int8 with a
scale per position), read back as the teacher's own outputs, and feeding the attention / relation
losses with no teacher at training time.

The bounds come from the encodings: fp16 rounds each unit to 2^-11 of its magnitude; int8 is off by
at most half a step, s / 2 with s = max|x| / 127 per position (plus float32 rounding of the product).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlib.cache import TransferSet, read_manifest
from kdlib.cache.vectors import encode, fidelity_sums, reconstruct
from kdlib.runtime.fingerprints import model_fingerprint
from kdlib.losses import get_loss
from kdlib.runtime.models import ModelConfig, load_model
from tests.data_pipeline.test_pipeline import corpus_config, run_pipeline
from tests.kdlib.losses.test_every_loss_trains import PAIRS, heads, one_step, raw_tensors
from tests.tiny_models import make_tiny_bert
from tests.transfer_fixture import build_transfer_set


# ---------------------------------------------------------------- the encodings by themselves

def test_int8_reconstruction_is_within_half_a_step_of_each_position():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 48)) * rng.uniform(0.01, 50, size=(200, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero vector: scale 0, reconstructed exactly
    stored = encode(x, "int8")
    assert stored["values"].dtype == np.int8 and stored["scale"].dtype == np.float32
    back = reconstruct(x, "int8").astype(np.float64)
    step = np.abs(x).max(-1, keepdims=True).astype(np.float64) / 127
    assert np.all(np.abs(back - x) <= step / 2 + 4 * np.finfo(np.float32).eps * np.abs(x) + 1e-30)
    assert np.array_equal(back[3], np.zeros(48))
    assert np.array_equal(reconstruct(x, "fp16"), x.astype(np.float16).astype(np.float32))


def test_fidelity_sums_equal_a_float64_hand_computation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    for encoding in ("fp16", "int8"):
        r = reconstruct(x, encoding).astype(np.float64)
        x64 = x.astype(np.float64)
        cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(x64, r)]
        rel = [float(np.linalg.norm(b - a) / np.linalg.norm(a)) for a, b in zip(x64, r)]
        got = fidelity_sums(x, encoding)
        assert got["positions"] == 64
        assert abs(got["cosine"] - sum(cos)) <= 1e-12 * 64
        assert abs(got["relative_error"] - sum(rel)) <= 1e-12 * sum(rel) + 1e-15
        assert got["min_cosine"] == pytest.approx(min(cos), abs=1e-12)
    assert fidelity_sums(x, "int8")["relative_error"] / 64 < 1 / 127  # at most half a step of the largest unit


# ---------------------------------------------------------------- the pipeline caches them (real Beam)

@pytest.fixture(scope="module")
def qkv_set(tmp_path_factory):
    work = tmp_path_factory.mktemp("qkv_pipeline")
    teacher = make_tiny_bert(work / "teacher", task="masked_lm", layers=2, hidden=32, heads=4, seed=0)
    out = work / "int8"
    cfg = corpus_config(teacher, out, augment={"copies": 0}, masking={"prob": 0.15, "rows": 0.5},
                        teacher_outputs={"top_k": 8, "hidden_layers": [1, 2], "qkv_layers": [2],
                                         "vector_encoding": "int8", "pooled": "mean", "fidelity_positions": 256})
    run_pipeline(work, cfg)
    return teacher, out


@pytest.mark.slow
def test_cached_hidden_and_qkv_equal_the_teachers_own_outputs(qkv_set):
    from kdlib.training.internals import capture_qkv

    teacher, out = qkv_set
    ts = TransferSet(out, teacher_fingerprint=model_fingerprint(teacher))
    model = load_model(ModelConfig(path=str(teacher), task="masked_lm"))
    indices = list(range(0, len(ts), max(1, len(ts) // 12)))[:12]
    batch = ts.batch(indices)
    with torch.inference_mode(), capture_qkv(model) as qkv:
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    wanted = {"hidden_1": own.hidden_states[1], "hidden_2": own.hidden_states[2],
              **{f"{part}_2": qkv[2][part] for part in ("query", "key", "value")}}
    for name, x in wanted.items():
        got = batch[f"teacher_{name}"][real].double()
        x = x[real].double()
        step = x.abs().amax(-1, keepdim=True) / 127
        # half a step of int8, plus float32 rounding of the teacher's own forward (batched vs cached batches)
        assert torch.all((got - x).abs() <= step / 2 + 1e-5 * (1 + x.abs())), name
    m = read_manifest(out)
    assert m.cached["qkv_layers"] == [2] and m.cached["vector_encoding"] == "int8"
    vectors = m.fidelity["vectors"]
    assert set(vectors) == set(wanted)
    for name, f in vectors.items():
        assert f["positions"] > 100 and 0.999 < f["mean_cosine"] <= 1 and 0 < f["mean_relative_error"] < 1 / 127
    by_column = m.totals["bytes_per_position_by_column"]
    assert {"hidden_1", "hidden_1_scale", "query_2", "value_2_scale", "topk_ids"} <= set(by_column)
    # compressed int8 of 32 units: under the raw 32 + 4 bytes a position (zstd), and over half of it
    assert 16 < by_column["hidden_1"] + by_column["hidden_1_scale"] < 36 + 2


# ---------------------------------------------------------------- losses from the cache, no teacher

@pytest.fixture(scope="module")
def cached_paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("qkv_fixture"), rows=64, teacher_steps=10,
                              hidden_layers=(0, 2, 4), qkv_layers=(2, 4), vector_encoding="int8", pooled="mean",
                              dropout=0.0)


ATTENTION_LOSSES = [{"name": "attention_kl"}, {"name": "value_relation_kl"}, {"name": "attention_mse"},
                    {"name": "minilmv2_relations", "params": {"relation_heads": 4}}, {"name": "hidden_mse"}]


def _direct(r, teacher_qkv, teacher_hidden) -> dict:
    """Each loss on the hand-gathered student tensors against the given teacher tensors (per mapped pair)."""
    mask = r.mask
    keys = mask[:, None, None, :].bool()

    def scores(qkv, layer):
        q, k = heads(qkv[layer]["query"], 4), heads(qkv[layer]["key"], 4)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    def probs(qkv, layer):
        s = scores(qkv, layer)
        return torch.softmax(s.masked_fill(~keys, torch.finfo(s.dtype).min), -1)

    def mean(fn):
        return float(torch.stack([fn(t, s) for t, s in PAIRS]).mean().detach())

    return {
        "attention_kl": mean(lambda t, s: get_loss("attention_kl")(probs(r.s_qkv, s), probs(teacher_qkv, t), mask)),
        "value_relation_kl": mean(lambda t, s: get_loss("value_relation_kl")(
            heads(r.s_qkv[s]["value"], 4), heads(teacher_qkv[t]["value"], 4), mask)),
        "attention_mse": mean(lambda t, s: get_loss("attention_mse")(scores(r.s_qkv, s), scores(teacher_qkv, t), mask)),
        "minilmv2_relations": mean(lambda t, s: get_loss("minilmv2_relations")(
            *(r.s_qkv[s][p] for p in ("query", "key", "value")), *(teacher_qkv[t][p] for p in ("query", "key", "value")),
            mask, relation_heads=4)),
        "hidden_mse": mean(lambda t, s: get_loss("hidden_mse")(r.s_h[s], teacher_hidden[t], mask, r.proj)),
    }


@pytest.mark.slow
def test_attention_and_relation_losses_train_from_the_cache_as_from_the_online_teacher(cached_paths, tmp_path,
                                                                                        monkeypatch):
    cfg, setup, first = one_step(cached_paths, tmp_path / "offline", monkeypatch, ATTENTION_LOSSES,
                                 online_teacher=False)
    r = raw_tensors(cfg, setup)  # the same first batch, the same fresh student, and the teacher run by hand
    b = r.batch
    cached_qkv = {t: {p: b[f"teacher_{p}_{t}"] for p in ("query", "key", "value")} for t, _ in PAIRS}
    cached_hidden = {t: b[f"teacher_hidden_{t}"] for t, _ in PAIRS}
    from_cache = _direct(r, cached_qkv, cached_hidden)
    # the teacher run online, its outputs passed through the same int8 storage: what the cache must equal exactly
    stored_qkv = {t: {p: torch.from_numpy(reconstruct(r.t_qkv[t][p].reshape(-1, 32).numpy(), "int8")).view_as(
        r.t_qkv[t][p]) for p in ("query", "key", "value")} for t, _ in PAIRS}
    online_stored = _direct(r, stored_qkv, {t: torch.from_numpy(reconstruct(
        r.t_h[t].reshape(-1, 32).numpy(), "int8")).view_as(r.t_h[t]) for t, _ in PAIRS})
    online = _direct(r, {t: r.t_qkv[t] for t, _ in PAIRS}, {t: r.t_h[t] for t, _ in PAIRS})
    real = r.mask.bool()
    for name in from_cache:
        # the same float32 computation on the same tensors: the logged value is the direct one
        assert abs(first[name] - from_cache[name]) <= 1e-5 * abs(from_cache[name]) + 1e-8, name
        # the cache holds exactly the stored (int8) form of the teacher's outputs: the losses agree (a flipped
        # rounding step between two float32 forwards of different batch shapes moves them by far less than 1e-4)
        assert abs(first[name] - online_stored[name]) <= 1e-4 * abs(online_stored[name]) + 1e-8, name
        # int8 moves each unit by <= 1/254 of its position's largest: the loss by a few percent at most
        assert abs(first[name] - online[name]) <= 0.05 * abs(online[name]) + 1e-7, (name, first[name], online[name])
        assert first[name] != online[name]  # it really read the cache, not a teacher forward
    for t, _ in PAIRS:
        assert torch.allclose(b[f"teacher_query_{t}"][real], stored_qkv[t]["query"][real], atol=1e-5)


@pytest.mark.slow
def test_missing_qkv_layers_name_the_field_to_set(cached_paths, tmp_path):
    from kdlib.config import from_dict
    from kdlib.errors import ConfigError
    from pretrain.config import PretrainConfig
    from pretrain.validate import validate
    from tests.transfer_fixture import base_config

    cfg = from_dict(PretrainConfig, base_config(cached_paths, tmp_path / "x", online_teacher=False,
                                                layer_map={"name": "explicit", "pairs": [[3, 1]]},
                                                objectives=[{"name": "attention_kl"}], **{"student.hidden_size": 16,
                                                                                          "student.intermediate_size": 32}))
    with pytest.raises(ConfigError) as err:
        validate(cfg, "run.yaml")
    assert "teacher_outputs.qkv_layers including [3]" in str(err.value)


@pytest.mark.slow
def test_a_recipe_decodes_only_the_columns_its_objectives_read(cached_paths):
    from kdlib.cache.reader import cached_batch_keys
    from kdlib.losses.objectives import ObjectiveConfig
    from kdlib.training.objective_plan import cached_reads
    from kdlib.training.providers import Offer
    from kdlib.training.module import plan_objectives

    ts = TransferSet(cached_paths["transfer"])
    cached = frozenset(cached_batch_keys(ts.manifest))
    small = {"topk_ids", "topk_logits", "teacher_lse", "mlm_labels", "teacher_pooled"}

    def reads(objectives, pairs):
        offer = Offer(online_teacher=False, cached=cached, pairs=pairs, teacher_layers=4, student_layers=2,
                      student_heads=4, teacher_heads=4)
        return cached_reads(plan_objectives([ObjectiveConfig(name) for name in objectives], offer), offer)

    assert reads(["attention_kl"], ((4, 2),)) == small | {"teacher_query_4", "teacher_key_4", "teacher_value_4"}
    assert reads(["hidden_mse", "pooled_cosine"], ((2, 1), (4, 2))) == small | {"teacher_hidden_2", "teacher_hidden_4"}
    assert reads(["embedding_mse"], ((2, 1),)) == small | {"teacher_hidden_0"}
    assert reads(["kd_topk"], ()) == small
    ts.read_only(reads(["attention_kl"], ((4, 2),)))
    batch = ts.batch([0, 1, 2])
    assert {k for k in batch if k.startswith("teacher_")} == {"teacher_lse", "teacher_pooled", "teacher_query_4",
                                                               "teacher_key_4", "teacher_value_4"}
    full = TransferSet(cached_paths["transfer"]).batch([0, 1, 2])
    assert torch.equal(batch["teacher_query_4"], full["teacher_query_4"])


@pytest.mark.slow
def test_masking_rows_leaves_the_other_rows_plain_text(qkv_set):
    """masking.rows 0.5: about half the rows carry masks, the others are the text as it is (what representation
    losses want the teacher to see), chosen by a stable draw from the row's id."""
    from data_pipeline.transforms import masked_row
    from kdlib.text.masking import MaskTokens
    from kdlib.runtime.models import load_tokenizer

    teacher, out = qkv_set
    ts = TransferSet(out)
    tok = load_tokenizer(str(teacher))
    tokens = MaskTokens.from_tokenizer(tok)
    rows = [ts.row(i) for i in range(len(ts))]
    masked = [r for r in rows if len(r["mlm_positions"])]
    assert 0.3 * len(rows) < len(masked) < 0.7 * len(rows)
    for r in rows:
        if not masked_row(r["id"], 0, 0.5):  # (a masked row may still draw no position when it is short)
            assert len(r["mlm_positions"]) == 0 and tokens.mask_id not in r["input_ids"]
    assert sum(masked_row(r["id"], 0, 0.5) for r in rows) >= len(masked)
