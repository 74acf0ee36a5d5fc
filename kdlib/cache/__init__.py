"""The transfer-set cache: the contract between the data pipeline and the training stages.

A transfer set is one directory: `shards/*.parquet` (each with a `.json` sidecar) and
`manifest.json`, written last. See README "Transfer-set format".
"""

from kdlib.cache.manifest import MANIFEST, Manifest, check_fingerprints, read_manifest, verify_shards, write_manifest
from kdlib.cache.reader import IGNORE_INDEX, TransferSet, collate_rows
from kdlib.cache.schema import FORMAT_VERSION, id_dtype, row_schema, rows_to_table
from kdlib.cache.shards import ShardInfo, complete_shard, remove_partial_files, shard_name, write_shard

__all__ = ["MANIFEST", "Manifest", "check_fingerprints", "read_manifest", "verify_shards", "write_manifest",
           "IGNORE_INDEX", "TransferSet", "collate_rows", "FORMAT_VERSION", "id_dtype", "row_schema",
           "rows_to_table", "ShardInfo", "complete_shard", "remove_partial_files", "shard_name", "write_shard"]
