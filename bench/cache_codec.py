"""What the top-k encodings cost and lose: bytes per position and fidelity of fp16 against q8, per k.

`python -m bench.cache_codec [--config configs/demo_pipeline.yaml] [--rows 64] [--ks 8 16 32 64]
[--transfer-set runs/demo/transfer_set]` runs the demo teacher (the config's `teacher`, runs/demo/teacher_mlm:
prepare it with `python -m teacher --config configs/demo_teacher.yaml`) over the first rows of the config's
corpus (its documents tokenized and cut into max_length rows; or the rows of a transfer set), writes each
(k, encoding) as one shard with the pipeline's own row builder and writer (kdlib.teachers.outputs.rows_from_outputs,
kdlib.cache.write_shard), and prints a markdown table: compressed bytes per position of the top-k columns
(ids, logits, log-sum-exp: in total and by part), the kept mass and KL of the reconstruction on sampled
positions (kdlib.teachers.outputs.topk_reconstruction, on the stored values), the largest |stored - teacher
logit| over every position, the share of positions whose read-back order is the teacher's whole top-k order
(the top-1 always is), and the time to collate a 32-row batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipeline.config import PipelineConfig
from kdlib.cache import TransferSet, collate_rows, row_schema, rows_to_table, write_shard
from kdlib.cache.codec import TOPK_COLUMNS, stored_topk_logits
from kdlib.cache.shards import column_bytes_per_position
from kdlib.config import load_config
from kdlib.errors import KDError
from kdlib.runtime.models import check_model_folder, load_model, load_tokenizer, resolve_model_path
from kdlib.text.padding import pad_sequences
from kdlib.text.readers import read_corpus
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward, topk_reconstruction

ENCODINGS = ("fp16", "q8")


def demo_rows(cfg: PipelineConfig, tokenizer, count: int) -> list[np.ndarray]:
    """The first `count` rows of [CLS] + max_length - 2 tokens + [SEP] cut from the corpus's documents in order."""
    body, rows = cfg.max_length - 2, []
    for doc in read_corpus(cfg.corpus):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - cfg.min_length, body):
            rows.append(np.asarray([tokenizer.cls_token_id] + ids[start:start + body] + [tokenizer.sep_token_id],
                                   dtype=np.int32))
            if len(rows) == count:
                return rows
    return rows


def teacher_outputs(model, rows: list[np.ndarray], pad_id: int, k_max: int, batch_size: int = 16):
    """Per batch of rows: padded ids, mask and the teacher's raw outputs (its float32 logits)."""
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_sequences(rows[start:start + batch_size], pad_id)
        raw = teacher_forward(model, ids, mask, TeacherOutputsConfig(top_k=k_max))
        yield ids, mask, raw


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_codec", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_pipeline.yaml")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--fidelity-positions", type=int, default=1024)
    parser.add_argument("--transfer-set", default=None,
                        help="read the rows (input ids) of this transfer set instead: packed and masked as the "
                             "pipeline built them (e.g. runs/demo/transfer_set)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = load_config(args.config, PipelineConfig)
    try:
        folder = resolve_model_path(cfg.teacher.path)
        check_model_folder(folder)
    except KDError as err:
        raise SystemExit(f"bench.cache_codec: the demo teacher is missing ({err}); prepare it with "
                         f"`python -m teacher --config configs/demo_teacher.yaml`") from None
    model = load_model(cfg.teacher)
    tokenizer = load_tokenizer(cfg.teacher.path)
    vocab = model.config.vocab_size
    if args.transfer_set:
        ts = TransferSet(args.transfer_set, verify="off")
        rows = [np.asarray(ts.row(i)["input_ids"], dtype=np.int32) for i in range(min(args.rows, len(ts)))]
        source = f"rows of {args.transfer_set}"
    else:
        rows, source = demo_rows(cfg, tokenizer, args.rows), f"{cfg.corpus.kind} text"
    positions = sum(len(r) for r in rows)
    stride = max(1, positions // args.fidelity_positions)
    stored: dict[tuple[int, str], list[dict]] = {(k, e): [] for k in args.ks for e in ENCODINGS}
    sampled, tops = [], []  # fidelity positions' full logits; every position's top-k_max float32 logits
    t0 = time.time()
    for ids, mask, raw in teacher_outputs(model, rows, tokenizer.pad_token_id or 0, max(args.ks)):
        real = mask.bool()
        logits = raw["logits"][real]
        sampled.append(logits[::stride].clone())
        tops.append(torch.topk(logits, max(args.ks), dim=-1).values.numpy())
        for k in args.ks:
            for e in ENCODINGS:
                outputs = TeacherOutputsConfig(top_k=k, topk_encoding=e)
                for i, values in enumerate(rows_from_outputs(raw, ids, mask, outputs, vocab)):
                    n = len(stored[(k, e)])
                    stored[(k, e)].append(dict(values, id=f"row-{n:06d}", source_id="demo", augmentation="original",
                                               input_ids=ids[i][real[i]].numpy().astype(np.int32)))
    sampled, tops = torch.cat(sampled), np.concatenate(tops)
    print(f"{len(rows)} rows, {positions} positions of {source}; teacher {cfg.teacher.path} "
          f"(vocabulary {vocab}); fidelity on {len(sampled)} positions; teacher {time.time() - t0:.0f} s\n")
    print("| k | encoding | top-k bytes/pos | ids | logits | lse | kept mass | KL of reconstruction | "
          "max abs logit error | order as teacher's | collate 32x128 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        for e in ENCODINGS:
            with tempfile.TemporaryDirectory() as tmp:
                schema = row_schema(vocab_size=vocab, top_k=k, topk_encoding=e)
                info = write_shard(tmp, "shard-00000-of-00001", rows_to_table(stored[(k, e)], schema))
                by_column = column_bytes_per_position(tmp, [info], info.tokens)
                table = pq.read_table(Path(tmp) / info.file)
            cols = {name: by_column.get(name, 0.0) for name in TOPK_COLUMNS}
            id_bytes = cols["topk_ids"] + cols["topk_id_deltas"]
            logit_bytes = cols["topk_logits"] + cols["topk_levels"] + cols["topk_max"] + cols["topk_step"]
            kept, kl, _ = topk_reconstruction(sampled, k, e)
            error = float(np.abs(stored_topk_logits(tops[:, :k], e).astype(np.float64) - tops[:, :k]).max())
            read = [{name: np.asarray(v) if isinstance(v, list) else v for name, v in r.items()}
                    for r in table.slice(0, 32).to_pylist()]
            t1 = time.perf_counter()
            for _ in range(5):
                batch = collate_rows(read, top_k=k, hidden_size=0)
            collate_ms = (time.perf_counter() - t1) / 5 * 1e3
            teacher_ids = [r["topk_ids"].reshape(-1, k) for r in stored[(k, "fp16")][:32]]
            got = batch["topk_ids"][batch["attention_mask"].bool()].numpy()
            same = float((np.concatenate(teacher_ids) == got).all(-1).mean())
            print(f"| {k} | {e} | {sum(cols.values()):.1f} | {id_bytes:.1f} | {logit_bytes:.1f} | {cols['lse']:.1f} "
                  f"| {float(kept.double().mean()):.4f} | {float(kl.double().mean()):.6f} | {error:.4f} | "
                  f"{same:.3f} | {collate_ms:.1f} |")


if __name__ == "__main__":
    main()
