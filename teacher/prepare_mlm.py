"""Give a bare encoder a masked-LM head, so that it can serve as a vocabulary-distribution teacher.

The demo teacher (all-MiniLM-L6-v2) ships without `cls.predictions.*`. We train the standard BERT
prediction head (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + bias) over the
frozen encoder. Because the encoder is frozen it runs under no_grad, and the head runs only at the
masked positions (~15% of tokens), which keeps a CPU run to minutes.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdlib.config import check_optimizer_fields, content_hash, to_dict
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.errors import ConfigError, KDError
from kdlib.runtime.io import atomic_directory, atomic_write_text
from kdlib.text.masking import MaskingConfig, MaskTokens, mask_tokens, word_starts
from kdlib.runtime.models import (ModelConfig, check_model_folder, copy_tokenizer_files, load_model, load_tokenizer,
                          resolve_model_path)
from kdlib.runtime.outputs import check_output_folder, output_lock, read_stamp, save_resolved
from kdlib.text.packing import pack_documents
from kdlib.text.readers import CorpusConfig, normalize_text
from kdlib.schemas import check_against_teacher
from kdlib.runtime.jsonl import json_document
from teacher.corpus import check_corpus, corpus_documents
from teacher.training import optimise, warmup_cosine


@dataclass
class TeacherPrepConfig:
    """Train a masked-LM head over a frozen encoder and save a BertForMaskedLM folder."""

    encoder: str  # the bare encoder: a folder or package:<module>
    output_dir: str  # where the complete masked-LM teacher folder is written
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(kind="wikipedia_xml"))  # training text
    max_length: int = 128  # tokens per training sequence (documents are packed)
    mask_prob: float = 0.15  # fraction of tokens selected for prediction (BERT: 80% [MASK], 10% random, 10% kept)
    batch_size: int = 32  # sequences per encoder forward (features are extracted once)
    positions_per_step: int = 1024  # masked positions per optimizer step of the head
    steps: int = 300  # optimizer steps
    learning_rate: float = 2e-3  # AdamW learning rate of the head
    warmup_steps: int = 20  # linear warmup before cosine decay
    eval_sequences: int = 64  # held-out sequences for accuracy / perplexity (never trained on)
    max_sequences: int = 1500  # cap on packed sequences taken from the corpus
    seed: int = 0  # masking and shuffling seed
    threads: int = 0  # torch CPU threads (0: torch's default)
    overwrite: bool = False  # replace an output_dir this stage wrote from another config (never someone else's)

    def __post_init__(self) -> None:
        positive = {"max_length": self.max_length, "batch_size": self.batch_size, "steps": self.steps,
                    "eval_sequences": self.eval_sequences, "max_sequences": self.max_sequences,
                    "positions_per_step": self.positions_per_step}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob: expected a probability in (0, 1), got {self.mask_prob}")
        check_optimizer_fields(self, "learning_rate", "warmup_steps")
        for name in ("seed", "threads"):  # numpy's seeds and torch's thread counts are >= 0
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.max_length < 8:
            raise ValueError(f"max_length: expected at least 8, got {self.max_length}")
        if self.eval_sequences >= self.max_sequences:
            raise ValueError(f"eval_sequences: expected fewer than max_sequences ({self.max_sequences}), got {self.eval_sequences}")


def pack_corpus(cfg: TeacherPrepConfig, tokenizer, source: str = "<config>") -> torch.Tensor:
    """Tokenize documents and pack them into full [CLS] ... [SEP] ... [SEP] rows of max_length."""

    def documents():
        for doc in corpus_documents(cfg.corpus, source):
            enc = tokenizer(normalize_text(doc.text), add_special_tokens=False)
            yield enc["input_ids"], word_starts(enc.word_ids())

    packed = pack_documents(documents(), max_length=cfg.max_length, min_length=cfg.max_length,
                            cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    rows = [r.input_ids for r in itertools.islice(packed, cfg.max_sequences)]
    if len(rows) <= cfg.eval_sequences:
        raise KDError(f"corpus {to_dict(cfg.corpus)} gives only {len(rows)} sequences of {cfg.max_length} tokens; "
                      f"eval_sequences ({cfg.eval_sequences}) must leave some to train on: use a larger corpus or "
                      f"lower eval_sequences / max_length")
    return torch.from_numpy(np.stack(rows)).long()


def extract_features(model, rows: torch.Tensor, tokenizer, prob: float, seed: int, batch_size: int, desc: str):
    """Run the frozen encoder once: hidden states at the masked positions and their true ids.

    The encoder never changes, so one pass with a fixed mask gives the head all the training
    signal it needs; re-running the encoder every step would cost ~5x more for the same head.
    Masking is token-level BERT 80/10/10 (not whole-word), drawn row by row from one seeded generator.
    """
    rng = np.random.default_rng(seed)
    masking, tokens = MaskingConfig(prob=prob, whole_word=False), MaskTokens.from_tokenizer(tokenizer)
    features, targets = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=None):
            masked, positions, labels = zip(*(mask_tokens(row, rng, masking, tokens)
                                              for row in rows[start:start + batch_size].numpy()))
            ids = torch.from_numpy(np.stack(masked)).long()
            hidden = model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            which = torch.from_numpy(np.repeat(np.arange(len(positions)), [len(p) for p in positions]))
            features.append(hidden[which, torch.from_numpy(np.concatenate(positions)).long()].clone())
            targets.append(torch.from_numpy(np.concatenate(labels)).long())
    return torch.cat(features), torch.cat(targets)


def head_metrics(model, features: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> dict:
    """Masked-token accuracy and perplexity of the head on extracted features."""
    total_loss, hits = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(targets), chunk):
            logits = model.cls(features[start:start + chunk])
            t = targets[start:start + chunk]
            total_loss += torch.nn.functional.cross_entropy(logits, t, reduction="sum").item()
            hits += (logits.argmax(-1) == t).sum().item()
    n = max(len(targets), 1)
    return {"masked_accuracy": hits / n, "perplexity": math.exp(total_loss / n), "positions": len(targets)}


def build_masked_lm(cfg: TeacherPrepConfig):
    """BertForMaskedLM with the encoder's weights, a fresh tied head, and only the head trainable."""
    model = load_model(ModelConfig(path=cfg.encoder, task="masked_lm"), allow_new_head=True)
    model.tie_weights()
    for p in model.bert.parameters():
        p.requires_grad_(False)
    head = [p for n, p in model.cls.named_parameters() if p.requires_grad and "decoder.weight" not in n]
    return model, head


STAGE = "python -m teacher"
REPORT = "teacher_report.json"
NON_CONTENT_FIELDS = ("output_dir", "overwrite", "threads")  # where and how fast, never what is trained


def teacher_hash(cfg: TeacherPrepConfig) -> str:
    return content_hash(cfg, NON_CONTENT_FIELDS)


def _found_claim(out: Path, cfg: TeacherPrepConfig) -> Optional[str]:
    """The config hash of a teacher folder this stage wrote (its report), None for any other folder. Folders
    written before `overwrite` existed recorded the hash of every field; the same config still matches."""
    try:
        report = read_stamp(out, REPORT)
    except ValueError:
        return "unreadable report"
    if report is None:
        return None
    found = report.get("config_hash") or "unknown"
    return teacher_hash(cfg) if found == content_hash(cfg, ("overwrite",)) else found


def check_inputs(cfg: TeacherPrepConfig, source: str = "<config>") -> None:
    """The encoder folder and its tokenizer loadable, max_length within its positions, the corpus readable:
    checked before any work, each error naming its field."""
    try:
        folder = resolve_model_path(cfg.encoder)
        encoder_config = check_model_folder(folder)
        load_tokenizer(str(folder), encoder_config)
    except KDError as err:
        raise ConfigError(f"{source}: field 'encoder': {err}") from None
    check_against_teacher(source, encoder_config, max_length=cfg.max_length)
    check_corpus(cfg.corpus, source)


def prepare_teacher(cfg: TeacherPrepConfig, source: str = "<config>") -> dict:
    """Train the head, report before/after quality, save a complete masked-LM folder."""
    check_inputs(cfg, source)
    out = Path(cfg.output_dir)
    with output_lock(out, STAGE):
        state = check_output_folder(out, stage=STAGE, found_claim=_found_claim(out, cfg) if out.is_dir() else None,
                                    claim=teacher_hash(cfg), overwrite=cfg.overwrite)
        if state == "same":
            print(f"{out}: already prepared with this config (hash {teacher_hash(cfg)[:12]}); nothing to do")
            return json_document(out / REPORT)
        return _prepare(cfg, source, replace=state == "replace")


def _prepare(cfg: TeacherPrepConfig, source: str, replace: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    encoder = resolve_model_path(cfg.encoder)
    tokenizer = load_tokenizer(cfg.encoder)
    model, head_params = build_masked_lm(cfg)

    t0 = time.time()
    rows = pack_corpus(cfg, tokenizer, source)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    eval_ids, train_ids = rows[perm[: cfg.eval_sequences]], rows[perm[cfg.eval_sequences:]]
    print(f"corpus: {len(rows)} sequences of {cfg.max_length} tokens ({len(train_ids)} train, "
          f"{len(eval_ids)} held out) in {time.time() - t0:.1f}s")

    eval_x, eval_y = extract_features(model, eval_ids, tokenizer, cfg.mask_prob, cfg.seed + 1_000_003,
                                      cfg.batch_size, "encoding held-out")
    train_x, train_y = extract_features(model, train_ids, tokenizer, cfg.mask_prob, cfg.seed, cfg.batch_size,
                                        "encoding training")
    before = head_metrics(model, eval_x, eval_y)
    print(f"before: held-out masked accuracy {before['masked_accuracy']:.2%}, perplexity {before['perplexity']:.1f} "
          f"({before['positions']} positions; {len(train_y)} training positions)")

    optimizer = torch.optim.AdamW(head_params, lr=cfg.learning_rate, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.cls.train()

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(train_y), (cfg.positions_per_step,), generator=gen)
        return torch.nn.functional.cross_entropy(model.cls(train_x[idx]), train_y[idx])

    losses = optimise(loss_at, optimizer, schedule, cfg.steps, desc="training MLM head")
    model.eval()

    after = head_metrics(model, eval_x, eval_y)
    print(f"after:  held-out masked accuracy {after['masked_accuracy']:.2%}, perplexity {after['perplexity']:.1f}")
    report = {"before": before, "after": after, "steps": cfg.steps, "train_loss_last20": float(np.mean(losses[-20:])),
              "train_loss": [round(x, 5) for x in losses],  # per step: the report's loss curve
              "encoder": cfg.encoder, "encoder_fingerprint": model_fingerprint(encoder),
              "config_hash": teacher_hash(cfg), "seconds": round(time.time() - t0, 1)}
    save_teacher(model, encoder, Path(cfg.output_dir), cfg, report, replace)
    return report


def save_teacher(model, source: Path, out: Path, cfg: TeacherPrepConfig, report: dict, replace: bool) -> None:
    """Write the folder under a temporary name, then rename: a killed run leaves no half folder."""
    model.config.architectures = ["BertForMaskedLM"]
    with atomic_directory(out, replace=replace) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(source, tmp)
        report = dict(report, teacher_fingerprint=model_fingerprint(tmp), tokenizer_fingerprint=tokenizer_fingerprint(tmp))
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=2))
        save_resolved(cfg, tmp)
        atomic_write_text(tmp / "README.md", _model_card(cfg, report))
    print(f"saved masked-LM teacher to {out} (fingerprint {report['teacher_fingerprint'][:12]})")


def _model_card(cfg: TeacherPrepConfig, report: dict) -> str:
    return (
        "# Masked-LM teacher\n\n"
        f"Encoder `{cfg.encoder}` (fingerprint `{report['encoder_fingerprint'][:12]}`), frozen, with a BERT "
        f"masked-LM head trained for {cfg.steps} steps on `{to_dict(cfg.corpus)}`.\n\n"
        f"| | masked accuracy | perplexity |\n|---|---|---|\n"
        f"| untrained head | {report['before']['masked_accuracy']:.2%} | {report['before']['perplexity']:.1f} |\n"
        f"| trained head | {report['after']['masked_accuracy']:.2%} | {report['after']['perplexity']:.1f} |\n"
    )
