"""The row schema of a transfer-set shard, and how teacher outputs become row values.

Per-position arrays are stored flattened (a row of T positions and k top-k entries holds T*k ids),
because Parquet list<list<...>> costs more and decodes slower than one list plus a known stride.
Top-k ids use the narrowest unsigned type that holds the vocabulary (uint16 for BERT's 30522).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kdlib.cache.vectors import vector_fields, vector_names

FORMAT_VERSION = 1


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _arrow(dtype: np.dtype) -> pa.DataType:
    return pa.from_numpy_dtype(np.dtype(dtype))


def row_schema(*, vocab_size: int, top_k: int = 0, dense_logits: bool = False, hidden_layers: list[int] = (),
               pooled: bool = False, has_labels: bool = False, has_mlm: bool = False,
               regression_labels: bool = False, keep_text: bool = False, qkv_layers: list[int] = (),
               vector_encoding: str = "fp16") -> pa.Schema:
    """The fixed schema for one transfer set; every shard of it has exactly these columns."""
    fields = [
        pa.field("id", pa.string(), nullable=False),  # stable row id
        pa.field("source_id", pa.string(), nullable=False),  # document / example the row starts in
        pa.field("augmentation", pa.string(), nullable=False),  # original, or the augmentation kinds applied
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # (T,) token ids the teacher saw
    ]
    if has_labels:
        # index into the manifest's label list, or a regression target
        fields.append(pa.field("label", pa.float32() if regression_labels else pa.int32()))
    if keep_text:
        fields.append(pa.field("text", pa.string()))  # the row's (augmented) text, as the teacher's tokenizer read it
        fields.append(pa.field("text_b", pa.string()))  # its second segment, or null
    if has_mlm:
        fields.append(pa.field("mlm_positions", pa.list_(pa.int32())))  # masked positions
        fields.append(pa.field("mlm_labels", pa.list_(pa.int32())))  # original ids at those positions
    if top_k:
        fields.append(pa.field("topk_ids", pa.list_(_arrow(id_dtype(vocab_size)))))  # (T*k,) sorted by logit, desc
        fields.append(pa.field("topk_logits", pa.list_(pa.float16())))  # (T*k,) teacher logits at those ids
        fields.append(pa.field("lse", pa.list_(pa.float32())))  # (T,) full-vocabulary log-sum-exp
    if dense_logits:
        fields.append(pa.field("logits", pa.list_(pa.float32())))  # (C,) classifier logits
    for name in vector_names(hidden_layers, qkv_layers):  # (T*H,) hidden state / Q / K / V of a layer
        fields.extend(vector_fields(name, vector_encoding))
    if pooled:
        fields.append(pa.field("pooled", pa.list_(pa.float32())))  # (H,) sentence embedding
    return pa.schema(fields)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts (numpy arrays or lists per column), sorted by id."""
    rows = sorted(rows, key=lambda r: r["id"])
    columns = {}
    for field in schema:
        values = [r.get(field.name) for r in rows]
        if pa.types.is_list(field.type):
            np_type = field.type.value_type.to_pandas_dtype()
            values = [None if v is None else np.asarray(v, dtype=np_type) for v in values]
        columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=schema)
