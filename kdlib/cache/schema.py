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
PARQUET_ENCODING = b"parquet_encoding"  # field metadata: the Parquet encoding a column is written with


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _arrow(dtype: np.dtype) -> pa.DataType:
    return pa.from_numpy_dtype(np.dtype(dtype))


def split_bytes(field: pa.Field) -> pa.Field:
    """The field, marked to be written with Parquet's BYTE_STREAM_SPLIT encoding (kdlib/cache/shards.py): each
    byte of a value in its own stream, so zstd sees the near-constant high bytes of small ids and levels apart."""
    return field.with_metadata({PARQUET_ENCODING: b"BYTE_STREAM_SPLIT"})


def _q8_sample_field(field: pa.Field) -> pa.Field:
    """A sampled-cache field as topk_encoding q8 stores it: sample_ids as sample_id_deltas (per position the
    first id, then differences; byte-stream-split), any other field as it is (counts and sizes measured no
    smaller split)."""
    if field.name == "sample_ids":
        return split_bytes(pa.field("sample_id_deltas", field.type))  # (sum of sizes,) first id, then differences
    return field


def row_schema(*, vocab_size: int, top_k: int = 0, dense_logits: bool = False, hidden_layers: list[int] = (),
               pooled: bool = False, has_labels: bool = False, has_mlm: bool = False,
               regression_labels: bool = False, keep_text: bool = False, qkv_layers: list[int] = (),
               vector_encoding: str = "fp16", sampled_tokens: int = 0, topk_encoding: str = "fp16",
               char_offsets: bool = False) -> pa.Schema:
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
    if keep_text and char_offsets:
        raise ValueError("char_offsets: corpus rows keep their text with char_offsets, task rows with keep_text; "
                         "not both")
    if keep_text:
        fields.append(pa.field("text", pa.string()))  # the row's (augmented) text, as the teacher's tokenizer read it
        fields.append(pa.field("text_b", pa.string()))  # its second segment, or null
    if char_offsets:  # corpus rows: a student with another tokenizer aligns its tokens to the teacher's
        fields.append(pa.field("text", pa.string()))  # the characters the row's tokens cover, document pieces joined by \n
        fields.append(pa.field("char_offsets", pa.list_(pa.int32())))  # (T*2,) start, end per token in text; specials empty
        fields.append(pa.field("text_breaks", pa.list_(pa.int32())))  # where each document piece after the first starts
    if has_mlm:
        fields.append(pa.field("mlm_positions", pa.list_(pa.int32())))  # masked positions
        fields.append(pa.field("mlm_labels", pa.list_(pa.int32())))  # original ids at those positions
    if top_k and topk_encoding == "q8":  # kdlib/cache/codec.py; each position's entries sorted by id
        # (T*k,) per position the first id, then differences; (T*k,) logit levels below the max (0: the argmax)
        fields.append(split_bytes(pa.field("topk_id_deltas", pa.list_(_arrow(id_dtype(vocab_size))))))
        fields.append(split_bytes(pa.field("topk_levels", pa.list_(pa.uint8()))))
        fields.append(split_bytes(pa.field("topk_max", pa.list_(pa.float32()))))  # (T,) largest teacher logit
        fields.append(split_bytes(pa.field("topk_step", pa.list_(pa.float16()))))  # (T,) width of one level
        fields.append(split_bytes(pa.field("lse", pa.list_(pa.float32()))))  # (T,) full-vocabulary log-sum-exp
    elif top_k:
        if topk_encoding != "fp16":
            raise ValueError(f"topk_encoding: expected fp16 or q8, got {topk_encoding!r}")
        fields.append(pa.field("topk_ids", pa.list_(_arrow(id_dtype(vocab_size)))))  # (T*k,) sorted by logit, desc
        fields.append(pa.field("topk_logits", pa.list_(pa.float16())))  # (T*k,) teacher logits at those ids
        fields.append(pa.field("lse", pa.list_(pa.float32())))  # (T,) full-vocabulary log-sum-exp
    if sampled_tokens:  # kdlib/cache/sampling.py: draws from the teacher (outside the top-k when it is cached)
        fields.append(pa.field("sample_ids", pa.list_(_arrow(id_dtype(vocab_size)))))  # unique drawn ids, ascending per position
        fields.append(pa.field("sample_counts", pa.list_(pa.uint8())))  # how often each was drawn (of sampled_tokens)
        fields.append(pa.field("sample_sizes", pa.list_(pa.uint8())))  # (T,) unique ids per position
    if sampled_tokens and topk_encoding == "q8":  # the drawn ids delta-coded as the top-k's (kdlib/cache/codec.py)
        fields = [_q8_sample_field(f) for f in fields]
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
