"""The deployment table: one Markdown row per candidate, from a deploy_model record (deploy.json).

MB = 10^6 bytes. Speed-up = throughput / transformers fp32's throughput at the throughput batch, timed side
by side. Agreement is the record's quality_metric (predictions for classifiers, top-1 tokens for language
models, mean cosine for a bare encoder); accuracy only for classifiers with labels. n/a = not measured.
"""

from __future__ import annotations

import math

from kdlib.deploy.pipeline import CANDIDATES


def _number(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def row_cells(record: dict, name: str) -> list[str]:
    """The formatted cells of one candidate's row (the numbers deploy.md shows)."""
    c = record["candidates"][name]
    mb = c["size_bytes"] / 1e6 if c.get("size_bytes") is not None else None
    latency = c["latency_s"] * 1e3 if c.get("latency_s") is not None else None
    return [name, _number(mb, ".2f"), _number(latency, ".2f"), _number(c.get("throughput_seq_per_s"), ".1f"),
            _number(c.get("speedup"), ".2f") + ("x" if c.get("speedup") is not None else ""),
            _number(c.get("max_abs_diff"), ".2e"), _number(c.get("agreement"), ".4f"),
            _number(c.get("accuracy"), ".4f")]


def deployment_table(record: dict) -> str:
    """Markdown: rows the four candidates; size, latency, throughput, speed-up, max |Δ|, agreement, accuracy."""
    length = record["speed_length"]
    header = ["candidate", "size (MB)", f"latency batch {record['latency_batch']} (ms)",
              f"throughput batch {record['throughput_batch']} (seq/s)", "speed-up vs transformers fp32",
              "max \\|Δ\\| vs fp32", "agreement", "accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name in CANDIDATES:
        if name in record["candidates"]:
            lines.append("| " + " | ".join(row_cells(record, name)) + " |")
    lines.append("")
    lines.append(f"{record['threads']} thread(s), sequences of {length} tokens; agreement = "
                 f"{record['quality_metric']}.")
    return "\n".join(lines) + "\n"
