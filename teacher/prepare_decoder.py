"""Train a small decoder (causal LM) teacher from scratch on a local corpus, for decoder distillation offline.

No decoder weights can be downloaded here and no package ships one, so the decoder examples need a teacher
made on this machine: a tokenizer (byte-level BPE or WordPiece) trained on the corpus, the corpus packed
GPT-style (each document followed by eos, cut every max_length tokens), and a GPT-2 or Llama trained for a
fixed number of AdamW steps. Held-out next-token perplexity (the last `eval_rows` packed rows, never trained
on) is measured before and after. Optionally, more tokenizers are trained on the same corpus for students
with their own vocabulary (cross-tokenizer distillation), each saved as a plain tokenizer folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from kdlib.config import check_optimizer_fields, config_hash, content_hash, to_dict
from kdlib.errors import KDError
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.io import atomic_directory, atomic_write_text
from kdlib.runtime.models import quiet_transformers
from kdlib.runtime.outputs import check_output_folder, output_lock, read_stamp, save_resolved
from kdlib.text.packing import pack_documents
from kdlib.text.readers import CorpusConfig, normalize_text
from kdlib.runtime.jsonl import json_document
from teacher.corpus import corpus_documents
from teacher.training import optimise, warmup_cosine
from teacher.tokenizer_training import check_vocab, save_tokenizer, special_tokens, train_tokenizer


@dataclass
class TokenizerSpec:
    """One more tokenizer trained on the prep's corpus, saved as a plain folder for a cross-tokenizer student."""

    kind: Literal["bpe", "wordpiece"]  # byte-level BPE (GPT-2 style) or lower-casing WordPiece (BERT style)
    vocab_size: int  # most entries, special tokens included (fewer when the corpus runs out of merges)
    output_dir: str  # the tokenizer folder (AutoTokenizer loads it; a student config's `student.tokenizer`)

    def __post_init__(self) -> None:
        check_vocab(self.kind, self.vocab_size)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir: expected a non-empty folder path, got {self.output_dir!r}")


@dataclass
class DecoderPrepConfig:
    """Train a tokenizer and a GPT-2 / Llama decoder from scratch and save an AutoModelForCausalLM folder."""

    output_dir: str  # where the complete decoder teacher folder (weights, config, tokenizer, report) is written
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(kind="wikipedia_xml"))  # training text
    tokenizer: Literal["bpe", "wordpiece"] = "bpe"  # the teacher's tokenizer kind, trained on the corpus
    vocab_size: int = 8192  # most tokenizer entries (the model's vocabulary is what training gives)
    family: Literal["gpt2", "llama"] = "gpt2"  # GPT-2 (tied embeddings) or Llama (RoPE, RMSNorm, heads // 2 KV heads)
    layers: int = 4  # transformer blocks
    hidden: int = 256  # model width
    heads: int = 4  # attention heads (a divisor of hidden)
    intermediate: int = 1024  # feed-forward width
    max_length: int = 128  # tokens per packed row, and the model's position limit
    steps: int = 320  # AdamW optimizer steps (~4 minutes on 2 CPU cores at the defaults; under one pass of the sample)
    batch_size: int = 16  # packed rows per step
    learning_rate: float = 2e-3  # peak AdamW learning rate (linear warmup, then cosine decay to 0)
    warmup_steps: int = 30  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    eval_rows: int = 64  # the last packed rows of the corpus, held out for perplexity (never trained on)
    seed: int = 0  # initialisation and batch-order seed
    threads: int = 0  # torch CPU threads (0: torch's default)
    overwrite: bool = False  # replace output folders this stage wrote from another config (never someone else's)
    student_tokenizers: list[TokenizerSpec] = field(default_factory=list)  # tokenizers for cross-tokenizer students

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir: expected a non-empty folder path, got {self.output_dir!r}")
        check_vocab(self.tokenizer, self.vocab_size)
        for name in ("layers", "hidden", "heads", "intermediate", "steps", "batch_size", "eval_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        if self.hidden % self.heads:
            raise ValueError(f"heads: expected a divisor of hidden ({self.hidden}), got {self.heads}")
        if self.family == "llama":
            if self.heads % kv_heads(self.heads):
                raise ValueError(f"heads: a llama uses heads // 2 key-value heads, which must divide heads: expected "
                                 f"1, 3 or an even number, got {self.heads}")
            if (self.hidden // self.heads) % 2:
                raise ValueError(f"heads: a llama's head width hidden / heads must be even (rotary embeddings), got "
                                 f"{self.hidden} / {self.heads} = {self.hidden // self.heads}")
        if self.max_length < 8:
            raise ValueError(f"max_length: expected at least 8, got {self.max_length}")
        check_optimizer_fields(self, "learning_rate", "warmup_steps", "weight_decay")
        if self.threads < 0:
            raise ValueError(f"threads: expected >= 0, got {self.threads}")
        seen = {_abs(self.output_dir): "output_dir"}
        for i, spec in enumerate(self.student_tokenizers):
            path = _abs(spec.output_dir)
            for other, name in seen.items():
                if path == other or path.startswith(other + os.sep) or other.startswith(path + os.sep):
                    raise ValueError(f"student_tokenizers[{i}].output_dir: expected a folder apart from {name} "
                                     f"({other}), got {spec.output_dir!r}")
            seen[path] = f"student_tokenizers[{i}].output_dir"


def _abs(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def kv_heads(heads: int) -> int:
    """Key-value heads of a Llama here: half the query heads (grouped-query attention), at least one."""
    return max(1, heads // 2)


def decoder_config(family: str, tokenizer, *, layers: int, hidden: int, heads: int, intermediate: int,
                   max_positions: int, dropout: Optional[float] = None):
    """(transformers config, model class) of a GPT-2 or Llama sized as given, over `tokenizer`'s vocabulary.

    `dropout` None keeps the library's defaults (tests/tiny_models.py); the prepared teacher uses 0."""
    # transformers' model classes: ~3.6 s to import; config validation (DecoderPrepConfig) runs without them
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        drop = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_positions, n_embd=hidden, n_layer=layers,
                            n_head=heads, n_inner=intermediate, **ids, **drop)
        return config, GPT2LMHeadModel
    if family == "llama":
        drop = {} if dropout is None else dict(attention_dropout=dropout)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads(heads),
                             max_position_embeddings=max_positions, tie_word_embeddings=False, **ids, **drop)
        return config, LlamaForCausalLM
    raise ValueError(f"family: expected gpt2 or llama, got {family!r}")


def initial_model(cfg: DecoderPrepConfig, tokenizer):
    """The untrained decoder: seeded, so `before` perplexity can be recomputed from the config alone."""
    config, cls = decoder_config(cfg.family, tokenizer, layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                                 intermediate=cfg.intermediate, max_positions=cfg.max_length, dropout=0.0)
    torch.manual_seed(cfg.seed)
    return cls(config)


# ---------------------------------------------------------------- corpus


def read_texts(corpus: CorpusConfig, source: str = "<config>") -> tuple[list[str], list[str]]:
    """(documents, lines): each document normalised whole (what is packed, as the data pipeline reads it),
    and its non-empty lines normalised (what tokenizers are trained on). Read whole before anything is written,
    so a bad line anywhere is refused (naming corpus.path, the file and the line) with nothing changed."""
    documents, lines = [], []
    for doc in corpus_documents(corpus, source):
        documents.append(normalize_text(doc.text))
        lines.extend(normalize_text(line) for line in doc.text.split("\n") if line.strip())
    return documents, lines


def pack_rows(documents: list[str], tokenizer, max_length: int) -> torch.Tensor:
    """[rows, max_length] ids: the documents' tokens, each document followed by eos, cut every max_length
    tokens (kdlib.text.packing's causal layout); the short tail is dropped, so no row pads."""
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    packed = pack_documents(((ids, [True] * len(ids)) for ids in encoded), max_length=max_length,
                            min_length=max_length, cls_id=None, sep_id=tokenizer.eos_token_id)
    rows = [r.input_ids for r in packed]
    return torch.from_numpy(np.stack(rows)).long() if rows else torch.zeros((0, max_length), dtype=torch.long)


def rows_digest(rows: torch.Tensor) -> str:
    """sha256 of the rows' int32 ids: names the held-out rows in the report."""
    return hashlib.sha256(rows.numpy().astype("<i4").tobytes()).hexdigest()


def next_token_metrics(model, rows: torch.Tensor, batch_size: int = 16) -> dict:
    """Perplexity and top-1 accuracy of next-token prediction over every position but each row's last."""
    nll, hits, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids = rows[start:start + batch_size]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     reduction="sum").item()
            hits += (logits.argmax(-1) == targets).sum().item()
            count += targets.numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "next_token_accuracy": hits / count, "tokens": count}


def _batches(n: int, size: int, gen: torch.Generator):
    """Row indices, `size` at a time, each pass over the rows in a fresh seeded order."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            yield perm[start:start + size]


# ---------------------------------------------------------------- the stage


STAGE = "python -m teacher.decoder"
REPORT = "decoder_report.json"  # not the masked-LM stage's teacher_report.json: neither claims the other's folder
TOKENIZER_REPORT = "tokenizer_report.json"
NON_CONTENT_FIELDS = ("output_dir", "overwrite", "threads", "student_tokenizers")  # never change the teacher


def teacher_hash(cfg: DecoderPrepConfig) -> str:
    return content_hash(cfg, NON_CONTENT_FIELDS)


def tokenizer_hash(corpus: CorpusConfig, spec: TokenizerSpec) -> str:
    """What a student tokenizer folder is made from: the corpus, the kind and the size (not where it goes)."""
    return config_hash({"corpus": to_dict(corpus), "kind": spec.kind, "vocab_size": spec.vocab_size})


def _found_claim(folder: Path, report: str) -> Optional[str]:
    """The config hash recorded in a folder this stage wrote, None for a folder it did not write."""
    if not folder.is_dir():
        return None
    try:
        found = read_stamp(folder, report, STAGE)
    except ValueError:
        return "unreadable report"
    return None if found is None else found.get("config_hash") or "unknown"


def prepare_decoder(cfg: DecoderPrepConfig, source: str = "<config>") -> dict:
    """Train what is missing (student tokenizers, the teacher) and return the teacher's report."""
    out = Path(cfg.output_dir)
    targets = [(out, teacher_hash(cfg), REPORT, "output_dir")]
    targets += [(Path(s.output_dir), tokenizer_hash(cfg.corpus, s), TOKENIZER_REPORT,
                 f"student_tokenizers[{i}].output_dir") for i, s in enumerate(cfg.student_tokenizers)]
    with ExitStack() as stack:
        for folder, *_ in targets:
            stack.enter_context(output_lock(folder, STAGE))
        states = [check_output_folder(folder, stage=STAGE, found_claim=_found_claim(folder, report), claim=claim,
                                      overwrite=cfg.overwrite, where=where)
                  for folder, claim, report, where in targets]
        if all(state == "same" for state in states):
            print(f"{out}: already prepared with this config (hash {teacher_hash(cfg)[:12]}); nothing to do")
            return json_document(out / REPORT)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        quiet_transformers()
        t0 = time.time()
        documents, lines = read_texts(cfg.corpus, source)
        print(f"corpus: {len(documents)} documents, {len(lines)} lines, {sum(map(len, documents)):,} characters "
              f"in {time.time() - t0:.1f}s")
        for spec, (folder, claim, _, _), state in zip(cfg.student_tokenizers, targets[1:], states[1:]):
            if state != "same":
                save_student_tokenizer(spec, folder, lines, claim, cfg.corpus, replace=state == "replace")
        if states[0] == "same":
            print(f"{out}: already prepared with this config (hash {teacher_hash(cfg)[:12]})")
            return json_document(out / REPORT)
        return _prepare(cfg, documents, lines, replace=states[0] == "replace")


def save_student_tokenizer(spec: TokenizerSpec, folder: Path, lines: list[str], claim: str, corpus: CorpusConfig,
                           replace: bool) -> None:
    t0 = time.time()
    trained = train_tokenizer(lines, spec.kind, spec.vocab_size)
    with atomic_directory(folder, replace=replace) as tmp:
        tokenizer = save_tokenizer(tmp, trained, spec.kind)
        report = {"stage": STAGE, "config_hash": claim, "kind": spec.kind, "vocab_size": spec.vocab_size,
                  "entries": len(tokenizer), "corpus": to_dict(corpus),
                  "tokenizer_fingerprint": tokenizer_fingerprint(tmp)}
        atomic_write_text(tmp / TOKENIZER_REPORT, json.dumps(report, indent=2))
    print(f"saved {spec.kind} student tokenizer ({len(tokenizer)} entries) to {folder} in {time.time() - t0:.1f}s")


def _prepare(cfg: DecoderPrepConfig, documents: list[str], lines: list[str], replace: bool) -> dict:
    t0 = time.time()
    tokenizer = teacher_tokenizer(cfg, lines)
    rows = pack_rows(documents, tokenizer, cfg.max_length)
    if len(rows) < cfg.eval_rows + cfg.batch_size:
        raise KDError(f"corpus {to_dict(cfg.corpus)} gives only {len(rows)} rows of {cfg.max_length} tokens; "
                      f"eval_rows ({cfg.eval_rows}) must leave at least batch_size ({cfg.batch_size}) to train on: "
                      f"use a larger corpus or lower eval_rows / batch_size / max_length")
    train_rows, held_out = rows[:-cfg.eval_rows], rows[-cfg.eval_rows:]
    print(f"tokenizer: {cfg.tokenizer}, {len(tokenizer)} entries; corpus: {len(rows)} rows of {cfg.max_length} tokens "
          f"({len(train_rows)} train, the last {len(held_out)} held out) in {time.time() - t0:.1f}s")

    model = initial_model(cfg, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    before = next_token_metrics(model, held_out)
    print(f"before: held-out perplexity {before['perplexity']:.1f}, next-token accuracy "
          f"{before['next_token_accuracy']:.2%} ({before['tokens']} positions; {parameters / 1e6:.2f}M parameters)")

    losses = train_decoder(model, train_rows, cfg)
    after = next_token_metrics(model, held_out)
    print(f"after:  held-out perplexity {after['perplexity']:.1f}, next-token accuracy "
          f"{after['next_token_accuracy']:.2%}")
    report = {"stage": STAGE, "before": before, "after": after, "steps": cfg.steps,
              "train_loss_first20": float(np.mean(losses[:20])), "train_loss_last20": float(np.mean(losses[-20:])),
              "family": cfg.family, "parameters": parameters,
              "vocab_size": len(tokenizer), "rows": {"train": len(train_rows), "held_out": len(held_out)},
              "held_out": {"rows": [len(train_rows), len(rows)], "sha256": rows_digest(held_out)},
              "tokens_seen": cfg.steps * cfg.batch_size * cfg.max_length, "config_hash": teacher_hash(cfg),
              "seconds": round(time.time() - t0, 1)}
    save_teacher(model, tokenizer, Path(cfg.output_dir), cfg, report, replace)
    return report


def teacher_tokenizer(cfg: DecoderPrepConfig, lines: list[str]):
    """The teacher's tokenizer, trained on the corpus lines, as a transformers tokenizer (saved with the model)."""
    from transformers import PreTrainedTokenizerFast  # ~1.2 s to import: see decoder_config

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(lines, cfg.tokenizer, cfg.vocab_size),
                                   **special_tokens(cfg.tokenizer))


def train_decoder(model, rows: torch.Tensor, cfg: DecoderPrepConfig) -> list[float]:
    """`cfg.steps` AdamW steps of next-token cross-entropy on seeded batches of rows; returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    batches = _batches(len(rows), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        ids = rows[next(batches)]
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

    losses = optimise(loss_at, optimizer, schedule, cfg.steps, desc="training decoder", clip=model.parameters())
    model.eval()
    return losses


def save_teacher(model, tokenizer, out: Path, cfg: DecoderPrepConfig, report: dict, replace: bool) -> None:
    """Write the folder under a temporary name, then rename: a killed run leaves no half folder."""
    with atomic_directory(out, replace=replace) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        report.update(teacher_fingerprint=model_fingerprint(tmp), tokenizer_fingerprint=tokenizer_fingerprint(tmp))
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=2))
        save_resolved(cfg, tmp)
        atomic_write_text(tmp / "README.md", _model_card(cfg, report))
    print(f"saved decoder teacher to {out} (fingerprint {report['teacher_fingerprint'][:12]})")


def _model_card(cfg: DecoderPrepConfig, report: dict) -> str:
    b, a = report["before"], report["after"]
    return (
        "# Decoder teacher\n\n"
        f"A {cfg.family} causal LM ({cfg.layers} layers, width {cfg.hidden}, {cfg.heads} heads, "
        f"{report['parameters'] / 1e6:.2f}M parameters) with a {cfg.tokenizer} tokenizer of {report['vocab_size']} "
        f"entries, both trained from scratch by `{STAGE}` on `{to_dict(cfg.corpus)}`: {cfg.steps} AdamW steps of "
        f"{cfg.batch_size} packed rows of {cfg.max_length} tokens (seed {cfg.seed}).\n\n"
        f"Held-out next-token prediction (the last {report['rows']['held_out']} packed rows, never trained on):\n\n"
        "| | perplexity | top-1 accuracy |\n|---|---|---|\n"
        f"| initialisation | {b['perplexity']:.1f} | {b['next_token_accuracy']:.2%} |\n"
        f"| trained | {a['perplexity']:.1f} | {a['next_token_accuracy']:.2%} |\n\n"
        "Loads offline with `AutoModelForCausalLM.from_pretrained(folder)` and "
        "`AutoTokenizer.from_pretrained(folder)`.\n"
    )
