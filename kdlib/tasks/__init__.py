"""Labelled tasks: reading them, scoring them, and mixing several in one run.

Here: task-set readers (readers: CSV, TSV, JSONL, fastText, analogy, and kind `datasets`: any table
kdlib.text.readers.datasets_table reads; package_files: `package:` paths; table and
dedupe_split: a CSV read whole, de-duplicated and split by a hash of its normalised text), task metrics and their
summaries (metrics), and which task each step trains on (sampling). A new task format or metric goes here.
Not here: corpus text without labels (kdlib.text).
"""
