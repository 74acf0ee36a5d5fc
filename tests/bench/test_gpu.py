"""`python -m bench.gpu`: its arguments, dry run and refusals on any machine, its FLOPs / MFU arithmetic against
hand computations, and (on a CUDA machine only) the whole check's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from bench.gpu import __main__ as gpu_main
from bench.gpu.plan import (PARTS, STUDENTS, VOCAB, bert_mlm_parameters, mfu, model_flops, peak_tflops, row,
                            table)
from kdlib.runtime.speed import count_parameters
from tests.paths import REPO_ROOT

ENV = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"HF_HUB_OFFLINE": "1",
                                                                         "TRANSFORMERS_OFFLINE": "1"}
NO_GPU = ENV | {"CUDA_VISIBLE_DEVICES": ""}  # the no-device answer, on a GPU machine too

# BertForMaskedLM's parameters by hand: embeddings (vocabulary + 512 positions + 2 types) x H + LayerNorm 2H;
# per layer Q, K, V, output 4(H^2 + H) + LayerNorm 2H + H x F + F + F x H + H + LayerNorm 2H;
# head: transform H^2 + H + LayerNorm 2H + decoder bias V (its weight is the word embeddings)
SMALL = (30522 + 514) * 384 + 768 + 6 * (4 * (384 * 384 + 384) + 768 + 384 * 1536 + 1536 + 1536 * 384 + 384 + 768) \
    + 384 * 384 + 384 + 768 + 30522
BASE = (30522 + 514) * 768 + 1536 + 12 * (4 * (768 * 768 + 768) + 1536 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 1536) \
    + 768 * 768 + 768 + 1536 + 30522


def run(*args: str, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_names_the_command_typed_with_the_shared_layout():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench.gpu [-h] [--only PARTS]")
    description = proc.stdout.split("\n\n")[1]
    assert "\n" not in description and description.startswith("the one-command GPU check")
    for flag in ("--only", "--batch", "--seconds", "--warmup", "--peak-tflops", "--out", "--force", "--dry-run"):
        assert flag in proc.stdout


def test_dry_run_lists_every_part_and_both_students_without_a_gpu():
    proc = run("--dry-run", "--batch", "16", env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for i, part in enumerate(("pretrain", "chunked", "zero2", "online"), 1):
        assert f"\n{i}. {part}: {PARTS[part]}\n" in out
    assert f"student 6x384: 6 layers, hidden 384, 12 heads, intermediate 1536: {SMALL:,} parameters" in out
    assert f"student 12x768: 12 layers, hidden 768, 12 heads, intermediate 3072: {BASE:,} parameters" in out
    assert f"parameters; {(6 * SMALL * 2048 + 12 * 6 * 128 * 384 * 2048) / 1e12:.3f} TFLOP per step" in out  # 16 x 128
    assert f"parameters; {(6 * BASE * 2048 + 12 * 12 * 128 * 768 * 2048) / 1e12:.3f} TFLOP per step" in out
    assert "131,072" in out and "--nproc_per_node <GPUs found> -m bench.gpu.zero --batch 16" in out
    assert "python -m bench.gpu --only online --batch 16 --seconds 20 --warmup 3" in out
    only = run("--dry-run", "--only", "zero2").stdout
    assert "1. zero2:" in only and "pretrain" not in only


def test_dry_run_loads_no_torch():
    code = ("import sys; from bench.gpu.__main__ import main; rc = main(['--dry-run']); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.splitlines()[-1] == "0 False", proc.stderr


def test_unknown_parts_are_one_error_line_naming_them():
    proc = run("--only", "pretrain,nope,zz,nope", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --only: unknown part(s) nope, zz; known: pretrain, chunked, zero2, "
                                        "online"]
    assert proc.stdout == ""


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--seconds", "0"), ("--warmup", "-1"),
                                        ("--peak-tflops", "-5")])
def test_out_of_range_numbers_are_one_error_line(flag, value):
    proc = run(flag, value, "--dry-run")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"error: {flag}: expected ")


def test_no_cuda_device_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results.json"
    proc = run("--out", str(out), env=NO_GPU)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device: "), proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_an_existing_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "results.json"
    out.write_text("earlier results")
    proc = run("--out", str(out), env=NO_GPU)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: --out {out}: the file exists; pass --force to overwrite it, or name "
                                        "another file"]
    assert out.read_text() == "earlier results"
    forced = run("--out", str(out), "--force", env=NO_GPU)  # --force gets past it, to the device check
    assert forced.returncode == 2 and forced.stderr.startswith("error: no CUDA device: ")


def test_parameter_count_matches_a_hand_count_and_the_model():
    # 2 layers, hidden 8, intermediate 12, vocabulary 50, 16 positions, 2 types:
    # embeddings 50*8 + 16*8 + 2*8 + 16 = 560; layer 4*(64+8) + 16 + (96+12) + (96+8) + 16 = 532; head 72 + 16 + 50
    assert bert_mlm_parameters(2, 8, 12, 50, positions=16) == 560 + 2 * 532 + 138
    tiny = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=12, max_position_embeddings=16))
    assert count_parameters(tiny) == 1762
    sizes = {name: bert_mlm_parameters(s.layers, s.hidden, s.ffn, VOCAB) for name, s in STUDENTS.items()}
    assert sizes == {"6x384": SMALL, "12x768": BASE} == {"6x384": 22_744_506, "12x768": 109_514_298}


def test_flops_and_mfu_against_hand_computation():
    # 1,000 parameters, 2 layers, sequence 4, hidden 8, 12 tokens: 6*1000*12 + 12*2*4*8*12 = 72,000 + 9,216
    assert model_flops(1000, 2, 4, 8, 12) == 81_216
    assert model_flops(1000, 2, 4, 8, 12, backward=False) == 2 * 1000 * 12 + 4 * 2 * 4 * 8 * 12 == 27_072
    assert mfu(1e12, 10.0, 100.0) == pytest.approx(1.0)  # 1e12 FLOP in 10 ms = 100 TFLOP/s
    assert mfu(1e12, 10.0, 100.0, gpus=4) == pytest.approx(0.25)
    assert mfu(1e12, 10.0, None) is None
    # the 12x768 student at batch 32 x 128 on an H100 SXM, a step of 20 ms
    flops = 6 * BASE * 4096 + 12 * 12 * 128 * 768 * 4096
    r = row("pretrain", "x", 20.0, 4096, flops=model_flops(BASE, 12, 128, 768, 4096), peak=989.0)
    assert r["flops_per_step"] == flops and r["tokens_per_s"] == pytest.approx(4096 / 0.020)
    assert r["mfu"] == pytest.approx(flops / 0.020 / 989e12)


def test_peak_table_picks_the_most_specific_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == ("H100", 989.0)
    assert peak_tflops("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert peak_tflops("NVIDIA H200") == ("H200", 989.0)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert peak_tflops("NVIDIA L40S") == ("L40S", 362.0)
    assert peak_tflops("NVIDIA L4") == ("L4", 121.0)
    assert peak_tflops("Tesla T4") is None


def test_table_marks_missing_figures():
    text = table([row("chunked", "fp32 kd", 12.5, 4096, peak_mib=2048.0)])
    assert text.splitlines()[-1] == "| chunked | fp32 kd | 12.50 | 327,680 | - | 2,048 | - |"


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    """The command's loop on a pretend device, parts stubbed: a failure is printed and recorded, exit 1.
    512 tokens in 10 ms = 51,200 tokens/s; 1e12 FLOP in 10 ms over 989 TFLOP/s = 10.1% MFU."""
    ran = []

    def fake_part(name, settings, device):
        ran.append(name)
        if name == "chunked":
            raise RuntimeError("CUDA out of memory (pretend)")
        return {"rows": [row(name, f"{name} step", 10.0, settings.batch * 128, flops=1e12, peak=settings.peak_tflops)],
                "notes": [f"{name} note"]}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu_main, "run_part", fake_part)
    out = tmp_path / "r.json"
    assert gpu_main.main(["--batch", "4", "--seconds", "1", "--out", str(out)]) == 1
    assert ran == ["pretrain", "chunked", "zero2", "online"]
    printed = capsys.readouterr()
    assert "[bench.gpu 2/4] chunked: FAILED: RuntimeError: CUDA out of memory (pretend)" in printed.out
    assert "Traceback" in printed.err and "| online | online step | 10.00 | 51,200 | 10.1% |" in printed.out
    report = json.loads(out.read_text())
    assert report["failed"] == ["chunked"] and report["device"] == "NVIDIA H100 80GB HBM3"
    assert report["peak_tflops"] == 989.0 and report["peak_source"] == "table: H100"
    assert report["parts"]["chunked"]["error"] == "RuntimeError: CUDA out of memory (pretend)"
    assert [report["parts"][p]["ok"] for p in PARTS] == [True, False, True, True]
    assert report["parts"]["zero2"]["rows"][0]["mfu"] == pytest.approx(1e12 / 0.010 / 989e12)
    assert gpu_main.main(["--only", "online", "--out", str(out), "--force", "--peak-tflops", "500"]) == 0
    assert json.loads(out.read_text())["parts"].keys() == {"online"}
    assert "peak: 500 TFLOP/s per GPU (--peak-tflops)" in capsys.readouterr().out


@pytest.mark.slow  # starts DeepSpeed (part zero2) on the GPUs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_whole_check_on_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--seconds", "2", "--out", str(out)], cwd=REPO_ROOT,
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == torch.cuda.get_device_name(0) and report["gpus"] == torch.cuda.device_count()
    assert report["torch"] == torch.__version__ and report["deepspeed"] and report["date"]
    assert report["failed"] == [] and all(report["parts"][p]["ok"] for p in PARTS)
    pretrain = report["parts"]["pretrain"]["rows"]
    assert [r["student"] for r in pretrain] == ["6x384", "12x768"]
    assert [r["parameters"] for r in pretrain] == [SMALL, BASE]
    for r, s in zip(pretrain, STUDENTS.values()):
        assert r["flops_per_step"] == 6 * r["parameters"] * 4096 + 12 * s.layers * 128 * s.hidden * 4096
        assert r["tokens_per_s"] == pytest.approx(4096 / (r["ms"] / 1000)) and r["tokens_per_s"] > 0
        if report["peak_tflops"]:
            assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["ms"] / 1000) / (report["peak_tflops"] * 1e12))
            assert 0 < r["mfu"] < 1
    chunked = {(r["precision"], r["variant"]): r for r in report["parts"]["chunked"]["rows"]}
    assert len(chunked) == 8 and all(r["peak_mib"] > 0 for r in chunked.values())
    for precision in ("fp32", "bf16"):  # dense (4096, 131072) logits against 256-position chunks
        assert chunked[precision, "kd"]["step_mib"] > 2 * chunked[precision, "chunked256"]["step_mib"]
    zero = report["parts"]["zero2"]
    assert zero["world_size"] == torch.cuda.device_count() and zero["rows"][0]["tokens_per_s"] > 0
    online = {r["variant"]: r for r in report["parts"]["online"]["rows"]}
    assert set(online) == {"cached_step", "online_step", "teacher_forward"}
    assert online["online_step"]["ms"] > online["cached_step"]["ms"]
