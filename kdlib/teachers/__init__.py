"""What a teacher gives: its outputs on a batch, and several teachers combined.

Here: a frozen teacher's forward turned into cache rows (outputs), several teachers' transfer sets combined
into one target per example (multi_teacher), and `python -m kdlib.teachers.inspect` (a teacher and a corpus
in numbers). A new teacher kind (what it outputs, how its targets are combined) goes here.
Not here: loading and fingerprinting a model folder (kdlib.runtime), preparing a teacher (the `teacher`
stage), storing its outputs (kdlib.cache).
"""
