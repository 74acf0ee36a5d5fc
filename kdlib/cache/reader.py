"""Read a transfer set for training: verified manifest, rows by global index, padded batches.

Rows are addressed by a global index (shards in manifest order, rows in file order), so a sampler
that owns the order can hand any rank any rows and resume at an exact position. Only the shards a
batch touches are opened; at most `max_open_shards` stay decoded in memory.

Verification costs no start-up time in the mode the trainer uses ("lazy"): opening checks the
manifest, the fingerprints and each shard file's size; a shard's sha256 is checked the first time
this process reads it, over the same bytes that are then parsed, so the check adds no second read.
A decoded shard is flat numpy arrays plus row offsets per column, so a row is a few slices and a
batch a few vectorised copies. The reader is safe to use from a prefetching thread and the
training thread at once; decoding (Parquet, sha256, numpy) runs outside its lock.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdlib.cache.codec import Q8_COLUMNS, decode_sorted_ids, decode_topk
from kdlib.cache.manifest import (Manifest, check_fingerprints, check_shard_digest, missing_shard, read_manifest,
                                  verify_shards)
from kdlib.cache.sampling import sparse_targets
from kdlib.cache.vectors import SCALE_SUFFIX, decode, is_vector_column, vector_names
from kdlib.errors import CacheError
from kdlib.text.padding import pad_flat, pad_sequences, row_lengths

IGNORE_INDEX = -100
VERIFY_MODES = ("eager", "lazy", "off")
_NUMPY = {t: np.dtype(n) for t, n in [(pa.int8(), "int8"), (pa.int16(), "int16"), (pa.int32(), "int32"),
                                       (pa.int64(), "int64"), (pa.uint8(), "uint8"), (pa.uint16(), "uint16"),
                                       (pa.uint32(), "uint32"), (pa.uint64(), "uint64"), (pa.float16(), "float16"),
                                       (pa.float32(), "float32"), (pa.float64(), "float64")]}


def _numpy(array: pa.Array) -> np.ndarray:
    """A read-only numpy view of a primitive Arrow array (to_numpy would import pandas: ~0.5 s at start-up)."""
    dtype = _NUMPY.get(array.type)
    if dtype is None or array.null_count or not len(array):
        return array.to_numpy(zero_copy_only=False)
    out = np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)
    out.flags.writeable = False  # rows are views into the cached shard: nobody may change it
    return out


def verify_mode(verify: Union[bool, str]) -> str:
    """True -> "eager" (every shard hashed at open, the historical behaviour), False -> "off"."""
    if verify is True or verify is False:
        return "eager" if verify else "off"
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify: expected one of {', '.join(VERIFY_MODES)} (or True/False), got {verify!r}")
    return verify


class _Shard:
    """One decoded shard: per list column its flat values and row offsets, other columns as Python lists."""

    def __init__(self, table: pa.Table):
        self.names = list(table.column_names)
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.scalars: dict[str, list] = {}
        self.valid: dict[str, list] = {}  # list columns holding nulls (none in pipeline output): row validity
        for name in self.names:
            column = table.column(name)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                array = column.combine_chunks()
                # .offsets index into .values (both ignore the array's own slice offset consistently)
                self.lists[name] = (_numpy(array.values), _numpy(array.offsets))
                if array.null_count:
                    self.valid[name] = array.is_valid().to_pylist()
            else:
                self.scalars[name] = column.to_pylist()

    def value(self, name: str, local: int):
        if name in self.lists:
            if name in self.valid and not self.valid[name][local]:
                return None
            values, offsets = self.lists[name]
            return values[offsets[local]:offsets[local + 1]]
        return self.scalars[name][local]

    def row(self, local: int) -> dict:
        return {name: self.value(name, local) for name in self.names}


class TransferSet:
    """A transfer-set directory whose manifest and fingerprints are checked, and whose shard bytes are checked
    according to `verify`: "eager" (or True) hashes every shard at open, "lazy" each shard on its first read
    in this process, "off" (or False) never."""

    def __init__(self, path: str | Path, *, teacher_fingerprint: Optional[str] = None,
                 tokenizer_fingerprint: Optional[str] = None, verify: Union[bool, str] = True,
                 max_open_shards: int = 4, columns: Optional[list[str]] = None):
        self.path = Path(path)
        self.verify = verify_mode(verify)
        self.manifest: Manifest = read_manifest(self.path)
        check_fingerprints(self.manifest, str(self.path), teacher=teacher_fingerprint, tokenizer=tokenizer_fingerprint)
        if self.verify == "eager":
            verify_shards(self.path, self.manifest)
        elif self.verify == "lazy":
            self._check_sizes()
        self._starts = np.cumsum([0] + [s.rows for s in self.manifest.shards]).tolist()
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._verified: set[int] = set()  # shards hashed by this process (lazy mode)
        self._lock = threading.Lock()  # guards _open and _verified only, never held while decoding
        self._max_open = max_open_shards
        self._columns = columns
        self.top_k = int(self.manifest.cached.get("top_k") or 0)
        self.sampled_tokens = int(self.manifest.cached.get("sampled_tokens") or 0)
        self.hidden_size = int(self.manifest.teacher.get("hidden_size") or 0)

    def __len__(self) -> int:
        return self._starts[-1]

    def read_only(self, keys) -> None:
        """Decode only the columns that fill these batch keys from now on (a set caching every layer's hidden
        states and Q/K/V is gigabytes; a recipe reads a few of them). Call before the first read."""
        with self._lock:
            if self._open:
                raise RuntimeError("read_only: shards are already open; choose the columns before reading")
            names = pq.read_schema(self.path / self.manifest.shards[0].file).names
            self._columns = columns_for(keys, names)

    def _check_sizes(self) -> None:
        """Each shard exists with the recorded size: a stat per shard, no read."""
        for shard in self.manifest.shards:
            path = self.path / shard.file
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise missing_shard(path) from None
            if size != shard.bytes:
                raise CacheError(f"{path}: shard is corrupted (size {size} bytes differs from the manifest's "
                                 f"{shard.bytes})")

    def _read(self, index: int, check: bool) -> _Shard:
        info = self.manifest.shards[index]
        path = self.path / info.file
        try:
            source = path.read_bytes() if check else path  # read once: hashed, then parsed from memory
        except FileNotFoundError:
            raise missing_shard(path) from None
        if check:
            check_shard_digest(path, hashlib.sha256(source).hexdigest(), info.sha256)
            source = pa.BufferReader(source)
        try:
            # ParquetFile, not pq.read_table: the latter's first call imports pyarrow.dataset (~0.4 s)
            with pq.ParquetFile(source) as handle:
                table = handle.read(columns=self._columns)
        except FileNotFoundError:
            raise missing_shard(path) from None
        if table.num_rows != info.rows:  # global indices would point at the wrong rows
            raise CacheError(f"{path}: shard holds {table.num_rows} rows, the manifest says {info.rows}")
        return _Shard(table)

    def _shard(self, index: int) -> _Shard:
        with self._lock:
            shard = self._open.get(index)
            if shard is not None:
                self._open.move_to_end(index)
                return shard
            check = self.verify == "lazy" and index not in self._verified
        shard = self._read(index, check)  # two threads may decode the same shard at once: harmless
        with self._lock:
            if check:
                self._verified.add(index)
            self._open[index] = shard
            self._open.move_to_end(index)
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
        return shard

    def _locate(self, global_index: int) -> tuple[int, int]:
        if not 0 <= global_index < len(self):
            raise IndexError(f"row {global_index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, global_index) - 1
        return shard, global_index - self._starts[shard]

    def row(self, global_index: int) -> dict:
        """One row: list columns as (read-only) numpy arrays in their stored dtype, others as Python values;
        a char_offsets set's `char_offsets` as (T, 2) int32 (start, end in `text` per token)."""
        shard, local = self._locate(global_index)
        row = self._shard(shard).row(local)
        if row.get("char_offsets") is not None:
            row["char_offsets"] = row["char_offsets"].reshape(-1, 2)
        return row

    def rows(self, indices: Iterable[int]) -> list[dict]:
        return [self.row(i) for i in indices]

    def collate(self, rows: list[dict], pad_id: int = 0, text: bool = False) -> dict:
        """Pad a list of rows to the longest one: (B, T) ids and mask, (B, T, k) top-k, (B, T, H) hidden.
        `text`: also the rows' stored text as Python lists (`text_columns`)."""
        return collate_rows(rows, top_k=self.top_k, hidden_size=self.hidden_size, pad_id=pad_id,
                            sampled_tokens=self.sampled_tokens, text=text)

    def batch(self, indices: Iterable[int], pad_id: int = 0, text: bool = False) -> dict:
        """Exactly collate(rows(indices), text=text), without building row dicts: columns are sliced from the
        shards' arrays."""
        indices = [int(i) for i in indices]
        located = [self._locate(i) for i in indices]
        shards = [self._shard(s) for s, _ in located]
        if not shards or any(s.valid for s in shards):  # nulls: the row path's behaviour
            return self.collate([s.row(local) for s, (_, local) in zip(shards, located)], pad_id=pad_id, text=text)
        columns = {name: [s.value(name, local) for s, (_, local) in zip(shards, located)] for name in shards[0].names}
        return _collate_columns(columns, top_k=self.top_k, hidden_size=self.hidden_size, pad_id=pad_id,
                                sampled_tokens=self.sampled_tokens, text=text)


def collate_rows(rows: list[dict], *, top_k: int, hidden_size: int, pad_id: int = 0, sampled_tokens: int = 0,
                 text: bool = False) -> dict:
    """Dynamic padding: every per-position tensor is cut to the longest row of this batch."""
    return _collate_columns({name: [r[name] for r in rows] for name in rows[0]}, top_k=top_k,
                            hidden_size=hidden_size, pad_id=pad_id, sampled_tokens=sampled_tokens, text=text)


def text_columns(columns: dict[str, list]) -> dict:
    """A batch's stored text, unpadded, as Python lists (one entry per row): `texts` (str), and `texts_b` (a
    keep_text task set's second segments) or, for a char_offsets corpus set, `char_offsets` ((T, 2) int32:
    start, end in the text per token; special tokens empty) and `text_breaks` (int32: where each document
    piece after the first starts). Strings cannot be tensors, and a student's own tokenizer reads them."""
    if "text" not in columns:
        raise ValueError("texts: the transfer set keeps no text (build a corpus set with char_offsets: true, a task "
                         "set with keep_text: true), or read_only left its columns out (ask for key 'texts')")
    out = {"texts": list(columns["text"])}
    if "text_b" in columns:
        out["texts_b"] = list(columns["text_b"])
    if "char_offsets" in columns:
        out["char_offsets"] = [np.asarray(v).reshape(-1, 2) for v in columns["char_offsets"]]
        out["text_breaks"] = [np.asarray(v) for v in columns["text_breaks"]]
    return out


def _collate_columns(columns: dict[str, list], *, top_k: int, hidden_size: int, pad_id: int,
                     sampled_tokens: int = 0, text: bool = False) -> dict:
    """The batch from per-row values by column (keys in the rows' column order)."""
    input_ids, attention_mask = pad_sequences(columns["input_ids"], pad_id)
    lengths = row_lengths(columns["input_ids"])
    B, T = input_ids.shape
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "ids": list(columns["id"])}
    if "mlm_positions" in columns:
        batch["mlm_labels"] = torch.from_numpy(_scatter_labels(columns["mlm_positions"], columns["mlm_labels"], B, T))
    if "label" in columns:
        batch["labels"] = torch.tensor([IGNORE_INDEX if v is None else v for v in columns["label"]])
    if top_k and "topk_ids" in columns:  # (a reader may decode only some columns: TransferSet.read_only)
        batch.update(
            topk_ids=torch.from_numpy(pad_flat(columns["topk_ids"], lengths, T, dtype=np.int64, width=top_k,
                                               name="topk_ids")),
            topk_logits=torch.from_numpy(pad_flat(columns["topk_logits"], lengths, T, dtype=np.float32, width=top_k,
                                                  name="topk_logits")),
            teacher_lse=torch.from_numpy(pad_flat(columns["lse"], lengths, T, dtype=np.float32, name="lse")))
    elif top_k and "topk_id_deltas" in columns:  # topk_encoding q8: decoded to the same keys and layout
        batch.update(_q8_topk(columns, lengths, T, top_k))
    if "sample_id_deltas" in columns:  # topk_encoding q8: the sampled ids, delta-coded (kdlib/cache/codec.py)
        columns = dict(columns, sample_ids=_sample_ids(columns["sample_id_deltas"], columns["sample_sizes"]))
    if sampled_tokens and "sample_ids" in columns:  # weights estimating the teacher: kdlib/cache/sampling.py
        if top_k and "topk_ids" not in batch:
            raise ValueError("sample_ids: a top-k + sampled-tail cache needs its top-k columns to weigh the tail")
        topk = (batch["topk_ids"], batch["topk_logits"], batch["teacher_lse"]) if top_k else None
        ids, weights = sparse_targets(columns["sample_ids"], columns["sample_counts"], columns["sample_sizes"],
                                      lengths, T, sampled_tokens, topk)
        batch.update(sparse_ids=torch.from_numpy(ids), sparse_weights=torch.from_numpy(weights))
    if "logits" in columns:
        batch["teacher_logits"] = _stack(columns["logits"])
    for name in [k for k in columns if is_vector_column(k)]:  # hidden_<l>, query_<l>, key_<l>, value_<l>
        values = pad_flat(columns[name], lengths, T, dtype=np.float32, width=hidden_size, name=name)
        if name + SCALE_SUFFIX in columns:  # int8 with a scale per position (kdlib/cache/vectors.py)
            scale = pad_flat(columns[name + SCALE_SUFFIX], lengths, T, dtype=np.float32, name=name + SCALE_SUFFIX)
            values = decode(values, scale)
        batch[f"teacher_{name}"] = torch.from_numpy(values)
    if "pooled" in columns:
        batch["teacher_pooled"] = _stack(columns["pooled"])
    if text:
        batch.update(text_columns(columns))
    return batch


def _q8_topk(columns: dict[str, list], lengths: np.ndarray, T: int, k: int) -> dict:
    """topk_ids / topk_logits (B, T, k), sorted by logit descending, and teacher_lse (B, T) from the q8 columns
    (kdlib/cache/codec.py); padding is 0 everywhere, as with fp16."""
    def padded(name: str, dtype, width=None) -> np.ndarray:
        return pad_flat(columns[name], lengths, T, dtype=dtype, width=width, name=name)

    ids, logits = decode_topk(padded("topk_id_deltas", np.int64, k), padded("topk_levels", np.uint8, k),
                              padded("topk_max", np.float32), padded("topk_step", np.float32))
    return {"topk_ids": torch.from_numpy(ids), "topk_logits": torch.from_numpy(logits),
            "teacher_lse": torch.from_numpy(padded("lse", np.float32))}


def _sample_ids(deltas: list, sizes: list) -> list[np.ndarray]:
    """Per row, the int64 sampled ids from their stored differences (one decode for the whole batch)."""
    counts = np.cumsum([len(d) for d in deltas])[:-1]
    def flat(rows: list) -> np.ndarray:
        return np.concatenate([np.asarray(r).reshape(-1) for r in rows], dtype=np.int64, casting="unsafe")

    return np.split(decode_sorted_ids(flat(deltas), flat(sizes)), counts)


def _stack(values: list) -> torch.Tensor:
    """(B, C) float32 from per-row vectors of one size (dense logits, pooled embeddings)."""
    return torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in values]))


def _scatter_labels(positions: list, labels: list, B: int, T: int) -> np.ndarray:
    """(B, T) int64 masked-LM targets: mlm_labels at mlm_positions, IGNORE_INDEX elsewhere."""
    counts = row_lengths(positions)
    if not np.array_equal(counts, row_lengths(labels)):
        i = int(np.flatnonzero(counts != row_lengths(labels))[0])
        raise ValueError(f"mlm_labels: row {i} has {len(labels[i])} labels for {counts[i]} mlm_positions")
    out = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    if counts.sum():
        pos = np.concatenate([np.asarray(p).reshape(-1) for p in positions], dtype=np.int64, casting="unsafe")
        val = np.concatenate([np.asarray(v).reshape(-1) for v in labels], dtype=np.int64, casting="unsafe")
        out[np.repeat(np.arange(B), counts), pos] = val
    return out


def cached_batch_keys(manifest) -> list[str]:
    """The batch keys `TransferSet.collate` fills for this transfer set (what cached input providers can read)."""
    cached = manifest.cached
    keys = []
    if cached.get("top_k"):
        keys += ["topk_ids", "topk_logits", "teacher_lse"]
    if cached.get("sampled_tokens"):
        keys += list(_SPARSE_KEYS)
    if cached.get("dense_logits"):
        keys.append("teacher_logits")
    keys += [f"teacher_{name}" for name in vector_names(cached.get("hidden_layers") or [], cached.get("qkv_layers") or [])]
    if cached.get("pooled"):
        keys.append("teacher_pooled")
    if cached.get("mlm"):
        keys.append("mlm_labels")
    if cached.get("labels") or cached.get("task_type") == "regression":  # class indices, or regression targets
        keys.append("labels")
    return keys


_BASE_COLUMNS = ("id", "source_id", "augmentation", "input_ids")
_KEY_COLUMNS = {"mlm_labels": ("mlm_positions", "mlm_labels"), "labels": ("label",),
                "topk_ids": ("topk_ids",) + Q8_COLUMNS, "topk_logits": ("topk_logits",) + Q8_COLUMNS,
                "teacher_lse": ("lse",),
                "teacher_logits": ("logits",), "teacher_pooled": ("pooled",),
                "texts": ("text", "text_b", "char_offsets", "text_breaks")}  # batch(text=True): text_columns
_SPARSE_KEYS = ("sparse_ids", "sparse_weights")
_SAMPLE_COLUMNS = ("sample_ids", "sample_counts", "sample_sizes")


def columns_for(keys, names: list[str]) -> list[str]:
    """The shard columns (of `names`, in their order) that fill these batch keys (cached_batch_keys names)."""
    wanted = set(_BASE_COLUMNS)
    for key in keys:
        if key in _SPARSE_KEYS:  # with a cached top-k, its entries lead and its missing mass weighs the tail
            wanted.update(_SAMPLE_COLUMNS)
            for topk_key in ("topk_ids", "topk_logits", "teacher_lse"):
                wanted.update(_KEY_COLUMNS[topk_key])
            continue
        if key in _KEY_COLUMNS:
            wanted.update(_KEY_COLUMNS[key])
        elif is_vector_column(key.removeprefix("teacher_")):
            name = key.removeprefix("teacher_")
            wanted.update((name, name + SCALE_SUFFIX))
        else:
            raise ValueError(f"no transfer-set column fills batch key {key!r}")
    if "sample_ids" in wanted:  # (stored as sample_id_deltas under topk_encoding q8)
        wanted.add("sample_id_deltas")
    return [name for name in names if name in wanted]
