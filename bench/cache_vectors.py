"""What caching intermediate targets costs: bytes per position and fidelity of each encoding, per target.

`python -m bench.cache_vectors [--teacher runs/demo/teacher_mlm] [--transfer-set runs/demo/transfer_set]
[--rows 64]` runs the teacher on the first rows of a transfer set, stores every target a recipe can
ask for (hidden states, attention Q/K/V, the pooled embedding) in fp16 and in int8 with a scale per
position, each column in its own zstd Parquet file as the pipeline writes it, and prints side by side:
compressed bytes per position, the reconstruction's mean cosine and relative error, and what the
error does to a relation target: the KL between MiniLMv2 relations computed from the exact and
from the stored Q/K/V (the loss a perfect student would still see).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdlib.cache import TransferSet
from kdlib.cache.vectors import encode, fidelity_sums, reconstruct, vector_fields
from kdlib.losses.attention import relation_log_probs, split_relation_heads
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.training.internals import capture_qkv


def stored_bytes(name: str, vectors: list[np.ndarray], encoding: str) -> int:
    """Compressed size of one column (and its scale column) for these rows, written as the pipeline writes."""
    fields = vector_fields(name, encoding)
    columns = {f.name: [] for f in fields}
    for v in vectors:
        stored = encode(v, encoding)
        columns[fields[0].name].append(stored["values"])
        if len(fields) > 1:
            columns[fields[1].name].append(stored["scale"])
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in fields})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "column.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=256)
        return path.stat().st_size


def relation_kl(exact: torch.Tensor, stored: torch.Tensor, mask: torch.Tensor, heads: int) -> float:
    """Mean over relation heads and real queries of KL(relations(exact) || relations(stored))."""
    valid = mask.bool()
    a = relation_log_probs(split_relation_heads(exact.double(), heads, "exact"), valid)
    b = relation_log_probs(split_relation_heads(stored.double(), heads, "stored"), valid)
    keys = valid[:, None, None, :]
    terms = torch.where(keys, a.exp() * (a - b), torch.zeros_like(a)).sum(-1)
    queries = valid[:, None, :].expand_as(terms)
    return float(terms[queries].mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_vectors", description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/demo/teacher_mlm")
    parser.add_argument("--transfer-set", default="runs/demo/transfer_set")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--relation-heads", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ts = TransferSet(args.transfer_set, verify="off")
    batch = ts.batch(list(range(min(args.rows, len(ts)))))
    model = load_model(ModelConfig(path=args.teacher, task="masked_lm"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode(), capture_qkv(model) as qkv:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    lengths = mask.sum(-1).tolist()
    positions = int(sum(lengths))
    targets = {f"hidden_{l}": h.float() for l, h in enumerate(out.hidden_states)}
    for layer in sorted(qkv):
        targets.update({f"{part}_{layer}": qkv[layer][part].float() for part in ("query", "key", "value")})
    real = mask.bool()
    print(f"{args.rows} rows, {positions} positions of {args.transfer_set}; teacher {args.teacher}\n")
    print("| target | fp16 bytes/pos | int8 bytes/pos | int8 / fp16 | fp16 cosine | int8 cosine | "
          "int8 mean rel. error | relation KL fp16 | relation KL int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, x in targets.items():
        rows = [x[i, :n].numpy() for i, n in enumerate(lengths)]
        flat = x[real].numpy()
        size = {e: stored_bytes(name, rows, e) / positions for e in ("fp16", "int8")}
        fid = {e: fidelity_sums(flat, e) for e in ("fp16", "int8")}
        cells = [f"{size['fp16']:.0f}", f"{size['int8']:.0f}", f"{size['int8'] / size['fp16']:.2f}",
                 f"{fid['fp16']['cosine'] / positions:.6f}", f"{fid['int8']['cosine'] / positions:.6f}",
                 f"{fid['int8']['relative_error'] / positions:.4f}"]
        if name.split("_")[0] in ("query", "key", "value"):
            for e in ("fp16", "int8"):
                stored = torch.from_numpy(reconstruct(x.reshape(-1, x.shape[-1]).numpy(), e)).view_as(x)
                cells.append(f"{relation_kl(x, stored, mask, args.relation_heads):.2e}")
        else:
            cells += ["", ""]
        print(f"| {name} | " + " | ".join(cells) + " |")
    pooled = (out.hidden_states[-1] * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    print(f"\npooled (float32, one vector per row): {4 * pooled.shape[-1] * len(lengths) / positions:.1f} bytes/position")


if __name__ == "__main__":
    main()
