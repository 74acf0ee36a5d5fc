"""A transfer set's Parquet shards as a `datasets.Dataset`, for scripts built on the Hugging Face stack.

The shards are read by `datasets` itself (`Dataset.from_parquet`: converted once into its memory-mapped Arrow cache),
after every shard's sha256 is checked against the manifest (unless verify="off"), so what `datasets` reads is
what the pipeline wrote. The dataset's `info` says where it came from: `config_name` is the pipeline's config hash,
`download_checksums` the manifest's per-shard sha256 and bytes, and `description` a JSON object with the teacher
and tokenizer fingerprints, the fidelity record, what was cached and the totals (`transfer_set_info` reads it
back). Rows keep their stored columns (flat top-k, q8 codes, ...): `Collator` pads them into the training batch.
"""

from __future__ import annotations

import json
from typing import Optional

import datasets
import pyarrow.parquet as pq

from kdlib.cache import reader
from kdlib.cache.manifest import verify_shards

INFO_KIND = "kdlib.transfer_set"


def to_hf_dataset(ts: reader.TransferSet, *, keys: Optional[list[str]] = None, keep_in_memory: bool = False,
                  cache_dir: Optional[str] = None) -> datasets.Dataset:
    """The rows of `ts` in its global order (shards in manifest order), as a `datasets.Dataset`. `keys`: only the
    columns that fill these batch keys (e.g. `Distillation.reads`), as `TransferSet.read_only` chooses them."""
    manifest = ts.manifest
    if ts.verify != "off":
        verify_shards(ts.path, manifest)  # datasets reads the files itself: hash them first
    files = [str(ts.path / shard.file) for shard in manifest.shards]
    columns = None
    if keys is not None:
        columns = reader.columns_for(keys, pq.read_schema(files[0]).names)
    dataset = datasets.Dataset.from_parquet(files, columns=columns, keep_in_memory=keep_in_memory,
                                            cache_dir=cache_dir)
    if len(dataset) != len(ts):
        raise RuntimeError(f"{ts.path}: datasets read {len(dataset)} rows, the manifest lists {len(ts)}")
    info = dataset.info
    info.dataset_name = ts.path.name
    info.config_name = manifest.config_hash
    info.download_checksums = {shard.file: {"num_bytes": shard.bytes, "checksum": shard.sha256}
                               for shard in manifest.shards}
    info.description = json.dumps({"kind": INFO_KIND, **_summary(ts)}, sort_keys=True)
    return dataset


def _summary(ts: reader.TransferSet) -> dict:
    m = ts.manifest
    return {"path": str(ts.path), "teacher_fingerprint": m.teacher_fingerprint,
            "tokenizer_fingerprint": m.tokenizer_fingerprint, "teacher": m.teacher, "config_hash": m.config_hash,
            "cached": m.cached, "fidelity": m.fidelity, "totals": m.totals, "max_length": m.max_length,
            "format_version": m.format_version}


def transfer_set_info(dataset: datasets.Dataset) -> dict:
    """The manifest summary `to_hf_dataset` put into `dataset.info` (survives save_to_disk / load_from_disk)."""
    try:
        data = json.loads(dataset.info.description or "")
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("kind") != INFO_KIND:
        raise ValueError("dataset: its info holds no transfer-set record (build it with TransferSet(path).to_hf())")
    return data
