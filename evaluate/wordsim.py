"""Word similarity: SimLex-999 and WordSim-353 (the copies in gensim's test data), Spearman's rho.

Each word is embedded alone: `tokenizer(word)` with the model's special tokens ([CLS] word [SEP]), the
encoder's last hidden state averaged over the word's own tokens (special tokens left out, so [CLS]/[SEP],
which every word shares, do not pull all words together). A pair scores the cosine of its two words; rho
is scipy's spearmanr of those cosines against the human means. The vocabulary (about 1,400 words for both
sets) is embedded once, in batches of similar length, so a model takes well under a second.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdlib.errors import ReaderError
from kdlib.text.readers import gensim_test_data

DATASETS = {"simlex999": "simlex999.txt", "wordsim353": "wordsim353.tsv"}  # name -> file in gensim's test data


def read_pairs(name: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(word pairs, human scores float64) of one data set; `#` lines are comments, columns tab-separated."""
    path = gensim_test_data(DATASETS[name])
    pairs, scores = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            pairs.append((parts[0].strip(), parts[1].strip()))
            scores.append(float(parts[2]))
        except (IndexError, ValueError):
            raise ReaderError(f"{path}:{number}: expected 'word<TAB>word<TAB>score', got {line[:100]!r}") from None
    if not pairs:
        raise ReaderError(f"{path}: holds no word pairs")
    return pairs, np.asarray(scores, dtype=np.float64)


@torch.inference_mode()
def embed_words(encoder, tokenizer, words: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """word -> float64 vector: the last hidden state averaged over the word's non-special tokens."""
    order = sorted(set(words), key=lambda w: (len(tokenizer.tokenize(w)), w))
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = tokenizer(chunk, padding=True, return_special_tokens_mask=True, return_tensors="pt")
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        keep = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).unsqueeze(-1).double()
        vectors = (hidden.double() * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, H)
        out.update(zip(chunk, vectors.numpy()))
    return out


def cosines(vectors: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> np.ndarray:
    a = np.stack([vectors[x] for x, _ in pairs])
    b = np.stack([vectors[y] for _, y in pairs])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def word_similarity(encoder, tokenizer, batch_size: int) -> dict[str, dict]:
    """{data set: {"spearman", "pairs"}} for one model (spearman nan when undefined, e.g. constant cosines)."""
    from scipy.stats import spearmanr  # ~1.4 s to import: an evaluation without word similarity never pays it

    data = {name: read_pairs(name) for name in DATASETS}
    words = [w for pairs, _ in data.values() for pair in pairs for w in pair]
    vectors = embed_words(encoder, tokenizer, words, batch_size)
    result = {}
    for name, (pairs, human) in data.items():
        sims = cosines(vectors, pairs)
        rho = float(spearmanr(sims, human).statistic) if np.all(np.isfinite(sims)) else math.nan
        result[name] = {"spearman": rho, "pairs": len(pairs)}
    return result
