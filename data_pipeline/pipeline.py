"""Build and run the transfer-set pipeline, then write the manifest last.

Before any Beam work: the config is validated against the teacher's config.json, the fingerprints
are computed, the output folder is locked against a second writer, and an existing output folder is
checked (anything but a transfer set is refused; a different teacher, tokenizer or config is refused
unless `overwrite`; a complete set from the same inputs is verified and left as it is).
`build.json` records what a folder is being built with, so a killed build resumes only with the
same inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Optional

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from tqdm import tqdm

from data_pipeline.config import PipelineConfig
from data_pipeline.rows import shard_of, stable_hash
from data_pipeline.store import run_in_store
from data_pipeline.runners import RunnerChoice, dask_failure
from data_pipeline.transforms import (NS, AugmentUnits, PackAndMask, ReadSource, TeacherShard, TokenizeUnits,
                                      build_vocabulary, pos_pairs, task_row)
from kdlib.cache import (FORMAT_VERSION, MANIFEST, Manifest, ShardInfo, id_dtype, read_manifest,
                         remove_partial_files, row_schema, verify_shards, write_manifest)
from kdlib.cache.codec import TOPK_COLUMNS
from kdlib.cache.sampling import REFERENCE_STUDENT_SCALE
from kdlib.cache.shards import SHARD_DIR, column_bytes_per_position
from kdlib.cache.vectors import merge_fidelity
from kdlib.config import config_hash, to_dict
from kdlib.errors import CacheError, ConfigError, KDError, ModelLoadError, ReaderError, field_named
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.io import atomic_write_text, replace_directory, staging_path
from kdlib.runtime.models import check_model_folder, load_tokenizer, resolve_model_path
from kdlib.runtime.outputs import check_output_folder, output_lock, read_stamp, save_resolved
from kdlib.runtime.redirect import stderr_into
from kdlib.text.packing import packing_for, packing_ids
from kdlib.text.readers import read_corpus
from kdlib.tasks.readers import drop_unset_additions, label_number, read_task
from kdlib.schemas import check_against_teacher, shape_fields

BUILD = "build.json"
# Fields that change where or how fast a transfer set is built, never what it contains.
NON_CONTENT_FIELDS = ("output_dir", "overwrite", "torch_threads", "cache_root")


def content_hash(cfg: PipelineConfig) -> str:
    """Hash of the config fields that determine the rows (not the output path or thread count)."""
    unset_additions = (("augment_model",) if cfg.augment_model is None else ()) + (
        ("architectures",) if not cfg.architectures else ()) + (
        ("task_type",) if cfg.task_type == "classification" else ()) + (
        ("keep_text",) if not cfg.keep_text else ()) + (
        ("char_offsets",) if not cfg.char_offsets else ())  # sets built before these options keep their hash
    values = {k: v for k, v in to_dict(cfg).items() if k not in NON_CONTENT_FIELDS + unset_additions}
    if cfg.corpus is not None and packing_for(cfg.teacher.task) == "causal":
        values["packing"] = "causal"  # rows a causal teacher's corpus set got before causal packing differ
    outputs = values["teacher_outputs"]
    if not outputs["qkv_layers"]:
        del outputs["qkv_layers"]
    if not outputs["sampled_tokens"]:  # sets built before sampled caches keep their hash
        del outputs["sampled_tokens"]
    if outputs["vector_encoding"] == "fp16":
        del outputs["vector_encoding"]
    if outputs["topk_encoding"] == "fp16":  # sets built before topk_encoding keep their hash
        del outputs["topk_encoding"]
    if values["masking"]["rows"] == 1.0:
        del values["masking"]["rows"]
    if values.get("task") is not None:  # task sets built before the dedupe / split fields keep their hash
        values["task"] = drop_unset_additions(values["task"])
    return config_hash(values)


def preflight(cfg: PipelineConfig, source: str) -> dict:
    """Everything that can fail cheaply fails here, before a worker starts."""
    with field_of(source, "teacher.path"):
        folder = resolve_model_path(cfg.teacher.path)
        teacher_config = check_model_folder(folder)
    if cfg.augment_model is not None:  # its workers load it; a wrong folder fails here, not in the middle of a run
        with field_of(source, "augment_model.path"):
            check_model_folder(resolve_model_path(cfg.augment_model.path))
    check_against_teacher(source, teacher_config, outputs=cfg.teacher_outputs, max_length=cfg.max_length)
    tokenizer = check_tokenizer(cfg, source, folder, teacher_config)
    labels = list(cfg.labels)
    with field_of(source, "task.path" if cfg.task is not None else "corpus.path"):
        records = read_task(cfg.task) if cfg.task is not None else read_corpus(cfg.corpus)
        if cfg.task is not None and cfg.task_type == "regression":
            for ex in records:
                if label_number(ex.label) is None:
                    raise KDError(f"{source}: field 'task_type': regression needs a finite number as the label of "
                                  f"every example; example {ex.id} has {ex.label!r}")
        elif cfg.task is not None:
            found = sorted({ex.label for ex in records})  # also proves the input is not empty
            unknown = sorted(set(found) - set(labels)) if labels else []
            if unknown:
                raise KDError(f"{source}: field 'labels': the task has labels {unknown} that are not listed in "
                              f"{labels}")
            labels = labels or found
        else:
            next(iter(records))  # an empty corpus raises a ReaderError naming the file
    return {"folder": folder, "config": teacher_config, "labels": labels,
            "fingerprint": model_fingerprint(folder), "tokenizer_fingerprint": tokenizer_fingerprint(folder),
            "tokenizer": tokenizer, "config_hash": content_hash(cfg)}


def field_of(source: str, name: str):
    """A loader's or reader's error (naming the folder, or the file and line) as a ConfigError naming the field."""
    return field_named(source, name, catch=(ModelLoadError, ReaderError), raise_as=ConfigError)


def check_tokenizer(cfg: PipelineConfig, source: str, folder: Path, teacher_config: dict) -> dict:
    """The teacher tokenizer has what the rows need (a causal teacher's eos ends each packed document; a masked
    LM's [CLS] / [SEP] frame corpus rows; char_offsets needs a fast tokenizer's offsets); returns what the
    manifest records of it."""
    with field_of(source, "teacher.path"):
        tok = load_tokenizer(str(folder), teacher_config)
    if cfg.corpus is not None:
        packing = packing_for(cfg.teacher.task)
        prefix, separator = packing_ids(tok, packing)
        if packing == "causal" and separator is None:
            raise ConfigError(f"{source}: field 'teacher.path': the causal_lm teacher's tokenizer in {folder} has no "
                              "eos token; causal packing ends each document of a corpus row with it")
        if packing == "cls" and (prefix is None or separator is None):
            raise ConfigError(f"{source}: field 'teacher.path': the {cfg.teacher.task} teacher's tokenizer in {folder} "
                              "has no [CLS] or no [SEP] token; its corpus rows are [CLS] + documents each followed "
                              "by [SEP] (a decoder teacher: task causal_lm)")
    if cfg.char_offsets and not getattr(tok, "is_fast", False):
        raise ConfigError(f"{source}: field 'char_offsets': needs a fast tokenizer's character offsets; the "
                          f"tokenizer in {folder} is not a fast one (no tokenizer.json)")
    return {"class": type(tok).__name__, "size": len(tok), "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id}


STAGE = "python -m data_pipeline"


def _found_claim(out: Path) -> Optional[dict]:
    """The inputs a transfer set (manifest.json) or an interrupted build (build.json) in `out` was made from."""
    for name in (MANIFEST, BUILD):
        if (out / name).is_file():
            try:
                data = read_stamp(out, name)
                return {"teacher_fingerprint": data.get("teacher_fingerprint") or data["teacher"]["fingerprint"],
                        "tokenizer_fingerprint": data["tokenizer_fingerprint"], "config_hash": data["config_hash"]}
            except (ValueError, KeyError, TypeError):
                raise CacheError(f"{out / name}: not a readable {name}; nothing was changed. Move the folder "
                                 "away, or choose another output_dir") from None
    return None


def claim_directory(cfg: PipelineConfig, info: dict) -> tuple[Path, Optional[Manifest]]:
    """Create, resume or recognise output_dir; returns (the folder to build in, the manifest when the set is
    already complete).

    A folder holding anything but a transfer set (or its interrupted build) is refused; one built with
    other inputs is refused naming both. With overwrite: true it is replaced, but only at the end: the new
    set is built beside it in `.tmp-<name>` and swapped in once complete. A complete set from the same
    inputs is verified and left as it is: a rerun never makes a readable transfer set unreadable.
    """
    out = Path(cfg.output_dir)
    mine = {"teacher_fingerprint": info["fingerprint"], "tokenizer_fingerprint": info["tokenizer_fingerprint"],
            "config_hash": info["config_hash"]}
    found = _found_claim(out) if out.is_dir() else None
    diffs = "; ".join(f"{k}: directory has {found[k]}, this run has {mine[k]}" for k in mine
                      if found is not None and found[k] != mine[k])
    state = check_output_folder(out, stage=STAGE, found_claim=None if found is None else json.dumps(found, sort_keys=True),
                                claim=json.dumps(mine, sort_keys=True), overwrite=cfg.overwrite, difference=diffs)
    build = out
    if state == "replace":
        build = staging_path(out)
        print(f"[data_pipeline] overwrite: true: building beside {out} in {build.name}; it replaces the old set "
              f"({diffs}) only once complete")
        if build.exists() and _found_claim(build) != mine:  # our own staging folder from another attempt
            shutil.rmtree(build)
    if state == "same" and (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        try:
            verify_shards(out, manifest)
            return out, manifest
        except CacheError as err:  # unreadable already: rebuild what is missing, then a fresh manifest
            print(f"[data_pipeline] {err}; rebuilding the missing shards")
    build.mkdir(parents=True, exist_ok=True)
    atomic_write_text(build / BUILD, json.dumps(mine, indent=1))  # claims the folder before the manifest goes
    (build / MANIFEST).unlink(missing_ok=True)  # only reached when the set is incomplete or corrupted
    removed = remove_partial_files(build)
    if removed:
        print(f"[data_pipeline] removed {removed} partial file(s) left by an interrupted run")
    return build, None


def schema_kwargs(cfg: PipelineConfig, info: dict) -> dict:
    o = cfg.teacher_outputs
    return dict(vocab_size=info["config"]["vocab_size"], top_k=o.top_k, dense_logits=o.dense_logits,
                hidden_layers=list(o.hidden_layers), pooled=o.pooled is not None,
                qkv_layers=list(o.qkv_layers), vector_encoding=o.vector_encoding, sampled_tokens=o.sampled_tokens,
                topk_encoding=o.topk_encoding,
                has_labels=cfg.task is not None, has_mlm=cfg.corpus is not None and cfg.masking.prob > 0,
                regression_labels=cfg.task_type == "regression", keep_text=cfg.keep_text,
                char_offsets=cfg.char_offsets)


def build_pipeline(p: beam.Pipeline, cfg: PipelineConfig, out: Path, info: dict) -> None:
    """read -> augment -> tokenize -> pack/mask (corpus) or one row per example (task) -> teacher -> shards."""
    units = (p | "Start" >> beam.Create([None]) | "Read" >> beam.ParDo(ReadSource(cfg))
             | "Spread" >> beam.Reshuffle())
    if cfg.augment.copies > 0:
        vocab = (units | "BatchForPos" >> beam.BatchElements(min_batch_size=64, max_batch_size=512)
                 | "TagWords" >> beam.FlatMap(pos_pairs, cfg.augment.mask_token)
                 | "CountWords" >> beam.combiners.Count.PerElement()
                 | "AllCounts" >> beam.combiners.ToList()
                 | "Vocabulary" >> beam.Map(build_vocabulary))
        units = (units | "BatchForAugment" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
                 | "Augment" >> beam.ParDo(AugmentUnits(cfg), beam.pvalue.AsSingleton(vocab)))
    tokens = (units | "BatchForTokenizer" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
              | "Tokenize" >> beam.ParDo(TokenizeUnits(cfg)))
    if cfg.task is not None:
        rows = tokens | "Rows" >> beam.Map(task_row, info["labels"], cfg.task_type == "regression")
    else:
        groups = cfg.pack_groups
        rows = (tokens | "KeyPackGroup" >> beam.Map(lambda t: ((t.copy_index, stable_hash(t.source_id) % groups), t))
                | "GroupForPacking" >> beam.GroupByKey() | "PackAndMask" >> beam.ParDo(PackAndMask(cfg)))
    shards = cfg.num_shards
    _ = (rows | "KeyShard" >> beam.Map(lambda r: (shard_of(r["id"], shards), r))
         | "GroupShards" >> beam.GroupByKey()
         | "TeacherAndWrite" >> beam.ParDo(TeacherShard(cfg, str(out), schema_kwargs(cfg, info))))


def watch_progress(out: Path, total_shards: int, stop: threading.Event, terminal=None) -> None:
    """Runner-agnostic progress: completed shard sidecars, tokens, tokens/s and ETA."""
    shard_dir, t0 = out / SHARD_DIR, time.time()
    already = len(list(shard_dir.glob("*.json"))) if shard_dir.is_dir() else 0
    seen = already
    with tqdm(total=total_shards, desc="teacher shards", unit="shard", initial=already, disable=None,
              file=terminal) as bar:
        while not stop.wait(2.0):
            done = list(shard_dir.glob("*.json")) if shard_dir.is_dir() else []
            if len(done) == seen:
                continue
            seen = len(done)
            infos = [json.loads(p.read_text()) for p in done]
            tokens = sum(i.get("tokens", 0) for i in infos)
            bar.n = len(done)
            bar.set_postfix(sequences=f"{sum(i.get('rows', 0) for i in infos):,}", tokens=f"{tokens:,}",
                            tok_s=f"{tokens / (time.time() - t0):,.0f}")
            bar.refresh()


def beam_counters(result) -> dict:
    """The pipeline's own counters (documents read, augmented copies, sequences, tokens, shards skipped)."""
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NS))["counters"]
    except (NotImplementedError, KeyError, AttributeError):  # a runner without metrics support
        return {}
    return {c.key.metric.name: c.committed or c.attempted or 0 for c in counters}


def collect_manifest(cfg: PipelineConfig, out: Path, info: dict, seconds: float) -> Manifest:
    shard_dir = out / SHARD_DIR
    shards = [ShardInfo(**json.loads(p.read_text())) for p in sorted(shard_dir.glob("shard-*.json"))]
    if not shards or sum(s.rows for s in shards) == 0:
        raise CacheError(f"{out}: the pipeline produced no rows (is every text shorter than min_length={cfg.min_length}?)")
    positions = sum(s.fidelity.get("positions", 0) for s in shards)
    o = cfg.teacher_outputs
    topk = positions and o.top_k
    fidelity = {"positions": positions,
                "mean_kept_mass": sum(s.fidelity.get("kept_mass", 0.0) for s in shards) / positions if topk else None,
                "mean_kl": sum(s.fidelity.get("kl", 0.0) for s in shards) / positions if topk else None}
    if topk:  # of the logits as stored (topk_encoding), against the teacher's float32 ones
        errors = [s.fidelity["max_logit_error"] for s in shards if "max_logit_error" in s.fidelity]
        fidelity["max_logit_error"] = max(errors) if errors else None  # (None: shards written before it was kept)
        fidelity["topk_encoding"] = o.topk_encoding
    if positions and o.sampled_tokens:
        fidelity["sampled"] = sampled_fidelity_summary([s.fidelity.get("sampled", {}) for s in shards], o)
    if o.hidden_layers or o.qkv_layers:
        fidelity["vectors"] = merge_fidelity([s.fidelity.get("vectors", {}) for s in shards])
        fidelity["vector_encoding"] = o.vector_encoding
    schema = row_schema(**schema_kwargs(cfg, info))
    rows, tokens = sum(s.rows for s in shards), sum(s.tokens for s in shards)
    size = sum(s.bytes for s in shards)
    c = shape_fields(info["config"])  # GPT-2's n_layer / n_embd under BERT's names
    return Manifest(
        format_version=FORMAT_VERSION,
        teacher={"ref": cfg.teacher.path, "fingerprint": info["fingerprint"], "task": cfg.teacher.task,
                 "vocab_size": c.get("vocab_size"), "num_layers": c.get("num_hidden_layers"),
                 "hidden_size": c.get("hidden_size"), "model_type": c.get("model_type"),
                 "tokenizer": info["tokenizer"]},
        tokenizer_fingerprint=info["tokenizer_fingerprint"], config=to_dict(cfg), config_hash=info["config_hash"],
        cached={"top_k": o.top_k, **({"sampled_tokens": o.sampled_tokens} if o.sampled_tokens else {}),
                "dense_logits": o.dense_logits, "hidden_layers": list(o.hidden_layers),
                **({"qkv_layers": list(o.qkv_layers)} if o.qkv_layers else {}),
                **({"vector_encoding": o.vector_encoding} if o.hidden_layers or o.qkv_layers else {}),
                **({"topk_encoding": o.topk_encoding} if o.top_k else {}),
                "pooled": o.pooled, "labels": info["labels"] or None, "task_type": cfg.task_type if cfg.task else None,
                "text": cfg.keep_text, "char_offsets": cfg.char_offsets,
                "packing": packing_for(cfg.teacher.task) if cfg.corpus is not None else None,
                "mlm": cfg.corpus is not None and cfg.masking.prob > 0,
                "topk_id_dtype": str(id_dtype(c["vocab_size"])) if o.top_k else None},
        dtypes={f.name: f"{f.type.value_type}[]" if hasattr(f.type, "value_type") else str(f.type) for f in schema}, max_length=cfg.max_length, shards=shards,
        totals={"rows": rows, "tokens": tokens, "bytes": size,
                "bytes_per_position": size / tokens if tokens else None, "seconds": round(seconds, 1),
                "bytes_per_position_by_column": column_bytes_per_position(out, shards, tokens)},
        fidelity=fidelity, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def sampled_fidelity_summary(parts: list[dict], o) -> dict:
    """Means over the fidelity positions of a sampled (or top-k + sampled tail) cache: TV between the teacher p
    and the estimate the reader makes, and the estimated KD gradient against the dense one at a reference
    student (kdlib/cache/sampling.py estimate_fidelity)."""
    positions = sum(part.get("positions", 0) for part in parts)
    mean = {name: sum(part.get(name, 0.0) for part in parts) / positions if positions else None
            for name in ("tv", "grad_cosine", "grad_bias_norm", "grad_error_norm")}
    # KL(p || estimate) is infinite, so recorded as null: the estimate carries all the mass (counts / N sum to 1,
    # and with a top-k, r * counts / N sum to the missing mass r), so no leftover can be spread over the ids
    # never drawn, which the teacher gives mass. TV and the gradient figures are the informative ones.
    infinite = sum(part.get("kl_infinite", 0) for part in parts)
    return {"positions": positions, "sampled_tokens": o.sampled_tokens, "tail": bool(o.top_k),
            "mean_tv": mean["tv"], "mean_kl": None, "kl_infinite_positions": infinite,
            "mean_grad_cosine": mean["grad_cosine"], "mean_grad_bias_norm": mean["grad_bias_norm"],
            "mean_grad_error_norm": mean["grad_error_norm"],
            "reference_student": f"{REFERENCE_STUDENT_SCALE} * teacher logits"}


def run(cfg: PipelineConfig, beam_args: list[str], source: str = "<config>",
        runner: RunnerChoice = RunnerChoice(None)) -> Manifest:
    """Preflight, run the Beam pipeline, then verify and write manifest.json last; with cache_root, in the store
    under the set's content key, and output_dir links there (data_pipeline/store.py). `runner` (the --runner
    flags) starts its cluster only when there is something to build."""
    if cfg.cache_root:
        return run_in_store(cfg, beam_args, source, build=partial(_run_here, runner=runner),
                            info=preflight(cfg, source))
    return _run_here(cfg, beam_args, source, runner)


def _run_here(cfg: PipelineConfig, beam_args: list[str], source: str, runner: RunnerChoice) -> Manifest:
    out = Path(cfg.output_dir)
    if out.is_symlink():  # most likely a link into a store, whose set other run folders share
        raise ConfigError(f"{source}: field 'output_dir': {out} is a link (to {os.readlink(out)}); a set in a store "
                          "is built or changed only through cache_root. Set cache_root, or choose another output_dir")
    info = preflight(cfg, source)
    with output_lock(out, STAGE):
        build, complete = claim_directory(cfg, info)
        if complete is not None:
            print(f"[data_pipeline] {out}: already complete with this config (hash {info['config_hash'][:12]}, "
                  f"{len(complete.shards)} shards verified); nothing to do")
            return complete
        manifest = _build(cfg, beam_args, build, info, runner)
        if build != out:
            replace_directory(build, out)
            print(f"[data_pipeline] replaced {out} with the new transfer set")
        return manifest


def _build(cfg: PipelineConfig, beam_args: list[str], out: Path, info: dict, runner: RunnerChoice) -> Manifest:
    save_resolved(cfg, out)
    print(f"[data_pipeline] teacher {info['fingerprint'][:12]}  tokenizer {info['tokenizer_fingerprint'][:12]}  "
          f"config {info['config_hash'][:12]}  -> {out}")
    stop = threading.Event()
    t0 = time.time()
    # the workers' own tracebacks go to this log; the user reads one error line (worker_error) that names it
    log = out / "logs" / f"workers-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.log"
    with stderr_into(log) as terminal, runner.beam_args(beam_args, cfg.num_shards) as runner_args:
        watcher = threading.Thread(target=watch_progress, args=(out, cfg.num_shards, stop, terminal), daemon=True)
        watcher.start()
        try:
            p = beam.Pipeline(options=PipelineOptions(runner_args))
            build_pipeline(p, cfg, out, info)
            result = p.run()
            result.wait_until_finish()
        except KDError:
            raise
        except Exception as err:  # a worker's error arrives wrapped in Beam's own exception and traceback
            raise dask_failure(err) or worker_error(err, out) from None
        finally:
            stop.set()
            watcher.join()
    removed = remove_partial_files(out)  # a worker killed mid-write (Dask ran its shard again elsewhere)
    if removed:
        print(f"[data_pipeline] removed {removed} partial file(s) left by a lost worker")
    counters = beam_counters(result)
    if counters:  # (a Dask run has none: the manifest's totals below say the same)
        print("[data_pipeline] " + ", ".join(f"{name} {value:,}" for name, value in counters.items()))
    manifest = collect_manifest(cfg, out, info, time.time() - t0)
    write_manifest(out, manifest)
    (out / BUILD).unlink(missing_ok=True)
    t, f = manifest.totals, manifest.fidelity
    print(f"[data_pipeline] {t['rows']} rows, {t['tokens']:,} tokens in {len(manifest.shards)} shards, "
          f"{t['bytes'] / 1e6:.1f} MB ({t['bytes_per_position']:.1f} bytes/position), {t['seconds']}s"
          + (f"; top-{cfg.teacher_outputs.top_k} ({f['topk_encoding']}, {topk_bytes(t):.1f} bytes/position) kept mass "
             f"{f['mean_kept_mass']:.4f}, KL {f['mean_kl']:.4f}"
             + (f", max logit error {f['max_logit_error']:.2g}" if f.get("max_logit_error") is not None else "")
             if f["mean_kept_mass"] is not None else "")
          + (f"; {cfg.teacher_outputs.sampled_tokens} draws{' (tail)' if cfg.teacher_outputs.top_k else ''} TV "
             f"{f['sampled']['mean_tv']:.4f}, gradient cosine {f['sampled']['mean_grad_cosine']:.4f}"
             if "sampled" in f else "")
          + "".join(f"; {name} ({f['vector_encoding']}) cosine {v['mean_cosine']:.5f}, relative error "
                    f"{v['mean_relative_error']:.5f}" for name, v in f.get("vectors", {}).items()))
    return manifest


def topk_bytes(totals: dict) -> float:
    """Compressed bytes per position of the top-k columns (ids, logits or their q8 columns, log-sum-exp)."""
    return sum(v for name, v in totals["bytes_per_position_by_column"].items() if name in TOPK_COLUMNS)


# The last user error (kdlib.errors) named in a worker's traceback, and Beam's "[while running 'Step']" suffix.
_WORKER_ERROR = re.compile(r"kdlib\.errors\.(\w+): (.+?)(?: \[while running '([^']+)'\])?$", re.MULTILINE)


def worker_error(err: BaseException, out: Path) -> BaseException:
    """A user error raised inside a Beam worker (a bad line in the middle of a corpus) as one readable KDError,
    with Beam's whole traceback kept in `out/logs/`; any other error (a bug) is returned as it is."""
    text = "".join(traceback.format_exception(err))
    found = _WORKER_ERROR.findall(text)
    if not found:
        return err
    _, message, step = found[-1]
    log = out / "logs" / f"worker-error-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.log"
    atomic_write_text(log, text)
    where = f" in Beam step '{step}'" if step else " in a Beam worker"
    return KDError(f"{message} (raised{where}; Beam's detail: {log})")


__all__ = ["run", "preflight", "claim_directory", "build_pipeline"]
