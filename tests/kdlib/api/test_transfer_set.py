"""kdlib.api.TransferSet as a torch Dataset and as a datasets.Dataset: the same rows and batches as kdlib.cache's
reader (which it is), the manifest's fingerprints and fidelity as its info, shards hashed before datasets reads."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kdlib.api import Collator, TransferSet
from kdlib.api.hf_dataset import transfer_set_info
from kdlib.cache import reader
from kdlib.cache.manifest import read_manifest
from kdlib.errors import CacheError, FingerprintMismatch
from kdlib.runtime.fingerprints import model_fingerprint


def same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_a_torch_dataset_whose_rows_and_batches_are_the_readers(api_paths):
    ts = TransferSet(api_paths["transfer"])
    plain = reader.TransferSet(api_paths["transfer"])
    assert isinstance(ts, Dataset) and len(ts) == len(plain) == 96
    for i in (0, 47, 95, -1):
        mine, theirs = ts[i], plain.row(i % 96)
        assert mine.keys() == theirs.keys() and mine["id"] == theirs["id"]
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine if isinstance(mine[k], np.ndarray))
    loader = DataLoader(ts, batch_size=8, collate_fn=ts.collator)
    for n, batch in enumerate(loader):
        same_batch(batch, plain.batch(range(8 * n, 8 * n + 8)))
    assert n == 11
    keys = {"input_ids", "attention_mask", "ids", "mlm_labels", "topk_ids", "topk_logits", "teacher_lse",
            "teacher_hidden_0", "teacher_hidden_2", "teacher_hidden_4", "teacher_query_2", "teacher_value_4",
            "teacher_pooled"}
    assert keys <= set(batch)
    assert batch["teacher_hidden_2"].shape == (8, batch["input_ids"].shape[1], 32)


def test_split_holds_out_the_last_rows_as_the_stage_does(api_paths):
    ts = TransferSet(api_paths["transfer"])
    train, held = ts.split(eval_rows=16)
    assert len(train) == 80 and len(held) == 16
    assert train[79]["id"] == ts[79]["id"] and held[0]["id"] == ts[80]["id"]
    with pytest.raises(ValueError, match="eval_rows: expected 1 .. 95"):
        ts.split(96)


def test_info_names_teacher_tokenizer_and_fidelity(api_paths):
    ts = TransferSet(api_paths["transfer"], teacher_fingerprint=model_fingerprint(api_paths["teacher"]))
    info = ts.info
    manifest = read_manifest(api_paths["transfer"])
    assert info["teacher_fingerprint"] == manifest.teacher_fingerprint == model_fingerprint(api_paths["teacher"])
    assert info["tokenizer_fingerprint"] == manifest.tokenizer_fingerprint
    assert info["fidelity"] == manifest.fidelity and info["totals"]["rows"] == 96
    assert len(info["manifest_sha256"]) == 64
    with pytest.raises(FingerprintMismatch, match="teacher 0{64}"):
        TransferSet(api_paths["transfer"], teacher_fingerprint="0" * 64)


def test_a_datasets_dataset_of_the_same_rows_with_the_manifest_as_info(api_paths, tmp_path):
    ts = TransferSet(api_paths["transfer"])
    hf = ts.to_hf(cache_dir=str(tmp_path / "hf"))
    assert len(hf) == 96 and hf[5]["id"] == ts[5]["id"]
    assert np.array_equal(np.asarray(hf[5]["topk_logits"], dtype=np.float16), ts[5]["topk_logits"])
    info = transfer_set_info(hf)
    assert info["teacher_fingerprint"] == ts.manifest.teacher_fingerprint
    assert info["tokenizer_fingerprint"] == ts.manifest.tokenizer_fingerprint
    assert info["fidelity"] == ts.manifest.fidelity and info["cached"]["top_k"] == 8
    assert hf.info.config_name == ts.manifest.config_hash
    assert {k: v["checksum"] for k, v in hf.info.download_checksums.items()} == \
        {s.file: s.sha256 for s in ts.manifest.shards}
    # the same batches through the same collator, from either form
    collate = Collator.from_info(info)
    same_batch(collate([hf[i] for i in range(16, 24)]), ts.batch(range(16, 24)))
    # only the columns some objectives read, and the info survives save_to_disk
    few = ts.to_hf(keys=["topk_ids", "topk_logits", "teacher_lse"], cache_dir=str(tmp_path / "hf"))
    assert set(few.column_names) == {"id", "source_id", "augmentation", "input_ids", "topk_ids", "topk_logits", "lse"}
    few.save_to_disk(str(tmp_path / "saved"))
    import datasets

    again = datasets.load_from_disk(str(tmp_path / "saved"))
    assert transfer_set_info(again)["teacher_fingerprint"] == ts.manifest.teacher_fingerprint
    assert json.loads(again.info.description)["kind"] == "kdlib.transfer_set"


def test_a_changed_shard_is_refused_before_datasets_reads_it(api_paths, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(api_paths["transfer"], copy)
    shard = copy / read_manifest(copy).shards[1].file
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{shard.name}: shard is corrupted"):
        TransferSet(copy).to_hf(cache_dir=str(tmp_path / "hf"))
