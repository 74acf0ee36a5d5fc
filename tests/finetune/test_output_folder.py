"""`python -m finetune` writes only into an absent or empty folder or its own output_dir: a transfer set, another
stage's folder, a person's files or a file are refused in one line before any step, every byte unchanged."""

import subprocess
import sys
from pathlib import Path

from kdlib.runtime.io import sha256_file
from tests.finetune_fixture import base_config, write_config
from tests.paths import REPO_ROOT


def run_folds(tmp: Path, output_dir: Path) -> subprocess.CompletedProcess:
    config = write_config(dict(base_config(tmp), output_dir=str(output_dir)), tmp / f"{output_dir.name}.yaml")
    return subprocess.run([sys.executable, "-m", "finetune", "folds", "--config", str(config)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_transfer_set_a_file_and_a_persons_folder_are_refused_and_its_own_folder_resumes(tmp_path):
    transfer_set = tmp_path / "transfer_set"
    (transfer_set / "shards").mkdir(parents=True)
    (transfer_set / "manifest.json").write_text('{"format_version": 1}\n')
    (transfer_set / "shards" / "shard-00000-of-00001.parquet").write_bytes(b"PAR1")
    as_file = tmp_path / "notes.txt"
    as_file.write_text("mine\n")
    for output_dir, expected in ((transfer_set, "already holds files that python -m finetune did not write "
                                                "(manifest.json, shards/)"),
                                 (as_file, f"output_dir: {as_file} is a file")):
        before = tree(transfer_set) | {"file": sha256_file(as_file)}
        proc = run_folds(tmp_path, output_dir)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert tree(transfer_set) | {"file": sha256_file(as_file)} == before

    own = tmp_path / "run"
    first = run_folds(tmp_path, own)
    assert first.returncode == 0, first.stderr[-2000:]
    written = tree(own)
    assert "folds/labels.json" in written
    again = run_folds(tmp_path, own)  # its own folder: accepted, and the split files come out the same
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree(own) == written


def test_a_cut_short_state_file_is_one_line_naming_it(tmp_path):
    own = tmp_path / "run"
    assert run_folds(tmp_path, own).returncode == 0
    record = own / "fold-0" / "seed-0" / "kd" / "eval.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"arm": "kd", "config_hash": "ab')  # e.g. copied while it was written
    config = tmp_path / "run.yaml"  # written by run_folds
    proc = subprocess.run([sys.executable, "-m", "finetune", "distill", "--config", str(config), "--arm", "kd"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{record}: line 1: malformed JSON" in errors[0] and "cut short" in errors[0]
