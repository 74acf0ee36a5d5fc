"""Worker processes' stderr into a log file, so that a user sees our one error line and not their tracebacks.

Beam's DirectRunner workers inherit this process's stderr and print each failure in full before the main process
has turned it into one line. Inside `stderr_into(path)` file descriptor 2 is the log file, so every process
started in the block writes there; the block gets a stream to the real stderr for what a person should still see
(a progress bar). An empty log is removed, and so is one without a traceback after a block that ended without an
error: the start-up chatter of a run that worked is not worth a file.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO


@contextmanager
def stderr_into(path: Path) -> Iterator[TextIO]:
    made = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    failed = False
    try:
        yield terminal
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()
        if path.is_file() and (not path.stat().st_size or not failed and b"Traceback" not in path.read_bytes()):
            path.unlink()
            if made and not any(path.parent.iterdir()):
                path.parent.rmdir()
