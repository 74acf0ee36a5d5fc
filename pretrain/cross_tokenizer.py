"""Checks for a student with its own tokenizer (student.tokenizer), before any process group starts.

Cross-tokenizer distillation compares, after the same characters, the teacher's next-token distribution
with the student's (kdlib.training.cross_tokenizer), so it needs a causal teacher, a transfer set that
kept its text and character offsets, and a student tokenizer whose offsets can be aligned. Objectives may
read only what survives the change of vocabulary: the teacher's cached values at aligned positions
(`uld`) and the student's own next tokens (`next_token_ce`).
"""

from __future__ import annotations

from pathlib import Path

from kdlib.errors import KDError, fail_field
from kdlib.losses import get_spec
from kdlib.runtime.models import load_tokenizer, resolve_model_path
from kdlib.text.alignment import alignment_problem
from kdlib.training.cross_tokenizer import ALIGNED_KEYS

# inputs a cross-tokenizer objective may read; the teacher's values only through aligned_mask
_ALLOWED = frozenset({"student_logits", "topk_logits", "teacher_lse", "aligned_mask", "mask", "next_token_labels",
                      "step", "total_steps"})


def check_cross_tokenizer(cfg, source: str, manifest) -> Path:
    """The student tokenizer's folder, after every check; ConfigError naming the field and why otherwise."""
    def fail(field: str, message: str) -> None:
        fail_field(source, field, message)

    if cfg.teacher.task != "causal_lm":
        fail("student.tokenizer", "cross-tokenizer distillation compares next-token distributions after the same "
             f"characters, so it needs a causal_lm teacher, got {cfg.teacher.task!r}")
    if cfg.online_teacher:
        fail("online_teacher", "a student with its own tokenizer learns from the cached, aligned teacher outputs; "
             "the online teacher would read the student's token ids")
    if not manifest.cached.get("char_offsets"):
        fail("transfer_set", f"{cfg.transfer_set} keeps no text and character offsets, which aligning another "
             "tokenizer needs: build it with char_offsets: true")
    try:
        folder = resolve_model_path(cfg.student.tokenizer)
        tokenizer = load_tokenizer(str(folder), model_config={})
    except KDError as err:
        fail("student.tokenizer", str(err))
    problem = alignment_problem(tokenizer)
    if problem:
        fail("student.tokenizer", f"{folder} cannot be aligned with the teacher's tokens: {problem}")
    if tokenizer.eos_token_id is None:
        fail("student.tokenizer", f"{folder} has no eos token, which marks the document breaks of packed rows")
    for i, objective in enumerate(cfg.objectives):
        inputs = set(get_spec(objective.name).inputs())
        bad = sorted(inputs - _ALLOWED)
        if not bad and inputs & {"topk_logits", "teacher_lse"} and "aligned_mask" not in inputs:
            bad = ["mask"]  # the teacher's values sit only at aligned positions
        if bad:
            fail(f"objectives[{i}]", f"{objective.name} reads {bad}, which mean nothing to a student with its own "
                 "tokenizer (the teacher's token ids or positions); use uld (the teacher's distribution at aligned "
                 "spans) and next_token_ce (the student's own next tokens)")
    return folder


def aligned_offer(cached: frozenset) -> frozenset:
    """What a cross-tokenizer batch carries: the aligned teacher values, never the teacher's ids."""
    return frozenset((cached | {"aligned_mask"}) & ALIGNED_KEYS)
