"""The sampled sparse teacher cache (Sparse Logit Sampling): the loss by hand, the estimator's unbiasedness
(and top-k's bias), the stored draws and the reader's weights by hand from the teacher, a bit-identical
rebuild by the real pipeline, and a pipeline-built set training with `pretrain` and resuming bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdlib.cache import TransferSet, read_manifest
from kdlib.cache.sampling import compact, draw, estimate_fidelity, sparse_targets
from kdlib.errors import ConfigError
from kdlib.runtime.io import sha256_file
from kdlib.losses import kd_sparse, kd_topk, sparse_kd_per_position
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.schemas import TeacherOutputsConfig, check_against_teacher
from kdlib.teachers.outputs import rows_from_outputs
from pretrain.evaluate import teacher_top1
from tests.data_pipeline.test_pipeline import corpus_config, run_pipeline
from tests.transfer_fixture import base_config, build_transfer_set, export_weights, run_pretrain, write_config

N, K = 16, 4  # draws per position; top-k of the combined (top-k + sampled tail) pipeline set


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------- the loss


def test_kd_sparse_equals_a_float64_hand_computation():
    rng = np.random.default_rng(0)
    B, T, V, m = 3, 5, 11, 4
    s = rng.normal(size=(B, T, V)) * 2
    ids = rng.integers(0, V, (B, T, m))
    w = rng.random((B, T, m))
    w[..., -1] = 0.0  # a padding column
    w /= w.sum(-1, keepdims=True)
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 3:] = mask[2, 4] = 0
    pad = mask == 0
    s[pad], ids[pad], w[pad] = np.nan, 10_000, np.inf  # garbage at padding must not matter
    real = ~pad
    lq = log_softmax(s[real])
    per = -(w[real] * np.take_along_axis(lq, ids[real], -1)).sum(-1)
    want = per.mean()
    grad = np.zeros_like(s)
    g = np.exp(lq) * w[real].sum(-1, keepdims=True)
    np.subtract.at(g, (np.arange(len(g))[:, None], ids[real]), w[real])
    grad[real] = g / real.sum()

    st = torch.tensor(s, requires_grad=True)
    got = kd_sparse(st, torch.tensor(ids), torch.tensor(w), torch.tensor(mask))
    got.backward()
    assert abs(got.item() - want) < 1e-12
    assert np.allclose(st.grad.numpy(), grad, atol=1e-14, rtol=0) and (st.grad[torch.tensor(pad)] == 0).all()
    per_t = sparse_kd_per_position(torch.tensor(s[real]), torch.tensor(ids[real]), torch.tensor(w[real]))
    assert np.allclose(per_t.numpy(), per, atol=1e-12, rtol=0)
    f32 = kd_sparse(torch.tensor(s, dtype=torch.float32), torch.tensor(ids), torch.tensor(w, dtype=torch.float32),
                    torch.tensor(mask))
    assert abs(float(f32) - want) < 1e-5 * (1 + abs(want))
    assert kd_sparse(st, torch.tensor(ids), torch.tensor(w), torch.zeros(B, T)).item() == 0.0  # nothing real
    with pytest.raises(ValueError, match=r"sparse_ids: expected ids in \[0, 11\)"):
        kd_sparse(st, torch.tensor(np.where(real[..., None], V, ids)), torch.tensor(w), torch.tensor(mask))


def teacher_and_student(V: int = 40, seed: int = 3):
    rng = np.random.default_rng(seed)
    z = np.float16(rng.normal(size=V) * 1.2).astype(np.float64)  # fp16-exact: storing the top-k logits loses nothing
    s = rng.normal(size=V)
    p, q = np.exp(log_softmax(z)), np.exp(log_softmax(s))
    return z, s, p, q


def estimated_gradients(z: np.ndarray, s: np.ndarray, top_k: int, draws: int = 4000) -> np.ndarray:
    """(draws, V) float64 gradients of kd_sparse at student s, one independent cache draw per row: the draws,
    their stored form and the reader's weights all come from the real code (kdlib/cache/sampling.py)."""
    V = len(z)
    logits = torch.tensor(z, dtype=torch.float32).expand(draws, V)
    top = torch.topk(logits, top_k, dim=-1) if top_k else None
    ids, counts, sizes = compact(draw(logits, N, np.random.default_rng(7), top.indices if top_k else None), np.uint16)
    topk = None
    if top_k:
        topk = (top.indices.numpy()[None], top.values.half().float().numpy()[None],
                torch.logsumexp(logits, -1).numpy()[None])
    sparse_ids, weights = sparse_targets([ids], [counts], [sizes], np.array([draws]), draws, N, topk)
    assert sizes.astype(np.int64).sum() == len(ids)
    student = torch.tensor(s).expand(1, draws, V).clone().requires_grad_(True)
    kd_sparse(student, torch.from_numpy(sparse_ids), torch.from_numpy(weights), None).backward()
    return student.grad[0].numpy() * draws  # the loss is a mean over the draws


@pytest.mark.parametrize("top_k", [0, K])
def test_the_estimated_gradient_is_unbiased_and_top_k_alone_is_not(top_k):
    z, s, p, q = teacher_and_student()
    dense = q - p  # the dense KL(p || q) gradient with respect to the student logits
    g = estimated_gradients(z, s, top_k)
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
    top = np.argsort(-z)[:top_k]
    varies = se > 1e-9  # ids drawn in some caches and not in others
    # within 4 standard errors per coordinate (+1e-6: the weights are float32)
    assert (np.abs(mean - dense)[varies] <= 4 * se[varies] + 1e-6).all(), (np.abs(mean - dense) / se)[varies]
    # the rest: the top-k, exact in every cache, and ids so rare that no draw hit them, which was likely
    assert np.allclose(g[:, top], dense[top], atol=1e-6) and not varies[top].any()
    never = np.setdiff1d(np.flatnonzero(~varies), top)
    assert len(never) <= 3 and (N * len(g) * p[never] < 9.2).all()  # P(no draw) = (1 - p)^(N draws) > 1e-4
    assert varies.sum() >= len(z) - top_k - 3
    # top-k alone, renormalised (kd_topk's default): deterministic, and off by many standard errors
    top = torch.topk(torch.tensor(z), K)
    student = torch.tensor(s)[None, None].clone().requires_grad_(True)
    kd_topk(student, top.indices[None, None], top.values[None, None], torch.logsumexp(torch.tensor(z), -1)[None, None],
            None).backward()
    biased = student.grad[0, 0].numpy()
    missing = 1 - p[top.indices.numpy()].sum()
    assert 0.2 < missing < 0.8  # a real tail: what top-k drops
    assert np.abs(biased - dense).max() > 20 * se.max()
    assert (np.abs(biased - dense) > 4 * se + 1e-6).sum() >= 20  # of the 36 ids outside the top-k


def test_fidelity_figures_by_hand():
    z, s, p, q = teacher_and_student(V=6, seed=1)
    logits = torch.tensor(z)[None]
    w = np.array([0.5, 0.0, 0.25, 0.0, 0.25, 0.0])  # a sampled estimate: all the mass on the drawn ids
    figures = estimate_fidelity(logits, torch.tensor(w)[None], torch.tensor(w)[None], torch.tensor(p)[None])
    qs = np.exp(log_softmax(0.5 * z))
    dense, grad = qs - p, qs - w
    assert abs(float(figures["tv"]) - 0.5 * np.abs(p - w).sum()) < 1e-12
    assert float(figures["kl"]) == np.inf  # p has mass where the estimate has none
    cos = grad @ dense / np.linalg.norm(grad) / np.linalg.norm(dense)
    assert abs(float(figures["grad_cosine"]) - cos) < 1e-12
    assert abs(float(figures["grad_error_norm"]) - np.linalg.norm(p - w)) < 1e-12
    assert float(figures["grad_bias_norm"]) < 1e-15  # E[w] = p
    spread = np.full(6, 0.1)
    spread[[0, 2]] = [0.5, 0.3]
    kl = float(estimate_fidelity(logits, torch.tensor(spread)[None], torch.tensor(w)[None], torch.tensor(p)[None])["kl"])
    assert abs(kl - (p * (np.log(p) - np.log(spread))).sum()) < 1e-12


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"sampled_tokens: expected 0 \(none\) to 255 draws per position, got 256"):
        TeacherOutputsConfig(sampled_tokens=256)
    with pytest.raises(ValueError, match="sampled_tokens: expected .* got -1"):
        TeacherOutputsConfig(sampled_tokens=-1)
    with pytest.raises(ConfigError, match=r"x.yaml: field 'teacher_outputs.sampled_tokens': a sampled tail needs ids "
                                          r"outside the top-k, but top_k 30 covers the teacher's whole vocabulary"):
        check_against_teacher("x.yaml", {"vocab_size": 30}, outputs=TeacherOutputsConfig(top_k=30, sampled_tokens=4))


def test_a_loss_reading_samples_names_where_to_get_them():
    from kdlib.training.objective_plan import plan_objective
    from kdlib.training.providers import Offer

    with pytest.raises(ValueError, match=r"kd_sparse needs cached sampled teacher ids \(sparse_ids\): the transfer "
                                         r"set lacks it: make it with teacher_outputs.sampled_tokens > 0"):
        plan_objective("kd_sparse", Offer(online_teacher=True, cached=frozenset({"topk_ids", "topk_logits"})))
    plan = plan_objective("kd_sparse", Offer(online_teacher=False, cached=frozenset({"sparse_ids", "sparse_weights"})))
    assert plan.inputs == ["student_logits", "sparse_ids", "sparse_weights", "mask"]


# ---------------------------------------------------------------- stored draws, by hand from the teacher


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A trained tiny teacher with a pure-sampling set (the fixture's writer), and a top-k + sampled-tail set
    made by the real pipeline (2 Beam workers) from that teacher."""
    root = tmp_path_factory.mktemp("sparse")
    fixture = build_transfer_set(root / "fixture", rows=96, top_k=0, sampled_tokens=N, teacher_steps=20)
    out = root / "pipeline"
    cfg = corpus_config(fixture["teacher"], out, augment={"copies": 0}, max_length=32, num_shards=2, pack_groups=2,
                        corpus={"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line",
                                "max_documents": 40},
                        teacher_outputs={"top_k": K, "sampled_tokens": N, "fidelity_positions": 256})
    run_pipeline(root, cfg)
    return {"root": root, "teacher": fixture["teacher"], "pure": fixture["transfer"], "combined": out, "config": cfg}


def teacher_logits(teacher, batch) -> torch.Tensor:
    model = load_model(ModelConfig(path=str(teacher), task="masked_lm"))
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()


def binomial_z(observed: float, expected: np.ndarray, n: int) -> float:
    """z-score of a total count of draws against sum of n * p (independent binomials)."""
    return (observed - n * expected.sum()) / np.sqrt((n * expected * (1 - expected)).sum())


@pytest.mark.slow
def test_pure_sampling_weights_are_counts_over_n_and_follow_the_teacher(built):
    ts = TransferSet(built["pure"])
    assert ts.manifest.cached["sampled_tokens"] == N and ts.manifest.cached["top_k"] == 0
    rows = list(range(len(ts)))
    batch = ts.batch(rows)
    assert "topk_ids" not in batch and batch["sparse_ids"].dtype == torch.int64
    real = batch["attention_mask"].bool()
    observed, expected = 0.0, []
    logits = teacher_logits(built["teacher"], batch)
    most_drawn = teacher_top1(batch)  # pretrain's evaluation: without a top-k, the most drawn id (lowest on ties)
    for b, index in enumerate(rows):
        row = ts.row(index)
        sizes = row["sample_sizes"].astype(np.int64)
        assert row["sample_ids"].dtype == np.uint16 and row["sample_counts"].dtype == np.uint8
        assert len(sizes) == len(row["input_ids"]) and sizes.max() <= N
        starts = np.r_[0, np.cumsum(sizes)]
        for t in range(len(sizes)):
            ids = row["sample_ids"][starts[t]:starts[t + 1]].astype(np.int64)
            counts = row["sample_counts"][starts[t]:starts[t + 1]].astype(np.float64)
            assert counts.sum() == N and (np.diff(ids) > 0).all()  # unique ids, ascending
            m = len(ids)
            assert batch["sparse_ids"][b, t, :m].tolist() == ids.tolist()
            assert batch["sparse_weights"][b, t, :m].tolist() == (counts / N).tolist()  # exact in float32
            assert (batch["sparse_weights"][b, t, m:] == 0).all()
            assert int(most_drawn[b, t]) == ids[counts == counts.max()].min()
            p = torch.softmax(logits[b, t], -1).numpy()
            top1 = int(p.argmax())
            observed += counts[ids == top1].sum()
            expected.append(p[top1])
    assert (batch["sparse_weights"][~real] == 0).all()
    assert torch.allclose(batch["sparse_weights"].sum(-1)[real], torch.ones(()), atol=1e-6)
    expected = np.array(expected)
    assert expected.mean() > 5 / logits.shape[-1]  # far from uniform: the check below tells the teacher from noise
    assert abs(binomial_z(observed, expected, N)) < 4, binomial_z(observed, expected, N)


def test_draws_depend_on_the_seed_alone():
    z = torch.randn(2, 7, 50) * 2
    mask = torch.ones(2, 7, dtype=torch.long)
    outputs = TeacherOutputsConfig(top_k=3, sampled_tokens=N)
    raw = {"logits": z}
    a = rows_from_outputs(raw, mask, mask, outputs, 50, seeds=[11, 12])
    b = rows_from_outputs(raw, mask, mask, outputs, 50, seeds=[11, 99])
    assert all(np.array_equal(a[0][k], b[0][k]) for k in ("sample_ids", "sample_counts", "sample_sizes"))
    assert not np.array_equal(a[1]["sample_ids"], b[1]["sample_ids"])
    top = torch.topk(z, 3).indices
    for i in range(2):
        sizes = a[i]["sample_sizes"].astype(np.int64)
        starts = np.r_[0, np.cumsum(sizes)]
        for t in range(7):
            assert not set(a[i]["sample_ids"][starts[t]:starts[t + 1]].tolist()) & set(top[i, t].tolist())
    with pytest.raises(ValueError, match="seeds: sampled_tokens needs one seed per row"):
        rows_from_outputs(raw, mask, mask, outputs, 50)


@pytest.mark.slow
def test_combined_weights_are_exact_top_k_then_rest_times_counts_over_n(built):
    ts = TransferSet(built["combined"])
    m = read_manifest(built["combined"])
    assert m.cached["sampled_tokens"] == N and m.cached["top_k"] == K
    f = m.fidelity["sampled"]
    assert f["positions"] == m.fidelity["positions"] > 100 and f["mean_kl"] is None and f["tail"] is True
    assert 0 < f["mean_tv"] < 1 and 0 < f["mean_grad_cosine"] <= 1
    assert f["mean_grad_bias_norm"] < 1e-2 * f["mean_grad_error_norm"]  # unbiased up to the fp16 top-k
    rows = list(range(0, len(ts), max(1, len(ts) // 48)))
    batch = ts.batch(rows)
    logits = teacher_logits(built["teacher"], batch)
    lean = TransferSet(built["combined"])
    lean.read_only(["sparse_ids", "sparse_weights"])  # only the columns these keys need
    small = lean.batch(rows)
    assert torch.equal(small["sparse_ids"], batch["sparse_ids"]) and torch.equal(small["sparse_weights"],
                                                                                batch["sparse_weights"])
    assert "mlm_labels" not in small
    assert torch.equal(teacher_top1(batch), batch["topk_ids"][..., 0])
    observed, expected = 0.0, []
    for b, index in enumerate(rows):
        row = ts.row(index)
        top_ids = row["topk_ids"].astype(np.int64).reshape(-1, K)
        top_logits = row["topk_logits"].astype(np.float64).reshape(-1, K)
        lse = row["lse"].astype(np.float64)
        sizes = row["sample_sizes"].astype(np.int64)
        starts = np.r_[0, np.cumsum(sizes)]
        for t in range(len(sizes)):
            p_online = torch.softmax(logits[b, t], -1).numpy()
            assert top_ids[t].tolist() == np.argsort(-p_online, kind="stable")[:K].tolist()
            p_top = np.exp(top_logits[t] - lse[t])  # by hand from the stored columns
            assert np.allclose(p_top, p_online[top_ids[t]], rtol=5e-3, atol=1e-7)  # fp16 logits
            r = 1 - p_top.sum()
            ids = row["sample_ids"][starts[t]:starts[t + 1]].astype(np.int64)
            counts = row["sample_counts"][starts[t]:starts[t + 1]].astype(np.float64)
            assert counts.sum() == N and not set(ids) & set(top_ids[t])
            got_ids, got_w = batch["sparse_ids"][b, t].numpy(), batch["sparse_weights"][b, t].numpy()
            assert got_ids[:K].tolist() == top_ids[t].tolist() and got_ids[K:K + len(ids)].tolist() == ids.tolist()
            assert np.allclose(got_w[:K], p_top, rtol=1e-6, atol=0)
            assert np.allclose(got_w[K:K + len(ids)], r * counts / N, rtol=1e-6, atol=1e-9)
            assert (got_w[K + len(ids):] == 0).all()
            tail = p_online.copy()
            tail[top_ids[t]] = 0
            tail /= tail.sum()
            top_tail = int(tail.argmax())
            observed += counts[ids == top_tail].sum()
            expected.append(tail[top_tail])
    expected = np.array(expected)
    assert abs(binomial_z(observed, expected, N)) < 4, binomial_z(observed, expected, N)


@pytest.mark.slow
def test_a_rebuilt_shard_is_byte_identical(built):
    original = read_manifest(built["combined"])
    out = built["root"] / "rebuilt"
    shutil.copytree(built["combined"], out)
    gone = original.shards[1]
    (out / gone.file).unlink()
    (out / "shards" / f"{gone.name}.json").unlink()
    cfg = dict(built["config"], output_dir=str(out))
    run_pipeline(built["root"], cfg, ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"])
    assert sha256_file(out / gone.file) == gone.sha256  # other worker count, same draws, same bytes
    assert [s.sha256 for s in read_manifest(out).shards] == [s.sha256 for s in original.shards]
    assert pq.read_table(out / gone.file).equals(pq.read_table(built["combined"] / gone.file))


# ---------------------------------------------------------------- training and resuming


SPARSE_RUN = {"objectives": [{"name": "kd_sparse", "weight": 1.0}, {"name": "mlm_ce", "weight": 0.5}],
              "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "eval_rows": 64}


@pytest.mark.slow
def test_a_pipeline_built_sampled_set_trains_and_resumes_bit_exactly(built, tmp_path):
    paths = {"teacher": built["teacher"], "transfer": built["combined"]}
    ref = tmp_path / "reference"
    proc = run_pretrain(write_config(base_config(paths, ref, **SPARSE_RUN), tmp_path / "reference.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = {r["step"]: r for r in read_metrics(ref / "metrics.jsonl")}
    assert sorted(theirs) == [1, 2, 3, 4]
    assert all(np.isfinite(r["kd_sparse"]) and r["kd_sparse"] > 0 for r in theirs.values())
    assert theirs[4]["kd_sparse"] < theirs[1]["kd_sparse"]  # it learns from the estimate

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    (resumed / "checkpoints" / "latest").write_text("step-2\n")
    proc = run_pretrain(write_config(base_config(paths, resumed, **SPARSE_RUN), tmp_path / "resumed.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    mine = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(mine) == [3, 4]
    assert all(mine[s]["kd_sparse"] == theirs[s]["kd_sparse"] and mine[s]["loss"] == theirs[s]["loss"] for s in mine)
    a, b = export_weights(resumed / "export"), export_weights(ref / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
