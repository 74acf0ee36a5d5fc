"""Labelled tasks: reading them, scoring them, and mixing several in one run.

Here: task-set readers (readers: CSV, TSV, JSONL, fastText, analogy), task metrics and their summaries
(metrics), and which task each step trains on (sampling). A new task format or metric goes here.
Not here: corpus text without labels (kdlib.text).
"""
