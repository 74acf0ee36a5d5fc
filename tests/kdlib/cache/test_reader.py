"""The transfer-set reader: batches equal a plain reference built from pyarrow's to_pylist(), the fast
batch() path equals collate(rows()), and shard hashes are checked eagerly, lazily (once per process,
from the bytes that are parsed) or not at all."""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import kdlib.cache.reader as reader
from kdlib.cache import (FORMAT_VERSION, Manifest, TransferSet, collate_rows, read_manifest, row_schema,
                         rows_to_table, shard_name, write_manifest, write_shard)
from kdlib.errors import CacheError
from kdlib.text.padding import pad_flat, pad_sequences

VOCAB, K, H, C, LAYERS, IGNORE = 504, 4, 6, 3, (1, 3), -100
SHARD_ROWS = (7, 1, 12)


def make_rows(rng: np.random.Generator, count: int, start: int) -> list[dict]:
    """Random rows of 1..20 positions with every column kind; some rows have no label or no masked position."""
    rows = []
    for n in range(start, start + count):
        T = int(rng.integers(1, 21))
        masked = np.sort(rng.choice(T, size=int(rng.integers(0, T // 3 + 2)) if T > 1 else 0, replace=False))
        rows.append({
            "id": f"row-{n:04d}", "source_id": f"doc-{n // 3}", "augmentation": "original" if n % 2 else "copy1",
            "input_ids": rng.integers(0, VOCAB, T).astype(np.int32),
            "label": None if n % 5 == 0 else int(rng.integers(0, 3)),
            "mlm_positions": masked.astype(np.int32), "mlm_labels": rng.integers(0, VOCAB, len(masked)).astype(np.int32),
            "topk_ids": rng.integers(0, VOCAB, T * K).astype(np.uint16),
            "topk_logits": rng.normal(size=T * K).astype(np.float16),
            "lse": rng.normal(size=T).astype(np.float32),
            "logits": rng.normal(size=C).astype(np.float32),
            **{f"hidden_{layer}": rng.normal(size=T * H).astype(np.float16) for layer in LAYERS},
            "pooled": rng.normal(size=H).astype(np.float32),
        })
    return rows


@pytest.fixture
def transfer(tmp_path):
    """Three shards of 7, 1 and 12 rows with top-k, MLM, labels, dense logits, two hidden layers and pooled."""
    rng = np.random.default_rng(0)
    schema = row_schema(vocab_size=VOCAB, top_k=K, dense_logits=True, hidden_layers=list(LAYERS), pooled=True,
                        has_labels=True, has_mlm=True)
    out, infos, start = tmp_path / "transfer", [], 0
    for s, count in enumerate(SHARD_ROWS):
        infos.append(write_shard(out, shard_name(s, len(SHARD_ROWS)), rows_to_table(make_rows(rng, count, start), schema)))
        start += count
    write_manifest(out, Manifest(
        format_version=FORMAT_VERSION, teacher={"ref": "t", "fingerprint": "teacher-fp", "task": "masked_lm",
                                                "vocab_size": VOCAB, "num_layers": 4, "hidden_size": H},
        tokenizer_fingerprint="tok-fp", config={}, config_hash="x",
        cached={"top_k": K, "dense_logits": True, "hidden_layers": list(LAYERS), "pooled": "mean", "labels": ["a", "b", "c"],
                "mlm": True},
        dtypes={}, max_length=20, shards=infos, totals={"rows": start}, fidelity={}))
    return out


def pylist_rows(directory) -> list[dict]:
    """Every row in global order, as plain Python values straight from pyarrow."""
    return [r for s in read_manifest(directory).shards for r in pq.read_table(directory / s.file).to_pylist()]


def reference_batch(rows: list[dict], pad_id: int) -> dict:
    """The batch built position by position in plain Python: what collate must return."""
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    ids, mask, mlm = [[pad_id] * T for _ in rows], [[0] * T for _ in rows], [[IGNORE] * T for _ in rows]
    tk_ids, tk_logits = [[[0] * K for _ in range(T)] for _ in rows], [[[0.0] * K for _ in range(T)] for _ in rows]
    lse = [[0.0] * T for _ in rows]
    hidden = {layer: [[[0.0] * H for _ in range(T)] for _ in rows] for layer in LAYERS}
    for i, r in enumerate(rows):
        for j, token in enumerate(r["input_ids"]):
            ids[i][j], mask[i][j], lse[i][j] = token, 1, r["lse"][j]
            for c in range(K):
                tk_ids[i][j][c], tk_logits[i][j][c] = r["topk_ids"][j * K + c], r["topk_logits"][j * K + c]
            for layer in LAYERS:
                for h in range(H):
                    hidden[layer][i][j][h] = r[f"hidden_{layer}"][j * H + h]
        for p, label in zip(r["mlm_positions"], r["mlm_labels"]):
            mlm[i][p] = label
    out = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long),
           "ids": [r["id"] for r in rows], "mlm_labels": torch.tensor(mlm, dtype=torch.long),
           "labels": torch.tensor([IGNORE if r["label"] is None else r["label"] for r in rows], dtype=torch.long),
           "topk_ids": torch.tensor(tk_ids, dtype=torch.long), "topk_logits": torch.tensor(tk_logits, dtype=torch.float32),
           "teacher_lse": torch.tensor(lse, dtype=torch.float32),
           "teacher_logits": torch.tensor([r["logits"] for r in rows], dtype=torch.float32)}
    out.update({f"teacher_hidden_{layer}": torch.tensor(hidden[layer], dtype=torch.float32) for layer in LAYERS})
    out["teacher_pooled"] = torch.tensor([r["pooled"] for r in rows], dtype=torch.float32)
    assert out["input_ids"].shape == (B, T)
    return out


def assert_same_batch(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)  # same keys, same order
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


BATCHES = [[0, 1, 2], [7], [19, 3, 7, 8, 0], [5, 5, 12], list(range(20))]


@pytest.mark.parametrize("indices", BATCHES)
def test_collate_and_batch_equal_the_plain_reference(transfer, indices):
    plain = pylist_rows(transfer)
    ts = TransferSet(transfer, verify="lazy", max_open_shards=1)
    expected = reference_batch([plain[i] for i in indices], pad_id=3)
    assert expected["input_ids"].shape[1] == max(len(plain[i]["input_ids"]) for i in indices)
    assert_same_batch(ts.collate(ts.rows(indices), pad_id=3), expected)
    assert_same_batch(ts.batch(indices, pad_id=3), expected)
    # row dicts of plain lists (as other callers build them) take the same path
    assert_same_batch(collate_rows([plain[i] for i in indices], top_k=K, hidden_size=H, pad_id=3), expected)


def test_the_batch_really_pads_rows_of_different_lengths(transfer):
    plain = pylist_rows(transfer)
    lengths = [len(r["input_ids"]) for r in plain]
    assert len(set(lengths)) > 5 and min(lengths) < max(lengths)
    assert any(not r["mlm_positions"] for r in plain) and any(r["label"] is None for r in plain)
    batch = TransferSet(transfer).batch(range(20), pad_id=7)
    short = int(np.argmin(lengths))
    assert batch["attention_mask"][short].sum() == lengths[short]
    assert (batch["input_ids"][short, lengths[short]:] == 7).all()
    assert (batch["topk_ids"][short, lengths[short]:] == 0).all()


def test_rows_hold_stored_dtypes_and_values(transfer):
    plain = pylist_rows(transfer)
    ts = TransferSet(transfer)
    assert len(ts) == sum(SHARD_ROWS) == len(plain)
    for i in (0, 6, 7, 8, 19):
        row = ts.row(i)
        assert list(row) == list(plain[i])
        assert row["topk_ids"].dtype == np.uint16 and row["topk_logits"].dtype == np.float16
        assert row["input_ids"].dtype == np.int32 and row["hidden_3"].dtype == np.float16
        for name, value in plain[i].items():
            if isinstance(value, list):
                assert row[name].tolist() == value, name
            else:
                assert row[name] == value, name
    with pytest.raises(IndexError, match=r"row 20 out of range \[0, 20\)"):
        ts.row(20)


def test_threads_reading_at_once_get_the_same_batches(transfer):
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 20, size=4).tolist() for _ in range(40)]
    ts = TransferSet(transfer, verify="lazy", max_open_shards=1)  # constant eviction: the cache is contended
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ts.batch, batches))
    plain = pylist_rows(transfer)
    for indices, got in zip(batches, results):
        assert_same_batch(got, reference_batch([plain[i] for i in indices], pad_id=0))


# ---------------------------------------------------------------- verification


def garble(path) -> None:
    """Overwrite a file with as many garbage bytes: same size, not Parquet, another sha256."""
    path.write_bytes(b"\x5a" * path.stat().st_size)


def test_lazy_open_reads_no_shard_but_eager_reads_all(transfer):
    infos = read_manifest(transfer).shards
    for info in infos:
        garble(transfer / info.file)
    TransferSet(transfer, verify="lazy")  # nothing read: garbage shards of the right size pass the open
    with pytest.raises(CacheError, match="shard-00000-of-00003.parquet: shard is corrupted"):
        TransferSet(transfer, verify=True)


def test_lazy_hashes_each_shard_once_from_the_bytes_it_parses(transfer, monkeypatch):
    hashed, parsed = [], []
    real_sha, real_file = hashlib.sha256, pq.ParquetFile
    monkeypatch.setattr(reader.hashlib, "sha256", lambda data: hashed.append(len(data)) or real_sha(data))
    monkeypatch.setattr(reader.pq, "ParquetFile", lambda source, **kw: parsed.append(source) or real_file(source, **kw))
    ts = TransferSet(transfer, verify="lazy", max_open_shards=1)
    assert hashed == [] and parsed == []
    for i in (0, 8, 1, 9, 2, 7):  # shards 0, 2, 0, 2, 0, 1: every read re-opens (one shard kept)
        ts.row(i)
    sizes = [info.bytes for info in read_manifest(transfer).shards]
    assert hashed == [sizes[0], sizes[2], sizes[1]]  # each shard hashed once, over its whole file
    assert len(parsed) == 6
    first_reads = [parsed[0], parsed[1], parsed[5]]
    assert all(isinstance(p, reader.pa.BufferReader) for p in first_reads)  # parsed from the hashed bytes
    assert all(not isinstance(p, reader.pa.BufferReader) for p in parsed[2:5])  # verified: read from the path


def test_lazy_names_a_corrupted_shard_with_both_hashes_on_first_read(transfer):
    info = read_manifest(transfer).shards[2]
    path = transfer / info.file
    garble(path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    ts = TransferSet(transfer, verify="lazy")
    assert ts.row(0)["id"] == "row-0000"  # other shards read fine
    with pytest.raises(CacheError) as err:
        ts.batch([0, 8])
    assert str(err.value) == (f"{path}: shard is corrupted (sha256 {actual} differs from the manifest's "
                              f"{info.sha256})")
    with pytest.raises(CacheError, match="shard is corrupted"):  # still refused: a failure is not remembered as checked
        ts.row(8)


def test_eager_true_and_off_false(transfer):
    info = read_manifest(transfer).shards[1]
    path = transfer / info.file
    garble(path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    for verify in (True, "eager"):
        with pytest.raises(CacheError) as err:
            TransferSet(transfer, verify=verify)
        assert str(err.value) == f"{path}: shard is corrupted (sha256 {actual} differs from the manifest's {info.sha256})"
    for verify in (False, "off"):
        ts = TransferSet(transfer, verify=verify)
        assert ts.row(0)["id"] == "row-0000"
        with pytest.raises(Exception, match="Parquet"):  # no hash check: the garbage reaches the Parquet reader
            ts.row(7)
    with pytest.raises(ValueError, match="verify: expected one of eager, lazy, off"):
        TransferSet(transfer, verify="sometimes")


def test_lazy_open_refuses_a_missing_or_resized_shard(transfer):
    infos = read_manifest(transfer).shards
    with open(transfer / infos[2].file, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(CacheError, match=f"{infos[2].name}.parquet: shard is corrupted \\(size {infos[2].bytes + 1} "
                                         f"bytes differs from the manifest's {infos[2].bytes}\\)"):
        TransferSet(transfer, verify="lazy")
    (transfer / infos[0].file).unlink()
    with pytest.raises(CacheError, match=f"{infos[0].name}.parquet: shard listed in the manifest is missing"):
        TransferSet(transfer, verify="lazy")
    ts = TransferSet(transfer, verify="off")
    with pytest.raises(CacheError, match="shard listed in the manifest is missing"):
        ts.row(0)


def test_a_shard_with_other_rows_than_the_manifest_says_is_refused(transfer):
    manifest = read_manifest(transfer)
    manifest.shards[0].rows += 1  # global indices of every later shard would be off by one
    write_manifest(transfer, manifest)
    ts = TransferSet(transfer, verify="off")
    with pytest.raises(CacheError, match="shard-00000-of-00003.parquet: shard holds 7 rows, the manifest says 8"):
        ts.row(3)


# ---------------------------------------------------------------- the one padding implementation


def test_pad_sequences_by_hand():
    ids, mask = pad_sequences([np.array([5, 6, 7], dtype=np.int32), [8], (9, 10)], pad_id=1)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_pad_flat_by_hand_and_refuses_misaligned_rows():
    rows = [np.arange(4, dtype=np.float16), np.arange(2, dtype=np.float16) + 10]
    out = pad_flat(rows, np.array([2, 1]), 3, dtype=np.float32, width=2)
    assert out.dtype == np.float32
    assert out.tolist() == [[[0, 1], [2, 3], [0, 0]], [[10, 11], [0, 0], [0, 0]]]
    with pytest.raises(ValueError, match="hidden_1: row 1 holds 3 values, expected 1 positions x 2"):
        pad_flat([rows[0], np.arange(3)], np.array([2, 1]), 2, dtype=np.float32, width=2, name="hidden_1")
