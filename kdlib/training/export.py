"""The trained student's weights out of a DistillModule's state: `student.*` only, so learned
projections and a mutual-learning peer (training-only) never reach an export."""

from __future__ import annotations

STUDENT_PREFIX = "student."


def student_state_dict(full: dict) -> dict:
    """Keys of the student (prefix removed), fp32 and contiguous; everything else dropped."""
    return {k[len(STUDENT_PREFIX):]: v.float().contiguous() for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
