"""deploy.md and deploy.png from a deploy_model record (deploy.json); each written atomically.

deploy.md is the table (kdlib.deploy.deployment_table) and one sentence per column on how it was measured,
with the numbers (threads, batch, length, repeats) read from the record itself, so the text cannot drift
from what ran.
"""

from __future__ import annotations

from pathlib import Path

from kdlib.deploy import CANDIDATES, deployment_table
from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.plots import finish_bar_chart, pyplot


def how_measured(record: dict) -> list[str]:
    """One sentence per column."""
    r = record
    machine = r.get("machine") or {}
    threads = (f"{r['threads']} thread(s) for both runtimes (torch.set_num_threads; onnxruntime "
               f"intra_op_num_threads, inter-op 1, sequential) on a {machine.get('cpus', '?')}-CPU "
               f"{machine.get('processor') or 'machine'}")
    small, large = r["latency_batch"], r["throughput_batch"]
    return [
        f"- **size (MB)**: bytes on disk / 10^6: model.safetensors for transformers fp32, model.onnx and "
        f"model.int8.onnx for onnxruntime; torch dynamic int8: {r['sizes']['torch dynamic int8']}.",
        f"- **latency batch {small} (ms)**: best of {r['repeats']} passes (after {r['warmup']} warm-up) over "
        f"{max(1, large // small)} batch(es) of {small} x {r['speed_length']} tokens, per batch; {threads}.",
        f"- **throughput batch {large} (seq/s)**: sequences / best pass over batches of {large} x "
        f"{r['speed_length']} tokens, same threads; timed inputs: {r['speed_inputs']}. The candidates take turns "
        "repeat by repeat, so machine noise falls on all of them.",
        f"- **speed-up**: throughput at batch {large} / transformers fp32's, timed side by side.",
        f"- **max |Δ| vs fp32**: largest absolute difference of any {r['output']} value from transformers fp32 "
        f"over the {r['texts']} eval texts (max_length {r['max_length']}, float64).",
        f"- **agreement**: {r['quality_metric']}, over the same texts.",
        "- **accuracy**: " + ("against the eval file's labels." if r.get("labels") and r["task"] ==
                              "sequence_classification" else "n/a (no labels, or not a classifier)."),
    ]


def deploy_markdown(record: dict) -> str:
    r = record
    lines = [f"# Deployment of {r['model']}", "",
             f"{r['architecture']} ({r['task']}): inputs input_ids, attention_mask (int64, batch x sequence, "
             f"both axes dynamic), output {r['output']}. Files: model.onnx (fp32, opset {r['onnx']['opset']}), "
             f"model.int8.onnx ({r['onnx']['quantization']}), config.json and the tokenizer.", "",
             deployment_table(r), "## How each column was measured", "", *how_measured(r), "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".", ""]
    return "\n".join(lines)


def deploy_chart(record: dict, path: Path) -> Path:
    """Two panels: file size (MB) and throughput (seq/s) per candidate."""
    plt = pyplot()
    names = [n for n in CANDIDATES if n in record["candidates"]]
    colors = [f"C{i}" for i in range(len(names))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [record["candidates"][n]["size_bytes"] / 1e6 for n in names]
    speeds = [record["candidates"][n]["throughput_seq_per_s"] for n in names]
    ticks = [n.replace(" ", "\n", 1) for n in names]
    left.bar_label(left.bar(range(len(names)), sizes, color=colors), fmt="%.1f", fontsize=8)
    left.set_xticks(range(len(names)), ticks, fontsize=8)
    left.set_ylabel("size (MB)")
    left.set_title("file size")
    left.grid(axis="y", alpha=0.3)
    for i, n in enumerate(names):
        right.bar_label(right.bar(i, speeds[i], color=colors[i], label=n), fmt="%.1f", fontsize=8)
    right.set_xticks(range(len(names)), ticks, fontsize=8)
    right.set_ylim(0, max(speeds) * 1.4)  # room for the legend above the bars
    return finish_bar_chart(fig, right, path, ylabel="sequences / s",
                            title=f"throughput, batch {record['throughput_batch']} x {record['speed_length']}, "
                                  f"{record['threads']} thread(s)")


def write_report(record: dict, output_dir: Path) -> Path:
    """deploy.md and deploy.png into output_dir; returns deploy.md's path."""
    output_dir = Path(output_dir)
    deploy_chart(record, output_dir / "deploy.png")
    path = output_dir / "deploy.md"
    atomic_write_text(path, deploy_markdown(record))
    return path
