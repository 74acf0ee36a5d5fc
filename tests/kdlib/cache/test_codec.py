"""The q8 top-k codec (kdlib/cache/codec.py): ids round-trip exactly (also past 65,536 ids), logits within half
a level of the teacher's float32 ones (float64 reference), and a real pipeline run with topk_encoding q8 reads
back as the fp16 set does (same ids, top-1 and lse; logits within the bound; kd_topk within a derived
tolerance; the same sampled-tail draws, stored as differences) in fewer bytes per position."""

import numpy as np
import pytest
import torch

from data_pipeline.config import PipelineConfig
from data_pipeline.pipeline import content_hash
from kdlib.cache import TransferSet, read_manifest
from kdlib.cache.codec import (TOPK_COLUMNS, decode_sorted_ids, decode_topk, dequantize_logits, encode_sorted_ids,
                               encode_topk, quantize_logits, stored_topk_logits)
from kdlib.config import from_dict
from kdlib.losses import kd_topk
from kdlib.text.padding import pad_flat
from tests.data_pipeline.test_pipeline import corpus_config, run_pipeline
from tests.tiny_models import make_tiny_bert

ONE_WORKER = ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"]


def sorted_positions(rng, vocab: int, sizes) -> np.ndarray:
    return np.concatenate([np.sort(rng.choice(vocab, size=n, replace=False)) for n in sizes]).astype(np.int64)


def test_sorted_ids_round_trip_exactly_with_deltas_past_uint16():
    rng = np.random.default_rng(0)
    vocab = 200_000
    sizes = rng.integers(0, 9, 300)  # empty positions too (a sampled cache's position may hold no id)
    ids = sorted_positions(rng, vocab, sizes)
    # positions whose first id and whose gaps exceed uint16: [199999], [3, 70003, 199998]
    sizes = np.concatenate([sizes, [1, 3]])
    ids = np.concatenate([ids, [199_999, 3, 70_003, 199_998]])
    deltas = encode_sorted_ids(ids, sizes, np.int32)
    assert deltas.dtype == np.int32 and deltas.max() > 65_535
    starts = np.cumsum(sizes) - sizes
    first = starts[sizes > 0]
    assert np.array_equal(deltas[first], ids[first])  # each position restarts from its first id
    assert np.array_equal(decode_sorted_ids(deltas, sizes), ids)
    # uint16 holds every id and every gap of a 65,536-id vocabulary
    small = np.array([0, 65_535, 7, 65_535, 65_535], dtype=np.int64)
    deltas = encode_sorted_ids(small, [2, 1, 1, 1], np.uint16)
    assert deltas.tolist() == [0, 65_535, 7, 65_535, 65_535]
    assert np.array_equal(decode_sorted_ids(deltas, [2, 1, 1, 1]), small)
    with pytest.raises(ValueError, match="ascending"):
        encode_sorted_ids(np.array([5, 4]), [2], np.uint16)


def awkward_logits(rng) -> np.ndarray:
    """(N, 8) float32 logits sorted descending: ordinary, wide (range 2,000), narrow (1e-5), ties, constant."""
    z = rng.normal(size=(400, 8)) * rng.choice([0.01, 1.0, 5.0], size=(400, 1)) + rng.normal(size=(400, 1)) * 20
    z[0] = np.linspace(1000, -1000, 8)
    z[1] = 3.0 + np.linspace(0, -1e-5, 8)
    z[2] = [4.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 0.5]  # ties, also with the argmax
    z[3] = -7.25  # one value: a zero range
    return -np.sort(-z.astype(np.float32), axis=1)


def test_logit_levels_decode_within_half_a_step_of_the_float32_logits():
    z = awkward_logits(np.random.default_rng(1))
    levels, peak, step = quantize_logits(z)
    assert levels.dtype == np.uint8 and peak.dtype == np.float32 and step.dtype == np.float16
    z64, s64 = z.astype(np.float64), step.astype(np.float64)
    # the step: the smallest float16 whose 255 levels span the position's range
    spread = z64.max(1) - z64.min(1)
    assert np.all(s64 * 255 >= spread)
    below = np.nextafter(step, np.float16(0)).astype(np.float64)
    assert np.all((below * 255 < spread) | (spread == 0))
    # the argmax alone at level 0, decoded exactly; every entry within step / 2 (float64 decode)
    assert np.array_equal(peak, z[:, 0]) and np.all(levels[:, 0] == 0) and np.all(levels[:, 1:] >= 1)
    decoded64 = dequantize_logits(levels, peak, step, dtype=np.float64)
    assert np.all(np.abs(decoded64 - z64) <= s64[:, None] / 2)
    assert decoded64[0, 0] == 1000 and np.abs(decoded64[0] - z64[0]).max() > 1  # the bound scales with the range
    # the float32 result is that value rounded once
    decoded = dequantize_logits(levels, peak, step)
    assert decoded.dtype == np.float32 and np.array_equal(decoded, decoded64.astype(np.float32))
    assert np.array_equal(stored_topk_logits(z, "q8"), decoded)
    # hand check: z = [4, 4, 4, 1, 1, .5, .5, .5] -> step = f16(3.5 / 255) rounded up, levels ceil(gap / step)
    s = np.float16(3.5 / 255)
    s = s if float(s) * 255 >= 3.5 else np.nextafter(s, np.float16(1))
    assert step[2] == s
    assert levels[2].tolist() == [0, 1, 1] + [int(np.ceil(3.0 / float(s)))] * 2 + [255] * 3
    assert np.array_equal(quantize_logits(z[3:4])[0], [[0, 1, 1, 1, 1, 1, 1, 1]]) and step[3] == 0


def test_topk_decodes_in_descending_order_with_the_exact_top1():
    rng = np.random.default_rng(2)
    z = awkward_logits(rng)
    ids = np.stack([rng.choice(150_000, size=8, replace=False) for _ in z])
    stored = encode_topk(ids, z, np.int32)
    assert [stored[c].shape for c in ("topk_id_deltas", "topk_levels", "topk_max", "topk_step")] == [
        (z.size,), (z.size,), (len(z),), (len(z),)]
    deltas = stored["topk_id_deltas"].reshape(z.shape)
    assert np.all(np.cumsum(deltas, 1)[:, 1:] > np.cumsum(deltas, 1)[:, :-1])  # stored by id, ascending
    out_ids, out_z = decode_topk(deltas, stored["topk_levels"].reshape(z.shape), stored["topk_max"],
                                 stored["topk_step"])
    assert np.array_equal(out_ids[:, 0], ids[:, 0]) and np.array_equal(out_z[:, 0], z[:, 0])
    assert np.array_equal(np.sort(out_ids, 1), np.sort(ids, 1))
    assert np.all(np.diff(out_z, axis=1) <= 0)
    # each id keeps its own (decoded) logit, and the order is the teacher's wherever levels differ
    by_id = {(p, i): v for p in range(len(z)) for i, v in zip(ids[p], stored_topk_logits(z, "q8")[p])}
    assert all(by_id[(p, i)] == v for p in range(len(z)) for i, v in zip(out_ids[p], out_z[p]))
    distinct = np.all(np.diff(out_z, axis=1) < 0, axis=1)
    assert distinct.mean() > 0.5 and np.array_equal(out_ids[distinct], ids[distinct])
    # all-zero padding decodes to zeros
    pad_ids, pad_z = decode_topk(np.zeros((2, 8)), np.zeros((2, 8), np.uint8), np.zeros(2), np.zeros(2))
    assert not pad_ids.any() and not pad_z.any()


# ---------------------------------------------------------------- a real pipeline run, fp16 against q8


def sharpened_teacher(folder):
    """A tiny BERT whose output LayerNorm gain is scaled up, so its logits span several nats like a trained
    teacher's (an untrained one's top-8 spans ~0.1): the levels are then coarse enough to matter."""
    from transformers import BertForMaskedLM

    make_tiny_bert(folder, task="masked_lm", layers=2, hidden=32, heads=4, seed=3)
    model = BertForMaskedLM.from_pretrained(str(folder))
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.mul_(40.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("codec")
    teacher = sharpened_teacher(work / "teacher")
    sets = {}
    for encoding in ("fp16", "q8"):
        cfg = corpus_config(teacher, work / encoding, augment={"copies": 0}, num_shards=2,
                            corpus={"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line",
                                    "max_documents": 30},
                            teacher_outputs={"top_k": 8, "sampled_tokens": 12, "topk_encoding": encoding,
                                             "fidelity_positions": 256})
        proc = run_pipeline(work, cfg, ONE_WORKER)
        sets[encoding] = (work / encoding, cfg, proc.stdout)
    return sets


def q8_steps(ts: TransferSet, indices, T: int) -> np.ndarray:
    rows = ts.rows(indices)
    return pad_flat([r["topk_step"] for r in rows], np.array([len(r["input_ids"]) for r in rows]), T,
                    dtype=np.float64)


def by_id(ids: torch.Tensor, values: torch.Tensor):
    order = ids.argsort(-1)
    return ids.gather(-1, order), values.double().gather(-1, order)


@pytest.mark.slow
def test_q8_set_reads_back_as_the_fp16_set_within_the_bound(built):
    fp16, q8 = TransferSet(built["fp16"][0]), TransferSet(built["q8"][0])
    assert len(fp16) == len(q8) > 100
    indices = list(range(len(q8)))
    a, b = fp16.batch(indices), q8.batch(indices)
    assert set(a) == set(b)
    for key in ("input_ids", "attention_mask", "mlm_labels", "teacher_lse"):
        assert torch.equal(a[key], b[key]), key  # the log-sum-exp is stored as it was
    assert b["topk_ids"].dtype == torch.int64 and b["topk_logits"].dtype == torch.float32
    real = a["attention_mask"].bool()
    ids_a, z_a = by_id(a["topk_ids"], a["topk_logits"])
    ids_b, z_b = by_id(b["topk_ids"], b["topk_logits"])
    assert torch.equal(ids_a, ids_b)  # the same k ids at every position
    assert torch.equal(a["topk_ids"][..., 0], b["topk_ids"][..., 0])  # and the same top-1 (pretrain's agreement)
    # logits: q8 within step / 2 of the float32 logit, fp16 within half a float16 ulp (<= 2^-11 |z|) of it
    step = torch.from_numpy(q8_steps(q8, indices, real.shape[1]))
    bound = step[..., None] / 2 + z_a.abs() * 2.0 ** -11 + 1e-6
    assert bool(((z_b - z_a).abs() <= bound)[real].all())
    assert float((z_b - z_a).abs()[real].max()) > 0  # (the encodings do differ)
    # descending by logit; where q8 orders two entries, the fp16 logits agree up to both errors
    assert bool((b["topk_logits"].diff(dim=-1) <= 0)[real].all())
    fp16_in_q8_order = a["topk_logits"].double().gather(-1, a["topk_ids"].argsort(-1)).gather(
        -1, b["topk_ids"].argsort(-1).argsort(-1))
    assert bool((fp16_in_q8_order.diff(dim=-1) <= 2 * bound.amax(-1, keepdim=True))[real].all())
    assert not b["topk_ids"][~real].any() and not b["topk_logits"][~real].any()  # padding as fp16's: zeros
    # the sampled tail: the same draws (stored as differences), weighed by the missing mass of the stored top-k,
    # so each position's weights move by at most 2 sum_K p |e^delta - 1| (the top-k's and the tail's share)
    order_a, order_b = a["sparse_ids"].argsort(dim=-1, stable=True), b["sparse_ids"].argsort(dim=-1, stable=True)
    assert torch.equal(a["sparse_ids"].gather(-1, order_a), b["sparse_ids"].gather(-1, order_b))
    moved = (a["sparse_weights"].gather(-1, order_a) - b["sparse_weights"].gather(-1, order_b)).double().abs().sum(-1)
    p = (z_a - a["teacher_lse"].double()[..., None]).exp()
    assert bool((moved <= 2 * (p * torch.expm1((z_b - z_a).abs())).sum(-1) + 1e-5)[real].all())  # (+ float32 weights)
    assert float(moved[real].max()) > 0
    # a recipe that reads only the top-k decodes only its columns, to the same values
    only = TransferSet(built["q8"][0])
    only.read_only(["topk_ids", "topk_logits", "teacher_lse"])
    c = only.batch(indices)
    assert "mlm_labels" not in c and all(torch.equal(c[k], b[k]) for k in ("topk_ids", "topk_logits", "teacher_lse"))


def renormalized_kd_bound(student: torch.Tensor, batch: dict, delta: torch.Tensor) -> float:
    """A bound on |kd_topk(z + delta) - kd_topk(z)| (renormalize, T = 1), derived for p~ = softmax(z_K): with
    |delta| <= e per position, p~' = p~ e^eta with |eta| <= 2e, so per position
    |dL| <= (e^{2e} - 1) * sum p~ (|log p~| + |log q_K|) + 2e e^{2e}; the batch mean obeys the mean."""
    real = batch["attention_mask"].bool()
    z = batch["topk_logits"].double()[real]
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(student.double()[real], -1).gather(-1, batch["topk_ids"][real])
    e = delta[real].abs().amax(-1)
    per = (torch.expm1(2 * e) * (log_p.exp() * (log_p.abs() + log_q.abs())).sum(-1) + 2 * e * torch.exp(2 * e))
    return float(per.mean())


@pytest.mark.slow
def test_kd_topk_on_the_q8_batch_is_within_the_derived_tolerance(built):
    fp16, q8 = TransferSet(built["fp16"][0]), TransferSet(built["q8"][0])
    indices = list(range(0, len(q8), 3))
    a, b = fp16.batch(indices), q8.batch(indices)
    V = read_manifest(built["q8"][0]).teacher["vocab_size"]
    student = torch.randn(*a["input_ids"].shape, V, generator=torch.Generator().manual_seed(0)) * 2
    loss = {name: kd_topk(student, batch["topk_ids"], batch["topk_logits"], batch["teacher_lse"],
                          batch["attention_mask"]) for name, batch in (("fp16", a), ("q8", b))}
    ids_a, z_a = by_id(a["topk_ids"], a["topk_logits"])
    _, z_b = by_id(b["topk_ids"], b["topk_logits"])
    tolerance = renormalized_kd_bound(student, a, z_b - z_a)
    assert 0 < tolerance < 0.05 * float(loss["fp16"])
    assert 0 < abs(float(loss["q8"]) - float(loss["fp16"])) <= tolerance


@pytest.mark.slow
def test_q8_manifest_records_encoding_fidelity_and_fewer_bytes(built):
    (fp16_dir, fp16_cfg, _), (q8_dir, _, q8_out) = built["fp16"], built["q8"]
    a, b = read_manifest(fp16_dir), read_manifest(q8_dir)
    assert a.cached["topk_encoding"] == "fp16" and b.cached["topk_encoding"] == "q8"
    assert {"topk_id_deltas", "topk_levels", "topk_max", "topk_step"} <= set(b.dtypes)
    assert "topk_ids" not in b.dtypes and b.dtypes["topk_id_deltas"] == "uint16[]"
    assert "sample_ids" not in b.dtypes and b.dtypes["sample_id_deltas"] == "uint16[]"
    columns_a, columns_b = a.totals["bytes_per_position_by_column"], b.totals["bytes_per_position_by_column"]
    assert columns_b["sample_id_deltas"] < columns_a["sample_ids"]

    def topk_bytes(m):
        return sum(v for name, v in m.totals["bytes_per_position_by_column"].items() if name in TOPK_COLUMNS)

    assert topk_bytes(b) < topk_bytes(a) and b.totals["bytes_per_position"] < a.totals["bytes_per_position"]
    # the summary line shows the top-k's bytes next to its KL
    assert f"top-8 (q8, {topk_bytes(b):.1f} bytes/position) kept mass" in q8_out
    # fidelity measured on the stored values: the same sampled positions, each off by its encoding's error
    fa, fb = a.fidelity, b.fidelity
    assert fa["positions"] == fb["positions"] > 100
    ts = TransferSet(q8_dir)
    steps = np.concatenate([np.asarray(ts.row(i)["topk_step"], dtype=np.float64) for i in range(len(ts))])
    peak = max(float(np.abs(np.asarray(ts.row(i)["topk_max"])).max()) for i in range(len(ts)))
    assert 0 < fb["max_logit_error"] <= steps.max() / 2 + 1e-6
    assert 0 < fa["max_logit_error"] <= 2.0 ** -11 * (peak + 1)
    spread = np.expm1(fa["max_logit_error"] + fb["max_logit_error"])  # kept mass sum e^{z - lse}: relative change
    assert abs(fb["mean_kept_mass"] - fa["mean_kept_mass"]) <= fa["mean_kept_mass"] * spread
    # q8 is another set; fp16 hashes as before topk_encoding existed (the field is left out of the hash)
    assert a.config_hash == content_hash(from_dict(PipelineConfig, fp16_cfg)) != b.config_hash
