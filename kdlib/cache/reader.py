"""Read a transfer set for training: verified manifest, rows by global index, padded batches.

Rows are addressed by a global index (shards in manifest order, rows in file order), so a sampler
that owns the order can hand any rank any rows and resume at an exact position. Only the shards a
batch touches are opened; at most `max_open_shards` stay decoded in memory.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from kdlib.cache.manifest import Manifest, check_fingerprints, read_manifest, verify_shards

IGNORE_INDEX = -100


class TransferSet:
    """A verified transfer-set directory."""

    def __init__(self, path: str | Path, *, teacher_fingerprint: Optional[str] = None,
                 tokenizer_fingerprint: Optional[str] = None, verify: bool = True, max_open_shards: int = 4,
                 columns: Optional[list[str]] = None):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        check_fingerprints(self.manifest, str(self.path), teacher=teacher_fingerprint, tokenizer=tokenizer_fingerprint)
        if verify:
            verify_shards(self.path, self.manifest)
        self._starts = np.cumsum([0] + [s.rows for s in self.manifest.shards]).tolist()
        self._open: OrderedDict[int, dict] = OrderedDict()
        self._max_open = max_open_shards
        self._columns = columns
        self.top_k = int(self.manifest.cached.get("top_k") or 0)
        self.hidden_size = int(self.manifest.teacher.get("hidden_size") or 0)

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, index: int) -> dict:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        table = pq.read_table(self.path / self.manifest.shards[index].file, columns=self._columns)
        decoded = {name: table.column(name).to_pylist() if table.schema.field(name).type == "string"
                   else table.column(name).combine_chunks() for name in table.column_names}
        self._open[index] = decoded
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return decoded

    def row(self, global_index: int) -> dict:
        """One row as numpy arrays (lists) and scalars."""
        if not 0 <= global_index < len(self):
            raise IndexError(f"row {global_index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, global_index) - 1
        local = global_index - self._starts[shard]
        data = self._shard(shard)
        out = {}
        for name, column in data.items():
            if isinstance(column, list):
                out[name] = column[local]
            else:
                value = column[local]
                out[name] = value.values.to_numpy(zero_copy_only=False) if hasattr(value, "values") else value.as_py()
        return out

    def rows(self, indices: Iterable[int]) -> list[dict]:
        return [self.row(i) for i in indices]

    def collate(self, rows: list[dict], pad_id: int = 0) -> dict:
        """Pad a list of rows to the longest one: (B, T) ids and mask, (B, T, k) top-k, (B, T, H) hidden."""
        return collate_rows(rows, top_k=self.top_k, hidden_size=self.hidden_size, pad_id=pad_id)


def collate_rows(rows: list[dict], *, top_k: int, hidden_size: int, pad_id: int = 0) -> dict:
    """Dynamic padding: every per-position tensor is cut to the longest row of this batch."""
    lengths = [len(r["input_ids"]) for r in rows]
    B, T = len(rows), max(lengths)
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((B, T), dtype=torch.long),
             "ids": [r["id"] for r in rows]}
    for i, (r, n) in enumerate(zip(rows, lengths)):
        batch["input_ids"][i, :n] = torch.from_numpy(np.array(r["input_ids"], dtype=np.int64))
        batch["attention_mask"][i, :n] = 1
    first = rows[0]
    if "mlm_positions" in first:
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            pos = np.asarray(r["mlm_positions"], dtype=np.int64)
            labels[i, pos] = torch.from_numpy(np.array(r["mlm_labels"], dtype=np.int64))
        batch["mlm_labels"] = labels
    if "label" in first:
        batch["labels"] = torch.tensor([IGNORE_INDEX if r["label"] is None else r["label"] for r in rows])
    if top_k:
        ids = torch.zeros((B, T, top_k), dtype=torch.long)
        logits = torch.zeros((B, T, top_k), dtype=torch.float32)
        lse = torch.zeros((B, T), dtype=torch.float32)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            ids[i, :n] = torch.from_numpy(np.array(r["topk_ids"], dtype=np.int64).reshape(n, top_k))
            logits[i, :n] = torch.from_numpy(np.array(r["topk_logits"], dtype=np.float32).reshape(n, top_k))
            lse[i, :n] = torch.from_numpy(np.array(r["lse"], dtype=np.float32))
        batch.update(topk_ids=ids, topk_logits=logits, teacher_lse=lse)
    if "logits" in first:
        batch["teacher_logits"] = torch.from_numpy(np.stack([np.asarray(r["logits"], dtype=np.float32) for r in rows]))
    for name in [k for k in first if k.startswith("hidden_")]:
        hidden = torch.zeros((B, T, hidden_size), dtype=torch.float32)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            hidden[i, :n] = torch.from_numpy(np.array(r[name], dtype=np.float32).reshape(n, hidden_size))
        batch[f"teacher_{name}"] = hidden
    if "pooled" in first:
        batch["teacher_pooled"] = torch.from_numpy(np.stack([np.asarray(r["pooled"], dtype=np.float32) for r in rows]))
    return batch
