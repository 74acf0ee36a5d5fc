"""Shard files: written under a temporary name and renamed when complete, then a sidecar.

A shard is complete only when both `<name>.parquet` and `<name>.json` (its row count, token count,
sha256 and fidelity sums) exist and the file's sha256 matches the sidecar. A writer killed at any
moment leaves either nothing, a `.tmp-*` file, or a parquet file without sidecar: all of these are
rebuilt on the next run, and no reader ever opens them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdlib.cache.schema import PARQUET_ENCODING
from kdlib.runtime.io import atomic_target, atomic_write_text, sha256_file

SHARD_DIR = "shards"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


@dataclass
class ShardInfo:
    """What the manifest records per shard."""

    name: str  # file stem, e.g. shard-00003-of-00008
    file: str  # path relative to the transfer-set directory
    rows: int
    tokens: int  # real (non-padding) input tokens
    sha256: str
    bytes: int
    fidelity: dict = field(default_factory=dict)  # sums over sampled positions: kept_mass, kl, positions


def parquet_encodings(schema: pa.Schema) -> dict:
    """pq.write_table options for the columns whose schema field names an encoding (PARQUET_ENCODING metadata:
    kdlib.cache.schema.split_bytes); none when no field does, so such shards are written as they always were.
    Dictionary encoding stays on for every other column (Parquet refuses both on one column)."""
    def leaf(field: pa.Field) -> str:
        return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name

    chosen = {leaf(f): f.metadata[PARQUET_ENCODING].decode() for f in schema
              if f.metadata and PARQUET_ENCODING in f.metadata}
    if not chosen:
        return {}
    return {"column_encoding": chosen, "use_dictionary": [leaf(f) for f in schema if leaf(f) not in chosen]}


def write_shard(directory: str | os.PathLike, name: str, table: pa.Table, fidelity: dict | None = None) -> ShardInfo:
    """Write one shard atomically (parquet, then its sidecar) and return its record."""
    shard_dir = Path(directory) / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    target = shard_dir / f"{name}.parquet"
    with atomic_target(target) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256, **parquet_encodings(table.schema))
    tokens = int(pa.compute.sum(pa.compute.list_value_length(table.column("input_ids"))).as_py() or 0)
    info = ShardInfo(name=name, file=f"{SHARD_DIR}/{name}.parquet", rows=table.num_rows, tokens=tokens,
                     sha256=sha256_file(target), bytes=target.stat().st_size, fidelity=fidelity or {})
    atomic_write_text(shard_dir / f"{name}.json", json.dumps(asdict(info), indent=1))
    return info


def complete_shard(directory: str | os.PathLike, name: str) -> ShardInfo | None:
    """The shard's record if it is complete and its bytes match, else None (to be rebuilt)."""
    shard_dir = Path(directory) / SHARD_DIR
    sidecar, data = shard_dir / f"{name}.json", shard_dir / f"{name}.parquet"
    if not (sidecar.is_file() and data.is_file()):
        return None
    try:
        info = ShardInfo(**json.loads(sidecar.read_text()))
    except (ValueError, TypeError):
        return None
    if data.stat().st_size != info.bytes or sha256_file(data) != info.sha256:
        return None
    return info


def remove_partial_files(directory: str | os.PathLike) -> int:
    """Delete temporary files a killed writer left; returns how many."""
    shard_dir = Path(directory) / SHARD_DIR
    leftovers = list(shard_dir.glob(".tmp-*")) if shard_dir.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def column_bytes_per_position(directory: str | os.PathLike, shards: list[ShardInfo], tokens: int) -> dict:
    """Compressed bytes per real position of each top-level column, measured from the shards' Parquet
    metadata (what each cached target costs on disk; a list column's offsets are counted with it)."""
    sizes: dict[str, int] = {}
    for shard in shards:
        meta = pq.ParquetFile(Path(directory) / shard.file).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                name = chunk.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
    return {name: round(size / tokens, 3) for name, size in sizes.items()} if tokens else {}
