"""`python -m report` writes only into an absent or empty folder or an earlier report of its own: a folder of
someone's files, or a file, is refused in one line before any input is read, with every byte left as it was."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from kdlib.runtime.io import sha256_file
from tests.paths import REPO_ROOT


def run_report(tmp: Path, output_dir: Path) -> subprocess.CompletedProcess:
    config = tmp / "report.yaml"
    missing = str(tmp / "no-such-stage.yaml")
    config.write_text(yaml.safe_dump({"output_dir": str(output_dir), "steps": str(tmp / "steps.json"),
                                      "configs": {k: missing for k in ("teacher", "pipeline", "pretrain", "evaluate",
                                                                       "finetune")}}))
    return subprocess.run([sys.executable, "-m", "report", "--config", str(config)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def digests(folder: Path) -> dict:
    return {p.name: sha256_file(p) for p in folder.iterdir()}


def one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_a_folder_of_someone_elses_files_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    before = digests(out)
    assert "already holds files that python -m report did not write (report.md)" in one_error(run_report(tmp_path, out))
    assert digests(out) == before


def test_a_file_is_refused_and_an_earlier_report_is_accepted_as_its_own(tmp_path):
    as_file = tmp_path / "report-file"
    as_file.write_text("x")
    assert f"output_dir: {as_file} is a file" in one_error(run_report(tmp_path, as_file))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "numbers.json").write_text(json.dumps([{"shown": "0.5", "terms": [["m.json", ["a"], 1]], "fmt": ".1f"}]))
    (earlier / "report.md").write_text("# an earlier report\n")
    before = digests(earlier)
    message = one_error(run_report(tmp_path, earlier))  # past the folder check: the missing inputs are next
    assert "no-such-stage.yaml: config file not found" in message
    assert digests(earlier) == before
