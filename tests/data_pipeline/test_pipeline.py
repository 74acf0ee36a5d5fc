"""The Beam pipeline, run as a user runs it (`python -m data_pipeline`), with real multi-process workers.

Values, not "it ran": cached top-k equals the teacher's own top-k on the stored ids, masking rates
are within binomial tolerance, 1 and 2 workers give identical rows, a SIGKILL then rerun gives
identical rows, and bad inputs are clear errors.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kdlib.cache import TransferSet, read_manifest
from kdlib.errors import CacheError
from kdlib.runtime.fingerprints import model_fingerprint
from kdlib.runtime.io import sha256_file
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.runtime.outputs import process_start_time
from tests.tiny_models import make_tiny_bert
from tests.paths import REPO_ROOT
from tests.pipeline_fixture import (TWO_WORKERS, assert_same_shards, corpus_config,  # noqa: F401 (other modules import them here)
                                    run_pipeline, table)

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

ROOT = REPO_ROOT


def test_cached_topk_and_hidden_states_equal_the_teachers_own_outputs(reference, teacher):
    ts = TransferSet(reference, teacher_fingerprint=model_fingerprint(teacher))
    model = load_model(ModelConfig(path=str(teacher), task="masked_lm"))
    checked = 0
    for index in range(0, len(ts), max(1, len(ts) // 40)):
        row = ts.row(index)
        ids = torch.tensor(np.asarray(row["input_ids"], dtype=np.int64))[None]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        logits = out.logits[0]
        top = torch.topk(logits, 8, dim=-1)
        stored_ids = torch.tensor(row["topk_ids"].astype(np.int64)).view(-1, 8)
        stored_logits = torch.tensor(row["topk_logits"].astype(np.float32)).view(-1, 8)
        assert torch.equal(stored_ids, top.indices)
        assert torch.allclose(stored_logits, top.values, atol=2e-3, rtol=1e-3)  # fp16 storage
        assert torch.allclose(torch.tensor(row["lse"]), torch.logsumexp(logits, -1), atol=1e-4)
        hidden = torch.tensor(row["hidden_2"].astype(np.float32)).view(ids.shape[1], -1)
        assert torch.allclose(hidden, out.hidden_states[2][0], atol=5e-3, rtol=1e-3)
        assert torch.allclose(torch.tensor(row["pooled"]), out.hidden_states[-1][0].mean(0), atol=1e-5)
        checked += 1
    assert checked >= 20
    assert row["topk_ids"].dtype == np.uint16  # the narrowest type that holds a 504-token vocabulary


def test_manifest_records_fingerprints_counts_hashes_and_fidelity(reference, teacher):
    m = read_manifest(reference)
    assert m.teacher_fingerprint == model_fingerprint(teacher)
    assert m.cached["top_k"] == 8 and m.cached["hidden_layers"] == [2] and m.cached["mlm"] is True
    assert m.dtypes["topk_ids"] == "uint16[]" and m.dtypes["topk_logits"] == "halffloat[]" and m.dtypes["lse"] == "float[]"
    assert m.max_length == 64 and len(m.shards) == 3
    for shard in m.shards:
        assert sha256_file(reference / shard.file) == shard.sha256
        assert pq.read_metadata(reference / shard.file).num_rows == shard.rows
    rows = sum(s.rows for s in m.shards)
    assert m.totals["rows"] == rows > 500
    tokens = sum(len(r) for t in table(reference).values() for r in t.column("input_ids").to_pylist())
    assert m.totals["tokens"] == tokens
    assert 0 < m.fidelity["mean_kept_mass"] < 1 and m.fidelity["mean_kl"] >= 0 and m.fidelity["positions"] > 100
    augmentations = {a for t in table(reference).values() for a in t.column("augmentation").to_pylist()}
    assert augmentations == {"original", "copy1"}
    ids = [i for t in table(reference).values() for i in t.column("id").to_pylist()]
    assert len(set(ids)) == len(ids)
    for t in table(reference).values():
        shard_ids = t.column("id").to_pylist()
        assert shard_ids == sorted(shard_ids)  # rows sorted by id within a shard
    assert (reference / "resolved_config.yaml").is_file() and not (reference / "build.json").exists()


def test_mlm_masking_rates_are_within_binomial_tolerance(reference, teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    selected = eligible = masked = kept = 0
    for t in table(reference).values():
        for ids, pos, labels in zip(t.column("input_ids").to_pylist(), t.column("mlm_positions").to_pylist(),
                                    t.column("mlm_labels").to_pylist()):
            ids = np.asarray(ids)
            eligible += int((~np.isin(ids, tok.all_special_ids)).sum()) + int((ids[pos] == tok.mask_token_id).sum())
            selected += len(pos)
            masked += int((ids[pos] == tok.mask_token_id).sum())
            kept += int((ids[pos] == np.asarray(labels)).sum())
            assert not set(labels) & set(tok.all_special_ids)
    rate = selected / eligible
    sigma = np.sqrt(0.15 * 0.85 / eligible) * 3  # whole-word selection inflates variance ~3x per token
    assert abs(rate - 0.15) < 4 * sigma, (rate, eligible)
    assert abs(masked / selected - 0.8) < 4 * np.sqrt(0.8 * 0.2 / selected) * 2
    assert abs(kept / selected - 0.1) < 4 * np.sqrt(0.1 * 0.9 / selected) * 2 + 0.01


def test_one_worker_gives_the_same_rows_as_two(work, teacher, reference):
    out = work / "one-worker"
    run_pipeline(work, corpus_config(teacher, out), ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"])
    assert_same_shards(reference, out)


def kill_after_first_shard(work: Path, cfg: dict, build_dir: Path) -> None:
    """Run the pipeline and SIGKILL it (all its processes) right after the first shard lands in build_dir."""
    path = work / f"killed-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", "--config", str(path), *TWO_WORKERS], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300

    def shards_done() -> int:
        return len(list((build_dir / "shards").glob("*.json"))) if (build_dir / "shards").is_dir() else 0

    while time.time() < deadline and proc.poll() is None and shards_done() == 0:
        time.sleep(0.1)  # kill right after the first shard completes, while others are mid-flight
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (build_dir / "manifest.json").exists(), "the kill came too late to test an interrupted build"


def test_sigkill_mid_run_then_rerun_gives_identical_rows(work, teacher, reference):
    out = work / "killed"
    cfg = corpus_config(teacher, out)
    kill_after_first_shard(work, cfg, out)
    with pytest.raises(CacheError, match="no manifest.json"):
        TransferSet(out)
    run_pipeline(work, cfg)
    assert_same_shards(reference, out)


def test_rerun_skips_complete_shards_and_rebuilds_a_missing_one(work, teacher, reference):
    out = work / "resume"
    shutil.copytree(reference, out)
    cfg = corpus_config(teacher, out)
    m = read_manifest(out)
    (out / m.shards[1].file).unlink()
    before = {s.name: (out / s.file).stat().st_mtime_ns for s in m.shards if s.name != m.shards[1].name}
    run_pipeline(work, cfg)
    after = read_manifest(out)
    assert [s.sha256 for s in after.shards] == [s.sha256 for s in m.shards]
    assert all((out / f"shards/{n}.parquet").stat().st_mtime_ns == t for n, t in before.items())


def test_a_directory_built_by_another_teacher_is_refused_naming_both(work, teacher, reference):
    other = make_tiny_bert(work / "other-teacher", task="masked_lm", layers=2, hidden=32, heads=4, seed=1)
    out = work / "claimed"
    out.mkdir()
    shutil.copy2(reference / "manifest.json", out / "manifest.json")
    proc = run_pipeline(work, corpus_config(other, out), check=False)
    assert proc.returncode == 2
    assert model_fingerprint(teacher) in proc.stderr and model_fingerprint(other) in proc.stderr
    with pytest.raises(Exception, match=model_fingerprint(other)):
        TransferSet(reference, teacher_fingerprint=model_fingerprint(other))


def test_a_corrupted_shard_is_reported_by_name(work, reference):
    copy = work / "corrupted"
    shutil.copytree(reference, copy)
    shard = read_manifest(copy).shards[2]
    with open(copy / shard.file, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CacheError, match=f"{shard.name}.parquet: shard is corrupted"):
        TransferSet(copy)


def test_empty_corpus_and_bad_configs_are_clear_errors(work, teacher):
    empty = work / "empty.txt"
    empty.write_text("\n\n")
    cfg = corpus_config(teacher, work / "never", corpus={"kind": "text", "path": str(empty)})
    proc = run_pipeline(work, cfg, check=False)
    assert proc.returncode == 2 and "empty.txt" in proc.stderr and "empty" in proc.stderr
    proc = run_pipeline(work, corpus_config(teacher, work / "never", teacher_outputs={"top_k": 9999}), check=False)
    assert proc.returncode == 2 and "field 'teacher_outputs.top_k'" in proc.stderr and "504" in proc.stderr
    proc = run_pipeline(work, corpus_config(teacher, work / "never", num_shardz=3), check=False)
    assert proc.returncode == 2 and "field 'num_shardz': unknown field" in proc.stderr
    assert not (work / "never").exists()


def test_task_set_with_classifier_teacher_caches_dense_logits_and_labels(work):
    clf = make_tiny_bert(work / "classifier", task="sequence_classification", layers=2, hidden=32, heads=4)
    out = work / "task"
    cfg = {
        "teacher": {"path": str(clf), "task": "sequence_classification"},
        "output_dir": str(out),
        "task": {"kind": "fasttext", "path": "gensim:pang_lee_polarity.cor", "encoding": "cp1252"},
        "max_length": 48,
        "augment": {"copies": 2, "mask_prob": 0.1, "pos_swap_prob": 0.1, "ngram_prob": 0.25, "seed": 1},
        "teacher_outputs": {"dense_logits": True},
        "num_shards": 2, "batch_size": 16, "torch_threads": 1,
    }
    run_pipeline(work, cfg)
    m = read_manifest(out)
    assert m.cached["labels"] == ["neg", "pos"] and m.totals["rows"] == 200 * 3
    model = load_model(ModelConfig(path=str(clf), task="sequence_classification"))
    ts = TransferSet(out)
    originals = 0
    for i in range(len(ts)):
        row = ts.row(i)
        assert len(row["input_ids"]) <= 48 and row["label"] in (0, 1)
        originals += row["augmentation"] == "original"
        if i % 10 == 0:
            ids = torch.tensor(np.asarray(row["input_ids"], dtype=np.int64))[None]
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            assert torch.allclose(torch.tensor(row["logits"]), logits, atol=1e-5)
    assert originals == 200
    assert json.loads((out / "manifest.json").read_text())["config"]["augment"]["copies"] == 2


def test_a_same_config_rerun_of_a_complete_set_changes_nothing(work, teacher, reference):
    out = work / "complete"
    shutil.copytree(reference, out)
    before = {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    proc = run_pipeline(work, corpus_config(teacher, out))
    assert "already complete with this config" in proc.stdout
    after = {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before  # not rewritten, not even the manifest: it was never unreadable


def test_a_folder_that_is_not_a_transfer_set_is_refused_untouched(work, teacher):
    precious = work / "precious"
    (precious / "notes").mkdir(parents=True)
    (precious / "notes" / "thesis.tex").write_text("years of work")
    (precious / ".tmp-draft").write_text("a file a careless cleanup would delete")
    before = {str(p): sha256_file(p) for p in precious.rglob("*") if p.is_file()}
    for overwrite in (False, True):
        proc = run_pipeline(work, corpus_config(teacher, precious, overwrite=overwrite), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "did not write (.tmp-draft, notes/)" in proc.stderr
        assert {str(p): sha256_file(p) for p in precious.rglob("*") if p.is_file()} == before


def test_a_second_writer_and_an_impossible_max_length_are_refused(work, teacher):
    import socket

    out = work / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(holder.pid)
        (work / ".lock-locked").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                       "start": start, "stage": "python -m data_pipeline",
                                                       "since": "earlier"}))
        proc = run_pipeline(work, corpus_config(teacher, out), check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and f"in use by python -m data_pipeline (pid {holder.pid}" in proc.stderr
    assert list(out.iterdir()) == []  # nothing written
    proc = run_pipeline(work, corpus_config(teacher, work / "never", max_length=4096), check=False)
    assert proc.returncode == 2 and "field 'max_length'" in proc.stderr and "4096" in proc.stderr
    assert not (work / "never").exists()


def test_an_error_in_the_middle_of_a_corpus_is_one_line_naming_file_and_line(work, teacher):
    corpus = work / "mostly-good.txt"
    lines = [f"Line {i} of a corpus whose first lines are fine, about rivers and hills.".encode() for i in range(200)]
    lines[150] = b"an undecodable byte \xff here"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    out = work / "mid-corpus"
    proc = run_pipeline(work, corpus_config(teacher, out, corpus={"kind": "text", "path": str(corpus),
                                                                  "text_mode": "line"}), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in proc.stderr  # the workers' own tracebacks went to output_dir/logs/workers-*.log
    assert f"{corpus}: line 151: invalid utf-8 byte 0xff" in errors[0] and "Beam step 'Read'" in errors[0]
    logs = list((out / "logs").glob("worker-error-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in errors[0]
    assert not (out / "manifest.json").exists()


def test_overwrite_builds_beside_the_old_set_which_stays_readable_until_the_swap(work, teacher, reference):
    other = make_tiny_bert(work / "other-teacher-2", task="masked_lm", layers=2, hidden=32, heads=4, seed=2)
    out = work / "replaced"
    shutil.copytree(reference, out)
    before = {str(p.relative_to(out)): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    cfg = corpus_config(other, out, overwrite=True)
    kill_after_first_shard(work, cfg, work / ".tmp-replaced")
    assert {str(p.relative_to(out)): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    TransferSet(out, teacher_fingerprint=model_fingerprint(teacher), verify=True)  # the old set, whole
    run_pipeline(work, cfg)  # resumes the staged build, then swaps it in
    assert read_manifest(out).teacher_fingerprint == model_fingerprint(other)
    TransferSet(out, teacher_fingerprint=model_fingerprint(other), verify=True)
    assert not (work / ".tmp-replaced").exists() and not (work / ".old-replaced").exists()
