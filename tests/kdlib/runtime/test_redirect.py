"""A child process started inside `stderr_into` writes its stderr to the log, not to ours."""

import subprocess
import sys

import pytest

from kdlib.runtime.redirect import stderr_into


def child(text: str) -> None:
    subprocess.run([sys.executable, "-c", f"import sys; sys.stderr.write({text!r})"], check=True)


def test_a_childs_traceback_is_kept_in_the_log_and_chatter_of_a_good_run_is_dropped(tmp_path, capfd):
    log = tmp_path / "logs" / "workers.log"
    with stderr_into(log) as terminal:
        child("INFO: started\n")
        terminal.write("progress 1/2\n")
    assert not log.parent.exists()  # a good run's start-up chatter is not kept, nor the folder made for it
    with pytest.raises(RuntimeError):
        with stderr_into(log):
            child("Traceback (most recent call last):\n  boom\n")
            raise RuntimeError("the run failed")
    assert log.read_text() == "Traceback (most recent call last):\n  boom\n"
    captured = capfd.readouterr()
    assert "progress 1/2" in captured.err and "boom" not in captured.err and "INFO: started" not in captured.err
