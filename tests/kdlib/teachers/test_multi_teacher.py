"""Multi-teacher targets: combine_teacher_logits equals a float64 numpy average (of logits, or of probabilities
at T, whose softmax(z / T) is exactly the teachers' mixture), and MultiTeacherSet over real transfer sets,
built in-process by data_pipeline from one fastText file with two tiny classifier teachers, returns the
hand average of the two sets' own batches; sets of other rows, one teacher twice, other token sequences,
other label orders or no dense logits are CacheErrors naming what differs."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import PipelineConfig
from data_pipeline.pipeline import run
from data_pipeline.runners import direct_defaults
from kdlib.text.augment import AugmentConfig
from kdlib.cache import TransferSet
from kdlib.errors import CacheError
from kdlib.runtime.models import ModelConfig
from kdlib.teachers.multi_teacher import MultiTeacherConfig, MultiTeacherSet, combine_teacher_logits
from kdlib.tasks.readers import TaskConfig
from kdlib.schemas import TeacherOutputsConfig
from tests.tiny_models import make_tiny_bert, tiny_vocab

EPS64, EPS32 = np.finfo(np.float64).eps, np.finfo(np.float32).eps
IN_PROCESS = ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"]
LINES = 24


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hand_combine(zs: list[np.ndarray], weights: list[float], combine: str, T: float) -> np.ndarray:
    """float64 reference: weighted mean of logits, or T * log of the weighted mean of softmax(z_i / T)."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    zs = [np.asarray(z, dtype=np.float64) for z in zs]
    if combine == "mean_logits":
        return sum(wi * z for wi, z in zip(w, zs))
    return T * np.log(sum(wi * softmax(z / T) for wi, z in zip(w, zs)))


# ---------------------------------------------------------------- the pure combination


@pytest.mark.parametrize("weights", [[], [3.0, 1.0, 0.5]])
def test_mean_logits_is_the_weighted_mean(weights):
    rng = np.random.default_rng(0)
    zs = [rng.normal(scale=4.0, size=(5, 7)) for _ in range(3)]
    out = combine_teacher_logits([torch.from_numpy(z) for z in zs], MultiTeacherConfig(weights=weights))
    expected = hand_combine(zs, weights or [1, 1, 1], "mean_logits", 1.0)
    assert out.dtype == torch.float64 and out.shape == (5, 7)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=8 * EPS64 * np.abs(zs).max())
    if not weights:
        np.testing.assert_allclose(out.numpy(), (zs[0] + zs[1] + zs[2]) / 3, rtol=0, atol=8 * EPS64 * np.abs(zs).max())
    z32 = combine_teacher_logits([torch.from_numpy(z.astype(np.float32)) for z in zs], MultiTeacherConfig(weights=weights))
    expected32 = hand_combine([z.astype(np.float32) for z in zs], weights or [1, 1, 1], "mean_logits", 1.0)
    assert z32.dtype == torch.float32  # float64 inside, one rounding to float32 at the end
    np.testing.assert_allclose(z32.numpy(), expected32, rtol=0, atol=EPS32 * np.abs(expected32).max())


@pytest.mark.parametrize("weights, T", [([], 1.0), ([1.0, 2.0, 5.0], 2.0), ([0.2, 0.0, 0.8], 0.5)])
def test_mean_probs_has_the_mixture_as_its_softmax(weights, T):
    rng = np.random.default_rng(1)
    zs = [rng.normal(scale=30.0, size=(4, 6)) for _ in range(3)]  # peaked: naive exp(z / 0.5) overflows float32
    cfg = MultiTeacherConfig(combine="mean_probs", weights=weights, temperature=T)
    out = combine_teacher_logits([torch.from_numpy(z) for z in zs], cfg).numpy()
    w = np.asarray(weights or [1, 1, 1], dtype=np.float64)
    w = w / w.sum()
    mixture = sum(wi * softmax(z / T) for wi, z in zip(w, zs))
    # softmax(z / T) is exactly the weighted mean of the teachers' softmax(z_i / T) (up to float64 rounding of z)
    np.testing.assert_allclose(softmax(out / T), mixture, rtol=0, atol=16 * EPS64 * np.abs(out).max() / T)
    # log(mixture) errs absolutely by ~ its relative error, which is set by rounding of z_i / T - max (|z| / T * eps)
    finite = mixture > 1e-300  # a class no teacher gives mass has z = T log(tiny): compare where defined
    np.testing.assert_allclose(out[finite], hand_combine(zs, w.tolist(), "mean_probs", T)[finite], rtol=0,
                               atol=16 * EPS64 * np.abs(zs).max())
    np.testing.assert_allclose(np.log(np.exp(out / T).sum(axis=-1)), 0.0, atol=1e-12)  # already normalised
    if weights and weights[1] == 0.0:  # a zero-weight teacher changes nothing
        two = combine_teacher_logits([torch.from_numpy(zs[0]), torch.from_numpy(zs[2])],
                                     MultiTeacherConfig(combine="mean_probs", weights=[0.2, 0.8], temperature=T))
        np.testing.assert_allclose(out, two.numpy(), rtol=0, atol=8 * EPS64 * np.abs(out).max())


def test_mean_probs_of_one_teacher_is_its_log_softmax_times_T():
    z = torch.tensor([[1.0, 2.0, 3.0], [-5.0, 0.0, 5.0]], dtype=torch.float64)
    out = combine_teacher_logits([z], MultiTeacherConfig(combine="mean_probs", temperature=2.0))
    np.testing.assert_allclose(out.numpy(), 2.0 * np.log(softmax(z.numpy() / 2.0)), rtol=0, atol=8 * EPS64 * 5)


@pytest.mark.parametrize("kwargs, field", [
    ({"combine": "max_logits"}, "combine"), ({"weights": [1.0, -0.5]}, "weights"), ({"weights": [0.0, 0.0]}, "weights"),
    ({"weights": [float("nan"), 1.0]}, "weights"), ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        MultiTeacherConfig(**kwargs)


def test_weights_must_match_the_teachers_and_shapes_must_agree():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^weights: expected one weight per teacher \(2\), got 3"):
        combine_teacher_logits([z, z], MultiTeacherConfig(weights=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"^logits: expected T tensors of one \(B, C\) shape"):
        combine_teacher_logits([z, torch.zeros(2, 4)], MultiTeacherConfig())
    with pytest.raises(ValueError, match=r"^logits: expected at least one"):
        combine_teacher_logits([], MultiTeacherConfig())


# ---------------------------------------------------------------- real transfer sets


def write_task(path: Path, lines: int, blank_after: int | None = None) -> Path:
    """A fastText file of `lines` examples of 4..30 words from the tiny vocabulary (so some exceed 16 tokens)."""
    rng = np.random.default_rng(0)
    words = [w for w in tiny_vocab() if w.isalpha() and len(w) > 2][:300]
    out = []
    for i in range(lines):
        out.append(f"__label__{'pos' if rng.random() < 0.5 else 'neg'} "
                   + " ".join(rng.choice(words, size=int(rng.integers(4, 31)))))
        if blank_after is not None and i == blank_after:
            out.append("")  # skipped by the reader, but every later line number (and so row id) shifts
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path


def build(root: Path, name: str, teacher: Path, task: Path, *, max_length: int = 32, labels: list | None = None,
          outputs: dict | None = None) -> Path:
    cfg = PipelineConfig(
        teacher=ModelConfig(path=str(teacher), task="sequence_classification"), output_dir=str(root / name),
        task=TaskConfig(kind="fasttext", path=str(task)), labels=labels or [], max_length=max_length,
        augment=AugmentConfig(copies=1, mask_prob=0.1, ngram_prob=0.25, seed=1),
        teacher_outputs=TeacherOutputsConfig(**(outputs or {"dense_logits": True})),
        num_shards=2, batch_size=8, torch_threads=1)
    run(cfg, direct_defaults(IN_PROCESS))
    return root / name


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two teachers over the same rows (a; b also caches pooled), and sets that differ from a in one way each."""
    root = tmp_path_factory.mktemp("multi")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLIB_CACHE_DIR", str(root / "kdlib-cache"))
        threads = torch.get_num_threads()
        try:
            t1 = make_tiny_bert(root / "t1", task="sequence_classification", layers=2, hidden=32, heads=4, seed=1)
            t2 = make_tiny_bert(root / "t2", task="sequence_classification", layers=2, hidden=32, heads=4, seed=2)
            task = write_task(root / "data" / "task.txt", LINES)
            return {
                "a": build(root, "a", t1, task),
                "b": build(root, "b", t2, task, outputs={"dense_logits": True, "pooled": "mean"}),
                "shifted": build(root, "shifted", t2, write_task(root / "data-shifted" / "task.txt", LINES, blank_after=9)),
                "fewer": build(root, "fewer", t2, write_task(root / "data-fewer" / "task.txt", LINES - 3)),
                "truncated": build(root, "truncated", t2, task, max_length=16),
                "relabelled": build(root, "relabelled", t2, task, labels=["pos", "neg"]),
                "no_logits": build(root, "no_logits", t2, task, outputs={"pooled": "mean"}),
            }
        finally:
            torch.set_num_threads(threads)


def numpy_logits(batch: dict) -> np.ndarray:
    return batch["teacher_logits"].numpy().astype(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [MultiTeacherConfig(), MultiTeacherConfig(weights=[3.0, 1.0]),
                                 MultiTeacherConfig(combine="mean_probs", temperature=2.0),
                                 MultiTeacherConfig(combine="mean_probs", weights=[1.0, 4.0], temperature=1.0)])
def test_batches_hold_the_hand_average_of_both_sets_batches(sets, cfg):
    a, b = TransferSet(sets["a"]), TransferSet(sets["b"])
    assert len(a) == len(b) == 2 * LINES  # one augmented copy per example
    multi = MultiTeacherSet([a, b], cfg)
    assert len(multi) == len(a)
    idx = [5, 0, 47, 13, 30, 2]
    ours, first, second = multi.batch(idx, pad_id=0), a.batch(idx), b.batch(idx)
    za, zb = numpy_logits(first), numpy_logits(second)
    assert np.abs(za - zb).max() > 1e-3  # two different teachers: the average is not trivially either one
    expected = hand_combine([za, zb], cfg.weights or [1, 1], cfg.combine, cfg.temperature)
    got = ours["teacher_logits"].numpy().astype(np.float64)
    assert ours["teacher_logits"].dtype == torch.float32 and got.shape == (6, 2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2 * EPS32 * np.abs(expected).max())
    if cfg.combine == "mean_probs":
        w = np.asarray(cfg.weights or [1, 1], dtype=np.float64)
        mixture = (w[0] * softmax(za / cfg.temperature) + w[1] * softmax(zb / cfg.temperature)) / w.sum()
        np.testing.assert_allclose(softmax(got / cfg.temperature), mixture, rtol=0,
                                   atol=4 * EPS32 * np.abs(got).max() / cfg.temperature)
    assert torch.equal(ours["teacher_logits_each"], torch.stack([first["teacher_logits"], second["teacher_logits"]]))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], first[key]), key
    assert ours["ids"] == first["ids"] == second["ids"]
    assert "teacher_pooled" in second and "teacher_pooled" not in MultiTeacherSet([b, a], cfg).batch(idx)
    assert set(multi.batch_keys()) == {k for k in ours if k.startswith("teacher_") or k == "labels"}


@pytest.mark.slow
def test_batches_from_several_threads_equal_serial_ones(sets):
    multi = MultiTeacherSet([TransferSet(sets["a"], max_open_shards=1), TransferSet(sets["b"], max_open_shards=1)])
    batches = [[i, (i * 7) % 48, (i * 13 + 5) % 48] for i in range(24)]
    serial = [multi.batch(ix)["teacher_logits"] for ix in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda ix: multi.batch(ix)["teacher_logits"], batches))
    assert all(torch.equal(s, p) for s, p in zip(serial, parallel))


@pytest.mark.slow
def test_sets_of_other_rows_name_the_first_differing_row(sets):
    a, shifted = TransferSet(sets["a"]), TransferSet(sets["shifted"])
    ids_a = [a.row(i)["id"] for i in range(len(a))]
    ids_s = [shifted.row(i)["id"] for i in range(len(shifted))]
    first = next(i for i, (x, y) in enumerate(zip(ids_a, ids_s)) if x != y)
    assert len(ids_a) == len(ids_s) and ids_a != ids_s
    with pytest.raises(CacheError, match=rf"shifted: row {first} has id '{ids_s[first]}' but .*/a row {first} has "
                                         rf"id '{ids_a[first]}'; the sets must hold the same rows"):
        MultiTeacherSet([a, shifted])
    with pytest.raises(CacheError, match=rf"fewer: holds {2 * (LINES - 3)} rows, but .*/a holds {2 * LINES}"):
        MultiTeacherSet([a, TransferSet(sets["fewer"])])


@pytest.mark.slow
def test_the_same_teacher_twice_is_refused(sets):
    a = TransferSet(sets["a"])
    with pytest.raises(CacheError, match=rf"/a and .*/a: both were made by teacher {a.manifest.teacher_fingerprint}"):
        MultiTeacherSet([a, TransferSet(sets["a"])])


@pytest.mark.slow
def test_other_token_sequences_are_refused_per_batch(sets):
    a, truncated = TransferSet(sets["a"]), TransferSet(sets["truncated"])
    multi = MultiTeacherSet([a, truncated])  # same rows (ids), another teacher: accepted at open
    lengths = [len(a.row(i)["input_ids"]) for i in range(len(a))]
    short = [i for i, n in enumerate(lengths) if n <= 16][:4]
    long = next(i for i, n in enumerate(lengths) if n > 16)
    assert len(short) == 4
    np.testing.assert_array_equal(multi.batch(short)["teacher_logits_each"][1].numpy(),
                                  truncated.batch(short)["teacher_logits"].numpy())  # identical rows are fine
    with pytest.raises(CacheError, match=rf"truncated: row {long} has other input ids than in .*/a"):
        multi.batch(short[:2] + [long])


@pytest.mark.slow
def test_other_label_orders_and_missing_logits_are_refused(sets):
    a = TransferSet(sets["a"])
    with pytest.raises(CacheError, match=r"relabelled: label names \['pos', 'neg'\] differ from .*/a's \['neg', 'pos'\]"):
        MultiTeacherSet([a, TransferSet(sets["relabelled"])])
    with pytest.raises(CacheError, match=r"no_logits: holds no dense teacher logits"):
        MultiTeacherSet([a, TransferSet(sets["no_logits"])])
    with pytest.raises(ValueError, match=r"^sets: expected at least 2"):
        MultiTeacherSet([a])
    with pytest.raises(ValueError, match=r"^weights: expected one weight per teacher \(2\), got 3"):
        MultiTeacherSet([a, TransferSet(sets["b"])], MultiTeacherConfig(weights=[1.0, 1.0, 1.0]))
