"""What `python -m bench.gpu` runs (parts, model sizes, settings) and its FLOPs / MFU arithmetic.

Torch-free, so that --help, --dry-run and argument errors answer at once, and the arithmetic is tested on a CPU.
MFU = model FLOPs per step / step time / (GPUs x the device's peak dense bf16 FLOP/s), with the usual estimate
6 x parameters x tokens + 12 x layers x sequence x hidden x tokens for a forward + backward (Kaplan et al. 2020's
6N per token, plus attention's QK^T and AV products); a forward alone is a third of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SEQ = 128  # tokens per row, every position real (no padding: the FLOPs count every position)
VOCAB = 30522  # BERT's WordPiece vocabulary (parts pretrain, zero2, online)
BIG_VOCAB = 131072  # the 128k vocabulary of part chunked
TOP_K = 32  # cached teacher logits per position
CHUNK = 256  # positions per chunk of the chunked output losses (EngineConfig.logit_chunk_size's default)


@dataclass(frozen=True)
class Student:
    layers: int
    hidden: int
    heads: int
    ffn: int  # intermediate size

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, {self.heads} heads, intermediate {self.ffn}: "
                f"{bert_mlm_parameters(self.layers, self.hidden, self.ffn, VOCAB):,} parameters")


STUDENTS = {"6x384": Student(6, 384, 12, 1536), "12x768": Student(12, 768, 12, 3072)}
TEACHER = "12x768"  # the online teacher of part online (a BERT-base shape)
ONLINE_STUDENT = "6x384"  # the student of parts online and chunked (its width)
ZERO_STUDENT = "12x768"  # the student of part zero2: the larger, where gradient traffic matters

PARTS = {  # name -> one line: what it measures
    "pretrain": "bf16 KD step (student forward + backward + AdamW, top-k KD on cached targets): tokens/s and MFU "
                "for each student",
    "chunked": "the output layer of a KD step at a 131,072 vocabulary, chunked against dense: ms and peak memory",
    "zero2": "DeepSpeed ZeRO-2 bf16 KD step over NCCL on every GPU (torchrun): global tokens/s and MFU",
    "online": "the KD step with a 12x768 teacher run inside it (no cache) against the cached-target step: tokens/s "
              "and peak memory",
}

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per GPU from NVIDIA's datasheets; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
)
FORMULA = ("MFU = (6 x parameters x tokens + 12 x layers x sequence x hidden x tokens) per step / step time / "
           "(GPUs x peak dense bf16 FLOP/s); parameters = every weight (the tied embedding / output projection once)")


@dataclass(frozen=True)
class Settings:
    batch: int  # rows of SEQ tokens per step (per GPU in zero2)
    seconds: float  # timed seconds per part, shared by its measurements
    warmup: int  # untimed steps of each variant before timing
    peak_tflops: Optional[float]  # one GPU's peak dense bf16 TFLOP/s (None: unknown device, no MFU)
    gpus: int = 1  # GPUs present (part zero2 runs on all of them)


def peak_tflops(device_name: str) -> Optional[tuple[str, float]]:
    """(table name, TFLOP/s) of the first PEAK_BF16_TFLOPS entry the device's name contains, else None."""
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return name, tflops
    return None


def bert_mlm_parameters(layers: int, hidden: int, ffn: int, vocab: int, positions: int = 512, types: int = 2) -> int:
    """Parameters of transformers' BertForMaskedLM (no pooler; decoder tied to the word embeddings)."""
    embeddings = (vocab + positions + types) * hidden + 2 * hidden  # word, position, type + LayerNorm
    layer = (4 * hidden * hidden + 4 * hidden  # Q, K, V, attention output
             + 2 * hidden  # attention LayerNorm
             + hidden * ffn + ffn + ffn * hidden + hidden  # intermediate, output
             + 2 * hidden)  # output LayerNorm
    head = hidden * hidden + hidden + 2 * hidden + vocab  # transform dense + LayerNorm, decoder bias
    return embeddings + layers * layer + head


def model_flops(parameters: int, layers: int, seq: int, hidden: int, tokens: int, backward: bool = True) -> float:
    """FLOPs of one step over `tokens` tokens: 6 N T + 12 L S H T with backward, a third of it without."""
    forward = 2 * parameters * tokens + 4 * layers * seq * hidden * tokens
    return float(3 * forward if backward else forward)


def mfu(flops_per_step: float, ms_per_step: float, peak: Optional[float], gpus: int = 1) -> Optional[float]:
    """Achieved FLOP/s over `gpus` x `peak` TFLOP/s; None without a peak."""
    if not peak or ms_per_step <= 0:
        return None
    return flops_per_step / (ms_per_step / 1000) / (gpus * peak * 1e12)


def row(part: str, measurement: str, ms: float, tokens: int, *, flops: Optional[float] = None,
        peak: Optional[float] = None, gpus: int = 1, peak_mib: Optional[float] = None,
        step_mib: Optional[float] = None, **extra) -> dict:
    """One line of the results table (and of the JSON): ms per step, tokens/s, MFU, memory."""
    return {"part": part, "measurement": measurement, "ms": ms, "tokens": tokens,
            "tokens_per_s": tokens / (ms / 1000) if ms > 0 else None, "flops_per_step": flops,
            "mfu": mfu(flops, ms, peak, gpus) if flops else None, "peak_mib": peak_mib, "step_mib": step_mib, **extra}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table; '-' where a figure does not apply."""
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| part | measurement | ms/step | tokens/s | MFU | peak MiB | step MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['measurement']} | {fmt(r['ms'], ',.2f')} | {fmt(r['tokens_per_s'], ',.0f')} "
                     f"| {fmt(r['mfu'], '.1%')} | {fmt(r['peak_mib'], ',.0f')} | {fmt(r['step_mib'], ',.0f')} |")
    return "\n".join(lines)


def plan_lines(parts: list[str], settings: Settings, out: str, zero_command: str) -> list[str]:
    """The dry run's description of each selected part: sizes, FLOPs per step, the command that runs it alone."""
    tokens = settings.batch * SEQ
    flags = f"--batch {settings.batch} --seconds {settings.seconds:g} --warmup {settings.warmup}"
    peaks = ", ".join(f"{name} {tflops:g}" for name, tflops in PEAK_BF16_TFLOPS)
    lines = [f"settings: batch {settings.batch} x {SEQ} tokens per step ({tokens:,} tokens; per GPU in zero2), "
             f"{settings.seconds:g} s timed per part after {settings.warmup} warm-up step(s) of each variant; "
             f"results to {out}",
             FORMULA,
             f"peak dense bf16 TFLOP/s by device name: {peaks}"
             + (f" (overridden: --peak-tflops {settings.peak_tflops:g})" if settings.peak_tflops else
                " (--peak-tflops overrides)"), ""]
    for i, part in enumerate(parts, 1):
        lines.append(f"{i}. {part}: {PARTS[part]}")
        if part == "pretrain":
            for name, s in STUDENTS.items():
                flops = model_flops(bert_mlm_parameters(s.layers, s.hidden, s.ffn, VOCAB), s.layers, SEQ, s.hidden,
                                    tokens)
                lines.append(f"   student {name}: {s.describe()}; {flops / 1e12:.3f} TFLOP per step")
            lines.append(f"   vocabulary {VOCAB:,}, kd_topk (rest bucket, top-{TOP_K}) through DistillModule, chunked "
                         f"logits ({CHUNK} positions), torch.autocast bf16 over fp32 weights, torch AdamW")
        elif part == "chunked":
            lines.append(f"   {tokens:,} positions x hidden {STUDENTS[ONLINE_STUDENT].hidden} -> {BIG_VOCAB:,} "
                         "logits, bench.kd_chunked's inputs and steps (plain, kd, chunked256, chunked1024), fp32 "
                         "and bf16 autocast; memory = torch.cuda.max_memory_allocated")
        elif part == "zero2":
            lines.append(f"   student {ZERO_STUDENT}: {STUDENTS[ZERO_STUDENT].describe()}; DeepSpeed ZeRO stage 2, "
                         "bf16, NCCL, world size = GPUs found (1 GPU: world size 1, said in the result)")
            lines.append(f"   $ {zero_command}")
        elif part == "online":
            lines.append(f"   student {ONLINE_STUDENT} ({STUDENTS[ONLINE_STUDENT].describe()}), teacher {TEACHER} "
                         f"({STUDENTS[TEACHER].describe()}) in bf16 under no_grad; online kd_kl on its logits vs "
                         "cached kd_topk, and the teacher's forward alone")
        if part != "zero2":
            lines.append(f"   alone: python -m bench.gpu --only {part} {flags}")
    return lines
