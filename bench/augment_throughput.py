"""Throughput of augment_batch (fast path) vs serial_augment (reference) on the same real sentences.

    python -m bench.augment_throughput [--sentences 2000] [--copies 4] [--batch-size 512] [--profile]

Corpus: gensim's lee_background.cor (one news document per line), split into sentences. Both
paths run in this one process on the same input and their outputs are checked to be identical.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import time

from kdlib.text.augment import AugmentConfig, PosVocabulary, augment_batch, default_tagger, serial_augment

_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def lee_sentences(limit: int) -> tuple[list[str], list[str]]:
    """(documents, first `limit` sentences) of gensim's Lee background corpus."""
    import gensim  # ~1.2 s to import, only to find its test corpus: --help runs without it

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    with open(path, encoding="utf-8") as f:
        docs = [line.strip() for line in f if line.strip()]
    sents = [s.strip() for d in docs for s in _SENT_END.split(d) if s.strip()]
    return docs, sents[:limit]


def run_batched(examples, cfg, vocab, tagger, batch_size):
    out = []
    for at in range(0, len(examples), batch_size):
        out.extend(augment_batch(examples[at : at + batch_size], cfg, vocab, tagger))
    return out


def best_of(repeats, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def profile(label, fn, top=12):
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"\n--- cProfile: {label} (by own time) ---")
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.augment_throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print cProfile tables of both paths")
    args = ap.parse_args(argv)

    docs, sents = lee_sentences(args.sentences)
    tagger = default_tagger()
    t0 = time.perf_counter()
    vocab = PosVocabulary.build(docs, tagger, min_count=2)
    build_s = time.perf_counter() - t0
    cfg = AugmentConfig(copies=args.copies, seed=13, mask_prob=0.1, pos_swap_prob=0.1, ngram_prob=0.25)
    examples = list(enumerate(sents))
    n_words = sum(len(s.split()) for s in sents)
    run_batched(examples[:64], cfg, vocab, tagger, args.batch_size)  # warm-up (lexicon, caches)

    batch_s, batch_out = best_of(args.repeats, lambda: run_batched(examples, cfg, vocab, tagger, args.batch_size))
    serial_s, serial_out = best_of(args.repeats, lambda: serial_augment(examples, cfg, vocab, tagger))
    identical = batch_out == serial_out

    n = len(examples)
    print(f"corpus: {n} sentences of lee_background.cor (~{n_words / n:.1f} whitespace words each), "
          f"copies={cfg.copies} (+ original) -> {len(batch_out)} texts; vocab built in {build_s:.2f}s "
          f"({sum(len(v) for v in vocab.entries.values())} words, {len(vocab.entries)} tags)")
    print(f"best of {args.repeats} runs, batch size {args.batch_size}\n")
    print(f"{'path':<16}{'seconds':>10}{'examples/s':>14}{'texts/s':>12}")
    for name, secs in (("augment_batch", batch_s), ("serial_augment", serial_s)):
        print(f"{name:<16}{secs:>10.3f}{n / secs:>14.0f}{len(batch_out) / secs:>12.0f}")
    print(f"\nspeed-up batch/serial: {serial_s / batch_s:.1f}x (target >= 10x)")
    print(f"outputs identical: {identical}")
    if args.profile:
        profile("augment_batch", lambda: run_batched(examples, cfg, vocab, tagger, args.batch_size))
        profile("serial_augment", lambda: serial_augment(examples, cfg, vocab, tagger))
    if not identical:
        raise SystemExit("batch and serial outputs differ")


if __name__ == "__main__":
    main()
