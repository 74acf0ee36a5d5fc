"""Beam DoFns of the pipeline. Each loads its heavy state (tagger, tokenizer, teacher) once per
worker in `setup`, and none depends on a runner: they run unchanged on Direct, Dataflow, Flink, Spark."""

from __future__ import annotations

import math
import time

import apache_beam as beam
import numpy as np
import torch
from apache_beam.metrics import Metrics

from data_pipeline.config import PipelineConfig
from data_pipeline.rows import TokenizedText, pack_group, row_id, stable_hash
from kdlib.cache import complete_shard, row_schema, rows_to_table, shard_name, write_shard
from kdlib.cache.sampling import position_samples, sampled_fidelity_sums
from kdlib.cache.vectors import fidelity_sums, merge_sums, vector_names
from kdlib.runtime.models import load_model, load_tokenizer
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward, teacher_vectors, topk_reconstruction
from kdlib.training.architectures import use_architectures
from kdlib.text.augment import (PosVocabulary, augment_batch, default_tagger, is_eligible, make_mlm_candidates_fn,
                                tag_sentences, tokenize)
from kdlib.text.masking import MaskTokens, mask_tokens, word_starts
from kdlib.text.packing import packing_for, packing_ids
from kdlib.text.padding import pad_sequences
from kdlib.text.readers import normalize_text, read_corpus
from kdlib.tasks.readers import read_task
from kdlib.text.tokenize import tokenize_texts

NS = "data_pipeline"


class ReadSource(beam.DoFn):
    """Corpus documents (split into lines when augmenting per line) or task examples, as unit dicts."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.documents = Metrics.counter(NS, "documents")

    def process(self, _):
        cfg = self.cfg
        if cfg.task is not None:
            for ex in read_task(cfg.task):
                self.documents.inc()
                yield {"unit_id": ex.id, "source_id": ex.id, "text": normalize_text(ex.text),
                       "text_b": normalize_text(ex.text_b) if ex.text_b else None, "label": ex.label}
            return
        split = cfg.augment.copies > 0 and cfg.augment_unit == "line"
        for doc in read_corpus(cfg.corpus):
            self.documents.inc()
            parts = [p for p in doc.text.split("\n") if p.strip()] if split else [doc.text]
            for i, part in enumerate(parts):
                yield {"unit_id": f"{doc.id}#{i:06d}", "source_id": doc.id, "text": normalize_text(part),
                       "text_b": None, "label": None}


def pos_pairs(batch: list[dict], mask_token: str):
    """(tag, lowercased word) for every eligible word of a batch of units: input to the POS vocabulary."""
    words = [tokenize(u["text"], mask_token).words for u in batch]
    for ws, tags in zip(words, tag_sentences(default_tagger(), words)):
        for w, t in zip(ws, tags):
            if is_eligible(w, mask_token):
                yield f"{t}\t{w.lower()}"


def build_vocabulary(counts: list[tuple[str, int]], min_count: int = 1) -> str:
    """Counted (tag, word) pairs -> PosVocabulary JSON (a plain string travels to workers safely)."""
    entries: dict[str, list] = {}
    for key, count in counts:
        tag, word = key.split("\t", 1)
        if count >= min_count:
            entries.setdefault(tag, []).append((word, count))
    return PosVocabulary(entries, min_count).to_json()


class AugmentUnits(beam.DoFn):
    """Tang et al. / TinyBERT augmentation of a batch of units; the original is always kept."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.copies = Metrics.counter(NS, "augmented_copies")

    def setup(self):
        self.tagger = default_tagger()
        self.vocab_json = None
        self.mlm_fn = None
        if self.cfg.augment.mlm_replace_prob > 0:
            swap = self.cfg.swap_model
            self.mlm_fn = make_mlm_candidates_fn(load_model(swap), load_tokenizer(swap.path), self.cfg.augment.mlm_top_k)

    def process(self, batch: list[dict], vocab_json: str):
        if vocab_json != self.vocab_json:
            self.vocab, self.vocab_json = PosVocabulary.from_json(vocab_json), vocab_json
        by_id = {u["unit_id"]: u for u in batch}
        outputs = augment_batch([(u["unit_id"], u["text"]) for u in batch], self.cfg.augment, self.vocab,
                                self.tagger, self.mlm_fn)
        for out in outputs:
            unit = by_id[out.example_id]
            if out.copy_index:
                self.copies.inc()
            yield dict(unit, text=out.text, copy_index=out.copy_index, kind=out.kind)


class TokenizeUnits(beam.DoFn):
    """The teacher's fast tokenizer over a batch; corpus units without special tokens (packing adds them)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def setup(self):
        self.tokenizer = load_tokenizer(self.cfg.teacher.path)

    def process(self, batch: list[dict]):
        is_task = self.cfg.task is not None
        texts = [u["text"] for u in batch]
        pairs = [u["text_b"] for u in batch] if is_task and any(u["text_b"] for u in batch) else None
        offsets = self.cfg.char_offsets
        enc = tokenize_texts(self.tokenizer, texts, pairs, task=is_task, max_length=self.cfg.max_length,
                             offsets=offsets)
        for i, u in enumerate(batch):
            kept = {"text": u["text"], "text_b": u.get("text_b")} if self.cfg.keep_text else {}
            if offsets:  # corpus units: packing turns these into each row's text and token spans
                kept = {"text": u["text"], "spans": tuple((int(a), int(b)) for a, b in enc["offset_mapping"][i])}
            yield TokenizedText(unit_id=u["unit_id"], source_id=u["source_id"], copy_index=u.get("copy_index", 0),
                                kind=u.get("kind", "original"), ids=tuple(enc["input_ids"][i]),
                                word_starts=word_starts(enc.word_ids(i)), label=u["label"], **kept)


def masked_row(row_id: str, seed: int, fraction: float) -> bool:
    """Whether a packed row is masked: all of them at fraction 1, else a stable draw from the row's id (its own
    hash, so the masks of the rows that are masked do not depend on the fraction)."""
    return fraction >= 1.0 or stable_hash(f"{seed}:rows:{row_id}") % 1_000_000 < fraction * 1_000_000


class PackAndMask(beam.DoFn):
    """Pack one hash group of corpus units into max_length rows ([CLS] + chunk for masked LMs, plain chunks
    ending documents with eos for causal LMs: kdlib/text/packing.py), then apply seeded MLM masking."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def setup(self):
        tok = load_tokenizer(self.cfg.teacher.path)
        self.cls_id, self.sep_id = packing_ids(tok, packing_for(self.cfg.teacher.task))
        self.tokens = MaskTokens.from_tokenizer(tok)

    def process(self, keyed):
        _, items = keyed
        m = self.cfg.masking
        for row in pack_group(list(items), max_length=self.cfg.max_length, min_length=self.cfg.min_length,
                              cls_id=self.cls_id, sep_id=self.sep_id, char_offsets=self.cfg.char_offsets):
            starts = row.pop("word_starts")
            if m.prob > 0 and masked_row(row["id"], self.cfg.seed, m.rows):
                rng = np.random.default_rng(stable_hash(f"{self.cfg.seed}:{row['id']}"))  # per row: order-free
                masked, positions, labels = mask_tokens(row["input_ids"], rng, m, self.tokens, starts)
                row.update(input_ids=masked, mlm_positions=positions, mlm_labels=labels)
            elif m.prob > 0:  # a plain-text row: the teacher's representations of unmasked text
                row.update(mlm_positions=np.zeros(0, dtype=np.int32), mlm_labels=np.zeros(0, dtype=np.int32))
            yield row


def task_row(item: TokenizedText, labels: list[str], regression: bool = False) -> dict:
    """One labelled example (original or augmented copy) as one row: the label's index, or a regression target."""
    label = None
    if item.label is not None:
        label = float(item.label) if regression else labels.index(item.label)
    row = {"id": row_id(item.source_id, f"{item.copy_index}:{item.kind}", 0), "source_id": item.source_id,
           "augmentation": item.kind, "input_ids": np.asarray(item.ids, dtype=np.int32), "label": label}
    if item.text is not None:  # keep_text: another tokenizer can encode the row again
        row.update(text=item.text, text_b=item.text_b)
    return row


class TeacherShard(beam.DoFn):
    """Run the frozen teacher over one shard's rows (batched by length) and write the shard.

    A shard that is already complete and verified is skipped before the teacher runs, which is
    what makes a rerun after a kill cheap and exact.
    """

    def __init__(self, cfg: PipelineConfig, directory: str, schema_kwargs: dict):
        self.cfg, self.directory, self.schema_kwargs = cfg, directory, schema_kwargs
        self.sequences = Metrics.counter(NS, "sequences")
        self.tokens = Metrics.counter(NS, "tokens")
        self.skipped = Metrics.counter(NS, "shards_skipped")

    def setup(self):
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        use_architectures(self.cfg.architectures)  # in this worker's process, before the teacher is hooked
        self.model = load_model(self.cfg.teacher)
        self.pad_id = load_tokenizer(self.cfg.teacher.path).pad_token_id or 0
        self.vocab_size = self.model.config.vocab_size

    def process(self, keyed):
        shard, rows = keyed
        name = shard_name(shard, self.cfg.num_shards)
        done = complete_shard(self.directory, name)
        if done is not None:
            self.skipped.inc()
            yield done.name
            return
        rows = sorted(rows, key=lambda r: (len(r["input_ids"]), r["id"]))
        fidelity = {"positions": 0, "kept_mass": 0.0, "kl": 0.0}
        quota = math.ceil(self.cfg.teacher_outputs.fidelity_positions / self.cfg.num_shards)
        rng = np.random.default_rng(stable_hash(f"fidelity:{self.cfg.seed}:{name}"))
        out_rows, t0 = [], time.time()
        for start in range(0, len(rows), self.cfg.batch_size):
            batch = rows[start:start + self.cfg.batch_size]
            out_rows.extend(self._forward(batch, fidelity, rng, quota))
        info = write_shard(self.directory, name, rows_to_table(out_rows, row_schema(**self.schema_kwargs)), fidelity)
        self.sequences.inc(info.rows)
        self.tokens.inc(info.tokens)
        print(f"[data_pipeline] {name}: {info.rows} rows, {info.tokens} tokens, "
              f"{info.tokens / max(time.time() - t0, 1e-9):,.0f} tokens/s", flush=True)
        yield info.name

    def _forward(self, batch: list[dict], fidelity: dict, rng: np.random.Generator, quota: int) -> list[dict]:
        outputs = self.cfg.teacher_outputs
        ids, mask = pad_sequences([r["input_ids"] for r in batch], self.pad_id)
        raw = teacher_forward(self.model, ids, mask, outputs)
        # a row's teacher draws are seeded by the pipeline seed and its id alone: a rebuilt shard is byte-identical
        seeds = [stable_hash(f"{self.cfg.seed}:samples:{r['id']}") for r in batch] if outputs.sampled_tokens else None
        values = rows_from_outputs(raw, ids, mask, outputs, self.vocab_size, seeds=seeds)
        want = quota - fidelity["positions"]
        if want > 0:
            real = mask.flatten().nonzero().squeeze(-1).numpy()
            pick = np.sort(rng.choice(real, size=min(want, len(real), max(1, quota // 4)), replace=False))
            fidelity["positions"] += len(pick)
            if outputs.top_k:
                # of the logits as stored (fp16, or q8's decoded levels), so the manifest measures what is read back
                kept, kl, error = topk_reconstruction(
                    raw["logits"].reshape(-1, raw["logits"].shape[-1])[torch.from_numpy(pick)], outputs.top_k,
                    outputs.topk_encoding)
                fidelity["kept_mass"] += float(kept.double().sum())
                fidelity["kl"] += float(kl.double().sum())
                fidelity["max_logit_error"] = max(fidelity.get("max_logit_error", 0.0), float(error.max()))
            if outputs.sampled_tokens:  # the estimate the reader makes from the stored draws of these positions
                T = mask.shape[1]
                part = sampled_fidelity_sums(
                    raw["logits"].reshape(-1, raw["logits"].shape[-1])[torch.from_numpy(pick)],
                    [position_samples(values[i // T], i % T) for i in pick.tolist()], outputs.top_k,
                    outputs.sampled_tokens, outputs.topk_encoding)
                old = fidelity.get("sampled", {})
                fidelity["sampled"] = {key: old.get(key, 0) + value for key, value in part.items()}
            vectors = fidelity.setdefault("vectors", {})
            for name in vector_names(outputs.hidden_layers, outputs.qkv_layers):
                x = teacher_vectors(raw, name)
                part = fidelity_sums(x.reshape(-1, x.shape[-1])[torch.from_numpy(pick)].numpy(), outputs.vector_encoding)
                vectors[name] = merge_sums(vectors.get(name), part)
        return [dict(r, **v) for r, v in zip(batch, values)]
