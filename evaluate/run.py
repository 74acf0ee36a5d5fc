"""The evaluation: check every input, run the teacher once, score each model, time them side by side.

Python API (a benchmark can call it in-process for many model folders):

    from evaluate.config import EvaluateConfig, HeldOutConfig
    from evaluate.run import evaluate_models, prepare_reference
    cfg = EvaluateConfig(models={"teacher": "runs/demo/teacher_mlm", "s": "runs/x/export"}, teacher="teacher",
                         output_dir="unused", transfer_set="runs/demo/transfer_set")
    reference = prepare_reference(cfg)          # optional: held-out text + the teacher's outputs, reusable
    result = evaluate_models(cfg, reference=reference)   # the evaluation.json content as a dict (nan = n/a)

`evaluate_models` writes nothing; `run(cfg, source)` (the CLI) also checks and writes output_dir. A reference
can be reused for any config with the same teacher folder, transfer set, held-out settings and word batch.
torch, and the modules that import it (evaluate.heldout, .scores, .wordsim, kdlib.runtime.speed: ~2 s), are
imported inside the functions that use them, so that a config mistake is reported in a fraction of a second.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from kdlib.config import config_hash, content_hash, to_dict
from kdlib.errors import ConfigError, KDError
from kdlib.runtime.outputs import check_output_folder, output_lock, read_stamp, save_resolved
from evaluate.config import EvaluateConfig
from evaluate.loading import LoadedModel, ModelEntry, find_model, load
from evaluate.report import relate, write_evaluation

STAGE = "evaluate"
POOLING = ("words embedded alone ([CLS] word [SEP]); the encoder's last hidden state averaged over the word's "
           "non-special tokens; cosine per pair; scipy spearmanr against the human means")
RUN_ONLY = ("output_dir", "threads", "progress_bar", "overwrite")  # fields that change where or how fast, not what


def log(message: str) -> None:
    """One progress line; through tqdm so that a live bar is redrawn below it rather than broken."""
    tqdm.write(f"[evaluate] {message}", file=sys.stdout)
    sys.stdout.flush()


def check_inputs(cfg: EvaluateConfig, source: str = "<config>") -> dict[str, ModelEntry]:
    """Every model folder found and safe, sequence lengths they accept, a transfer set with held-out text:
    checked before any model is loaded. Errors are ConfigErrors naming the config field."""
    from evaluate.heldout import corpus_of  # loads torch and pyarrow (~2 s): --help runs without them

    entries = {}
    for name, ref in cfg.models.items():
        try:
            entries[name] = find_model(name, ref)
        except KDError as err:
            raise ConfigError(f"{source}: field 'models.{name}': {err}") from None
    for field, length, enabled in (("heldout.max_length", cfg.heldout.max_length, cfg.heldout.enabled),
                                   ("speed.length", cfg.speed.length, cfg.speed.enabled)):
        for name, entry in entries.items():
            limit = entry.config.get("max_position_embeddings")
            if enabled and isinstance(limit, int) and length > limit:
                raise ConfigError(f"{source}: field '{field}': expected at most {limit} (model {name!r} has "
                                  f"max_position_embeddings {limit}), got {length}")
    if cfg.heldout.enabled or cfg.transfer_set is not None:  # one that is given and unused is still a mistake
        try:
            corpus_of(cfg.transfer_set)
        except KDError as err:
            raise ConfigError(f"{source}: field 'transfer_set': {err}") from None
    return entries


@dataclass
class PreparedReference:
    """What every evaluation against one teacher shares: the loaded teacher, held-out text, teacher outputs."""

    key: str  # which configs it serves (reference_key)
    teacher: LoadedModel
    heldout: Optional[object]  # evaluate.heldout.HeldOut, or None when held-out metrics are off
    outputs: Optional[object]  # evaluate.scores.Reference
    word_similarity: Optional[dict]  # the teacher's own scores


def reference_key(cfg: EvaluateConfig, teacher: ModelEntry) -> str:
    return config_hash({"teacher": teacher.fingerprint, "folder": str(teacher.folder),
                        "transfer_set": str(Path(cfg.transfer_set).resolve()) if cfg.transfer_set else None,
                        "heldout": to_dict(cfg.heldout), "word_similarity": cfg.word_similarity,
                        "word_batch_size": cfg.word_batch_size})


def prepare_reference(cfg: EvaluateConfig, entries: Optional[dict[str, ModelEntry]] = None) -> PreparedReference:
    """Load the teacher, select and mask the held-out text, and run the teacher over it once."""
    # these load torch (~2 s to import): --help and config errors come without it
    from evaluate.heldout import select_heldout
    from evaluate.scores import teacher_reference
    from evaluate.wordsim import word_similarity
    from kdlib.runtime.speed import torch_threads

    entries = entries or check_inputs(cfg)
    entry = entries[cfg.teacher]
    with torch_threads(cfg.threads):
        teacher = load(entry)
        heldout = outputs = words = None
        if cfg.heldout.enabled:
            h = cfg.heldout
            heldout = select_heldout(cfg.transfer_set, teacher.tokenizer, max_length=h.max_length,
                                     max_sequences=h.max_sequences, min_length=h.min_length, mask_prob=h.mask_prob,
                                     seed=h.seed)
            log(f"held-out: {len(heldout.input_ids)} sequences, {heldout.masked_positions} masked positions from "
                f"{len(heldout.article_ids)} documents after the transfer set's first {heldout.skipped_documents}")
            outputs = teacher_reference(teacher, heldout, h.batch_size)
        if cfg.word_similarity:
            words = word_similarity(teacher.encoder, teacher.tokenizer, cfg.word_batch_size)
    return PreparedReference(reference_key(cfg, entry), teacher, heldout, outputs, words)


def _heldout_scores(cfg: EvaluateConfig, loaded: LoadedModel, ref: PreparedReference, notes: dict) -> dict:
    # these load torch (~2 s to import): --help and config errors come without it
    from evaluate.heldout import same_tokens
    from evaluate.scores import compare, self_scores

    keys = ("masked_top1_agreement", "masked_kl", "pooled_cosine")
    if ref.heldout is None:
        return {k: math.nan for k in keys}
    if loaded is ref.teacher:
        if not loaded.entry.has_mlm_head:
            notes.update({k: "the teacher has no masked-LM head weights" for k in keys[:2]})
        return self_scores(ref.outputs)
    if not same_tokens(loaded.tokenizer, ref.heldout, ref.teacher.tokenizer):
        notes.update({k: "its tokenizer does not encode the held-out text as the teacher's does" for k in keys})
        return {k: math.nan for k in keys}
    teacher_entry, entry = ref.teacher.entry, loaded.entry
    masked_lm = entry.has_mlm_head and teacher_entry.has_mlm_head
    if not masked_lm:
        who = "the teacher has" if not teacher_entry.has_mlm_head else "the folder has"
        for k in keys[:2]:
            notes[k] = f"{who} no masked-LM head weights"
    if masked_lm and loaded.model.config.vocab_size != ref.teacher.model.config.vocab_size:
        masked_lm = False
        for k in keys[:2]:
            notes[k] = (f"vocabulary size {loaded.model.config.vocab_size} differs from the teacher's "
                        f"{ref.teacher.model.config.vocab_size}")
    cosine = entry.hidden_size == teacher_entry.hidden_size
    if not cosine:
        notes["pooled_cosine"] = (f"hidden size {entry.hidden_size} differs from the teacher's "
                                  f"{teacher_entry.hidden_size} (embeddings in different spaces)")
    return compare(loaded, ref.outputs, masked_lm=masked_lm, cosine=cosine)


def _speed_batches(cfg: EvaluateConfig, loaded: dict[str, LoadedModel]) -> list[dict]:
    import torch  # ~1.2 s to import: --help and config errors come without it

    s = cfg.speed
    vocab = min(len(m.tokenizer) for m in loaded.values())
    rng = np.random.default_rng(s.seed)
    return [{"input_ids": torch.from_numpy(rng.integers(0, vocab, (s.batch_size, s.length))).long(),
             "attention_mask": torch.ones((s.batch_size, s.length), dtype=torch.long)} for _ in range(s.batches)]


def evaluate_models(cfg: EvaluateConfig, *, reference: Optional[PreparedReference] = None,
                    source: str = "<config>") -> dict:
    """Score every model of `cfg` against its teacher; returns the evaluation.json content (nan = n/a)."""
    # these load torch (~1.2 s to import): --help and config errors come without it
    from kdlib.runtime.speed import compare_speed, count_parameters, torch_threads
    from evaluate.wordsim import DATASETS, word_similarity

    start = time.perf_counter()
    entries = check_inputs(cfg, source)
    if reference is None:
        reference = prepare_reference(cfg, entries)
    elif reference.key != reference_key(cfg, entries[cfg.teacher]):
        raise ValueError("reference: prepared for another teacher, transfer set or held-out settings than this "
                         "config; call prepare_reference(cfg) for it")
    loaded: dict[str, LoadedModel] = {}
    records: dict[str, dict] = {}
    with torch_threads(cfg.threads):
        bar = tqdm(list(entries), desc="evaluating", unit="model", disable=None if cfg.progress_bar else True)
        for name in bar:
            bar.set_postfix_str(name)
            model = reference.teacher if name == cfg.teacher else load(entries[name])
            if cfg.speed.enabled:  # kept for the side-by-side timing; otherwise freed model by model
                loaded[name] = model
            notes: dict[str, str] = {}
            words = (reference.word_similarity if model is reference.teacher
                     else word_similarity(model.encoder, model.tokenizer, cfg.word_batch_size)
                     if cfg.word_similarity else None)
            metrics = {f"{k}_spearman": (words[k]["spearman"] if words else math.nan) for k in DATASETS}
            metrics.update(_heldout_scores(cfg, model, reference, notes))
            metrics["parameters"] = count_parameters(model.encoder)
            metrics["sequences_per_s"] = math.nan
            records[name] = {**entries[name].describe(), "metrics": metrics, "speed": None, "notes": notes}
            log(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v == v))
    if cfg.speed.enabled:
        s = cfg.speed
        log(f"timing {len(loaded)} models side by side: batch {s.batch_size} x {s.length}, {s.threads} thread(s)")
        speeds = compare_speed({name: m.encoder for name, m in loaded.items()}, _speed_batches(cfg, loaded),
                               s.threads, warmup=s.warmup, repeats=s.repeats)
        for name, record in records.items():
            record["speed"] = speeds[name]
            record["metrics"]["sequences_per_s"] = speeds[name]["sequences_per_s"]
    switched_off = ([f"{k}_spearman" for k in DATASETS] if not cfg.word_similarity else []) + (
        ["masked_top1_agreement", "masked_kl", "pooled_cosine"] if not cfg.heldout.enabled else []) + (
        ["sequences_per_s"] if not cfg.speed.enabled else [])
    for record in records.values():
        record["notes"].update({key: "not measured (switched off in the config)" for key in switched_off})
    ordered = {cfg.teacher: records[cfg.teacher], **{k: v for k, v in records.items() if k != cfg.teacher}}
    relate(ordered, cfg.teacher)
    settings = {"heldout": reference.heldout.summary() | {"batch_size": cfg.heldout.batch_size}
                if reference.heldout is not None else None,
                "word_similarity": {k: {"file": f"gensim:{f}", "pairs": reference.word_similarity[k]["pairs"]}
                                    for k, f in DATASETS.items()} if reference.word_similarity else None,
                "pooling": POOLING, "speed": to_dict(cfg.speed) if cfg.speed.enabled else None,
                "threads": cfg.threads}
    return {"stage": STAGE, "teacher": cfg.teacher, "models": ordered, "settings": settings,
            "config": to_dict(cfg), "config_hash": config_hash(cfg), "claim": claim_of(cfg, entries),
            "wall_seconds": time.perf_counter() - start}


def claim_of(cfg: EvaluateConfig, entries: dict[str, ModelEntry]) -> str:
    """What an evaluation folder holds: the config (less where/how fast it ran) and every model's weights."""
    return config_hash({"config": content_hash(cfg, RUN_ONLY),
                        "fingerprints": {name: entry.fingerprint for name, entry in entries.items()}})


def _found_claim(output_dir: Path) -> Optional[str]:
    """The claim of an evaluation this stage wrote into output_dir, None when it holds none (or an unreadable one)."""
    try:
        found = read_stamp(output_dir, "evaluation.json", STAGE)
    except ValueError:
        return None
    return found.get("claim") if found else None


def run(cfg: EvaluateConfig, source: str = "<config>") -> Path:
    """The CLI: check inputs and output_dir, evaluate, write the three files; returns evaluation.md's path.

    An output_dir holding this stage's evaluation of the same config and weights is re-measured in place;
    one of another config or other weights is replaced only with overwrite: true; other files are never."""
    entries = check_inputs(cfg, source)
    output_dir = Path(cfg.output_dir)
    claim = claim_of(cfg, entries)
    check_output_folder(output_dir, stage=STAGE, found_claim=_found_claim(output_dir), claim=claim,
                        overwrite=cfg.overwrite,
                        difference="the config or a model's weights differ from the evaluation there")
    with output_lock(output_dir, STAGE):
        result = evaluate_models(cfg, source=source)
        save_resolved(cfg, output_dir)
        path = write_evaluation(result, output_dir)
    log(f"wrote {path} ({result['wall_seconds']:.1f} s)")
    print(path.read_text(encoding="utf-8").split("\n## ")[0], flush=True)
    return path
