"""A transfer set as a torch Dataset: kdlib.cache's reader, indexable by row, with the collator that pads a list of
rows into the batch the losses read (the same dict `python -m pretrain` trains on).

Nothing is re-implemented here: rows, batches, verification and fingerprint checks are
`kdlib.cache.reader.TransferSet`'s, and `to_hf()` hands the same shards to `datasets` (kdlib.api.hf_dataset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import Dataset, Subset

from kdlib.cache import reader
from kdlib.cache.manifest import MANIFEST, Manifest
from kdlib.runtime.io import sha256_file


class Collator:
    """rows (dicts from TransferSet[i], or from the `datasets` form) -> one padded batch: input_ids, attention_mask,
    ids, and every cached target (topk_ids / topk_logits / teacher_lse, mlm_labels, teacher_hidden_<l>, ...)."""

    def __init__(self, manifest: Manifest, pad_id: int = 0):
        self._set(manifest.cached, manifest.teacher, pad_id)

    @classmethod
    def from_info(cls, info: dict, pad_id: int = 0) -> "Collator":
        """From the manifest summary a `datasets` form carries (kdlib.api.hf_dataset.transfer_set_info)."""
        collator = cls.__new__(cls)
        collator._set(info["cached"], info["teacher"], pad_id)
        return collator

    def _set(self, cached: dict, teacher: dict, pad_id: int) -> None:
        self.top_k = int(cached.get("top_k") or 0)
        self.sampled_tokens = int(cached.get("sampled_tokens") or 0)
        self.hidden_size = int(teacher.get("hidden_size") or 0)
        self.pad_id = int(pad_id)

    def __call__(self, rows: Sequence[dict]) -> dict:
        return reader.collate_rows(list(rows), top_k=self.top_k, hidden_size=self.hidden_size, pad_id=self.pad_id,
                                   sampled_tokens=self.sampled_tokens)


class TransferSet(reader.TransferSet, Dataset):
    """`TransferSet(path)`: the transfer set at `path`, manifest and fingerprints checked, shards hashed on first read
    (`verify="lazy"`, as training does). `ts[i]` is row i (a dict of numpy arrays and values), `len(ts)` its rows,
    `ts.collator` pads rows into a batch: `DataLoader(ts, batch_size=8, collate_fn=ts.collator, shuffle=True)`."""

    def __init__(self, path: Union[str, Path], *, teacher_fingerprint: Optional[str] = None,
                 tokenizer_fingerprint: Optional[str] = None, verify: Union[bool, str] = "lazy", pad_id: int = 0,
                 max_open_shards: int = 4, columns: Optional[list[str]] = None):
        super().__init__(path, teacher_fingerprint=teacher_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
                         verify=verify, max_open_shards=max_open_shards, columns=columns)
        self.collator = Collator(self.manifest, pad_id)  # (the reader's own collate(rows, pad_id) stays as it is)

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if index < 0:
            index += len(self)
        return self.row(index)

    def __getitems__(self, indices: list[int]) -> list[dict]:  # torch's DataLoader fetches a batch in one call
        return [self[i] for i in indices]

    @property
    def info(self) -> dict:
        """Who made the set and how faithful it is: the teacher and tokenizer fingerprints, the pipeline's config
        hash, what was cached, the fidelity record and totals, and the manifest's sha256 (what a model card names)."""
        m = self.manifest
        return {"path": str(self.path), "manifest_sha256": sha256_file(self.path / MANIFEST),
                "teacher_fingerprint": m.teacher_fingerprint, "tokenizer_fingerprint": m.tokenizer_fingerprint,
                "teacher": dict(m.teacher), "config_hash": m.config_hash, "cached": dict(m.cached),
                "fidelity": m.fidelity, "totals": m.totals, "max_length": m.max_length,
                "format_version": m.format_version, "tool_version": m.tool_version, "created": m.created}

    def split(self, eval_rows: int) -> tuple[Subset, Subset]:
        """(train, held out): the last `eval_rows` rows held out, as `python -m pretrain` holds them out (so the
        same seed gives the same training order over the same rows)."""
        if not 0 < eval_rows < len(self):
            raise ValueError(f"eval_rows: expected 1 .. {len(self) - 1} (the set has {len(self)} rows), got {eval_rows}")
        train = len(self) - eval_rows
        return Subset(self, range(train)), Subset(self, range(train, len(self)))

    def to_hf(self, keys: Optional[list[str]] = None, *, keep_in_memory: bool = False,
              cache_dir: Optional[str] = None):
        """The shards as a `datasets.Dataset` with the manifest as its info (kdlib.api.hf_dataset.to_hf_dataset);
        `keys`: only the columns filling these batch keys (e.g. a Distillation's `reads`)."""
        from kdlib.api.hf_dataset import to_hf_dataset  # imports `datasets` (~1 s): only this form needs it

        return to_hf_dataset(self, keys=keys, keep_in_memory=keep_in_memory, cache_dir=cache_dir)


def base_transfer_set(dataset) -> Optional[reader.TransferSet]:
    """The kdlib reader under a Dataset (itself, or the set under nested torch Subsets), else None."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, reader.TransferSet) else None
