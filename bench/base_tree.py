"""A past commit checked out beside the working tree, so a benchmark can time "before" and "after" in one run.

The checkout is a `git worktree` under bench/out/ (ignored by git); a variant runs in a subprocess
whose PYTHONPATH is that tree, and `check_imported` makes sure it really imported from there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


def worktree(commit: str) -> Path:
    """`commit` checked out under bench/out/base-<commit> (reused when already there)."""
    target = OUT / f"base-{commit}"
    if (target / ".git").exists():
        return target
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(target), commit], cwd=REPO, check=True,
                   capture_output=True)
    return target


def remove(tree: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def run_in(tree: Path, cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """`cmd` inside `tree` with PYTHONPATH=tree (`-m` then imports that tree's code); a failure raises, naming the
    command, the tree and the end of its stderr."""
    proc = subprocess.run(cmd, cwd=tree, env=dict(env, PYTHONPATH=str(tree)), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} (in {tree}): exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def check_imported(module_file: str, tree: Path, tag: str) -> None:
    """A variant that imported the project from anywhere but `tree` measured the wrong code."""
    if not Path(module_file).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tag}: imported {module_file}, not from {tree}")
