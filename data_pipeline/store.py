"""A content-addressed store of transfer sets: the same teacher over the same input files with the same config is
computed once, whichever output_dir asks for it (`cache_root` in the pipeline config).

A store folder holds:
  STORE.json         marks the folder as a store (with its format version); a folder that holds other files
                     and no STORE.json is never written into
  sets/<key>/        a normal transfer set (shards/, manifest.json), built there by the pipeline
  sets/.lock-<key>   the pipeline's writer lock while that set is built (kdlib.runtime.outputs.output_lock)
  refs/<key>.json    the absolute output_dir paths that were linked to the set
An output_dir is an absolute symlink to `sets/<key>`. A reference is live while that path is still a symlink
resolving to the set; `gc` removes the sets without a live one, never one whose lock a live build holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import yaml

from data_pipeline.config import PipelineConfig
from kdlib.errors import CacheError, OutputError
from kdlib.runtime.fingerprints import model_fingerprint
from kdlib.runtime.io import atomic_write_text, sha256_file
from kdlib.runtime.models import resolve_model_path
from kdlib.runtime.outputs import listing, lock_holder, output_lock
from kdlib.text.readers import DEFAULT_WIKI_NAME, gensim_test_data, resolve_path
from kdlib.text.readers.text import list_text_files

STORE_FILE, STORE_FORMAT = "STORE.json", 1
SETS, REFS, MANIFEST = "sets", "refs", "manifest.json"
STAGE, GC_STAGE = "python -m data_pipeline", "python -m data_pipeline gc"


# ---------------------------------------------------------------- the key


def input_files(cfg: PipelineConfig) -> list[tuple[Path, str]]:
    """(file, name) pairs of what the config's reader reads: one file, or a folder's files (sorted, named relative
    to it, hidden ones skipped, as the text reader lists them); `gensim:` and the default Wikipedia sample
    resolved the way the readers resolve them."""
    spec = cfg.corpus if cfg.corpus is not None else cfg.task
    if cfg.corpus is not None and cfg.corpus.kind == "wikipedia_xml" and spec.path == "default":
        path = gensim_test_data(DEFAULT_WIKI_NAME)
    else:
        path = resolve_path(spec.path)
    return list_text_files(path)


def corpus_fingerprint(cfg: PipelineConfig) -> str:
    """sha256 over each input file's name and bytes: a changed byte, a renamed or added file changes it. Read in
    full on every run (disk speed, cheap next to the teacher), so no cache can hide an edit."""
    digest = hashlib.sha256()
    for path, name in input_files(cfg):
        digest.update(f"{name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def content_key(cfg: PipelineConfig, info: dict) -> str:
    """The set's address: sha256 of the teacher, tokenizer and input fingerprints and the hash of the config fields
    that change values (`info` is the pipeline's preflight); the TinyBERT augment model's fingerprint too."""
    parts = {"teacher": info["fingerprint"], "tokenizer": info["tokenizer_fingerprint"],
             "inputs": corpus_fingerprint(cfg), "config": info["config_hash"]}
    if cfg.augment_model is not None:
        parts["augment_model"] = model_fingerprint(resolve_model_path(cfg.augment_model.path))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the store folder


def open_store(cache_root: str, where: str, create: bool) -> Path:
    """The store's absolute path; a new or empty folder becomes a store (with `create`), anything else that has no
    STORE.json of ours is refused untouched."""
    root = Path(os.path.abspath(Path(cache_root).expanduser()))
    marker = root / STORE_FILE
    if root.exists() and not root.is_dir():
        raise OutputError(f"{where}: {root} is a file, not a transfer-set store folder; nothing was changed")
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            ours = data.get("store") == "transfer-sets"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours or data.get("format_version") != STORE_FORMAT:
            raise OutputError(f"{where}: {marker} is not a transfer-set store's (expected format_version "
                              f"{STORE_FORMAT}); nothing was changed")
        return root
    if root.is_dir() and any(root.iterdir()):
        raise OutputError(f"{where}: {root} holds files that are not a transfer-set store ({listing(root)}, no "
                          f"{STORE_FILE}); nothing was changed. Choose a new or empty folder")
    if not create:
        raise OutputError(f"{where}: {root} is not a transfer-set store (no {STORE_FILE})")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"store": "transfer-sets", "format_version": STORE_FORMAT}, indent=1))
    (root / SETS).mkdir(exist_ok=True)  # after the marker: a store is never a folder of ours without one
    (root / REFS).mkdir(exist_ok=True)
    return root


def read_refs(root: Path, key: str) -> list[str]:
    try:
        return json.loads((root / REFS / f"{key}.json").read_text())
    except FileNotFoundError:
        return []


def write_refs(root: Path, key: str, paths: list[str]) -> None:
    atomic_write_text(root / REFS / f"{key}.json", json.dumps(sorted(set(paths)), indent=1))


def is_live(ref: str, set_dir: Path) -> bool:
    """A reference counts while the path is still a symlink that resolves to the set."""
    return os.path.islink(ref) and os.path.realpath(ref) == os.path.realpath(set_dir)


def linked_key(out: Path, root: Path) -> Optional[str]:
    """The key of the set in this store that symlink `out` points at (resolved or dangling), else None."""
    if not out.is_symlink():
        return None
    target = Path(os.path.normpath(out.parent / os.readlink(out)))
    return target.name if os.path.realpath(target.parent) == os.path.realpath(root / SETS) else None


def check_link(out: Path, root: Path, key: str, overwrite: bool) -> bool:
    """Whether output_dir needs a (new) link; refuses anything but an absent path or a link into this store."""
    if not os.path.lexists(out):
        return True
    found = linked_key(out, root)
    if found == key:
        return False
    if found is not None and not overwrite:
        raise OutputError(f"output_dir: {out} links to set {found[:12]} of the store {root}; this run's inputs give "
                          f"set {key[:12]}; nothing was changed. Choose another output_dir, or set overwrite: true "
                          "to relink it")
    if found is None:
        what = "a link outside the store" if out.is_symlink() else "a folder" if out.is_dir() else "a file"
        raise OutputError(f"output_dir: {out} is {what}; with cache_root it becomes a link to the store's set, so it "
                          "must be absent or a link into the store; nothing was changed. Choose another output_dir, "
                          "or move that one away")
    return True


def link(out: Path, target: Path) -> None:
    """output_dir -> the set, as an absolute symlink made beside it and renamed over it (never half there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-link-{out.name}-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, out)


def complete_manifest(set_dir: Path):
    """The set's manifest when it is complete and every shard hashes to its record; None otherwise."""
    # kdlib.cache loads torch (through its reader): `ls` and `gc` import this module and must start without it
    from kdlib.cache import read_manifest, verify_shards

    if not (set_dir / MANIFEST).is_file():
        return None
    manifest = read_manifest(set_dir)
    try:
        verify_shards(set_dir, manifest)
    except CacheError as err:
        print(f"[data_pipeline] {err}; the store's set is built again")
        return None
    return manifest


def run_in_store(cfg: PipelineConfig, beam_args: list[str], source: str, build: Callable, info: dict):
    """Reuse the set with this content key, or `build` it (the plain pipeline, into the store), then link
    output_dir to it. The set's lock is held while it is checked and linked, so `gc` cannot remove it between."""
    root = open_store(cfg.cache_root, f"{source}: field 'cache_root'", create=True)
    out = Path(os.path.abspath(Path(cfg.output_dir).expanduser()))
    if out == root or root in out.parents:
        raise OutputError(f"{source}: field 'output_dir': {out} is inside the store {root}; expected a path outside")
    key = content_key(cfg, info)
    set_dir = root / SETS / key
    check_link(out, root, key, cfg.overwrite)  # before any teacher work
    with output_lock(set_dir, STAGE):
        manifest = complete_manifest(set_dir)
        if manifest is not None:
            _link_and_record(out, root, key, cfg.overwrite)
            print(f"[data_pipeline] reused {key[:12]} from the store, teacher not run: {out} -> {set_dir}")
            return manifest
    manifest = build(dataclasses.replace(cfg, output_dir=str(set_dir), cache_root=None, overwrite=False),
                     beam_args, source)
    with output_lock(set_dir, STAGE):
        if not (set_dir / MANIFEST).is_file():
            raise CacheError(f"{set_dir}: removed (by gc?) right after it was built; run again")
        _link_and_record(out, root, key, cfg.overwrite)
    print(f"[data_pipeline] built {key[:12]} in the store: {out} -> {set_dir}")
    return manifest


def _link_and_record(out: Path, root: Path, key: str, overwrite: bool) -> None:
    with output_lock(out, STAGE):  # one writer of output_dir, as without a store
        if check_link(out, root, key, overwrite):
            link(out, root / SETS / key)
    write_refs(root, key, read_refs(root, key) + [str(out)])


# ---------------------------------------------------------------- ls and gc


def folder_bytes(folder: Path) -> int:
    return sum(os.lstat(os.path.join(top, name)).st_size for top, _, names in os.walk(folder) for name in names)


def set_keys(root: Path) -> list[str]:
    """The sets in the store (hidden names are locks and folders being removed)."""
    sets = root / SETS
    return sorted(p.name for p in sets.iterdir() if p.is_dir() and not p.name.startswith(".")) if sets.is_dir() else []


def describe(root: Path, key: str) -> dict:
    """What `ls` says of one set: from its manifest when complete, else from the config its build recorded."""
    set_dir = root / SETS / key
    manifest = json.loads((set_dir / MANIFEST).read_text()) if (set_dir / MANIFEST).is_file() else None
    if manifest is not None:
        config, state = manifest["config"], "complete"
    else:
        resolved = set_dir / "resolved_config.yaml"
        config = (yaml.safe_load(resolved.read_text()) or {}) if resolved.is_file() else {}
        state = "building" if lock_holder(set_dir) else "incomplete"
    refs = read_refs(root, key)
    source = config.get("corpus") or config.get("task") or {}
    totals, teacher = (manifest or {}).get("totals", {}), (manifest or {}).get("teacher", {})
    return {"key": key, "state": state, "bytes": folder_bytes(set_dir), "rows": totals.get("rows"),
            "tokens": totals.get("tokens"), "teacher": teacher.get("ref") or config.get("teacher", {}).get("path"),
            "model_type": teacher.get("model_type"), "cached": (manifest or {}).get("cached", {}),
            "input": source.get("path"), "created": (manifest or {}).get("created"),
            "references": [r for r in refs if is_live(r, set_dir)],
            "dead_references": [r for r in refs if not is_live(r, set_dir)], "path": str(set_dir)}


def ls(cache_root: str) -> list[dict]:
    root = open_store(cache_root, "--cache-root", create=False)
    return [describe(root, key) for key in set_keys(root)]


def gc(cache_root: str, dry_run: bool = False) -> list[dict]:
    """Remove the sets with no live reference (and prune dead references of the kept ones); a set a live build
    holds the lock of is skipped. Each set's lock is taken while it is judged and removed, so no build starts on
    it meanwhile. Returns one entry per set: key, bytes, action (removed / would remove / kept / skipped), why."""
    root = open_store(cache_root, "--cache-root", create=False)
    for leftover in (root / SETS).glob(".removing-*"):  # a gc killed while deleting
        if not dry_run:
            shutil.rmtree(leftover, ignore_errors=True)
    done = []
    for key in set_keys(root):
        set_dir = root / SETS / key
        entry = {"key": key, "bytes": folder_bytes(set_dir)}
        holder = lock_holder(set_dir)
        if holder is not None:
            done.append(dict(entry, action="skipped", why=f"being built by {holder.get('stage')} (pid "
                                                            f"{holder.get('pid')} on host {holder.get('host')})"))
            continue
        if dry_run:
            live = [r for r in read_refs(root, key) if is_live(r, set_dir)]
            done.append(dict(entry, action="kept" if live else "would remove", why=_why(live)))
            continue
        try:
            with output_lock(set_dir, GC_STAGE):
                refs = read_refs(root, key)
                live = [r for r in refs if is_live(r, set_dir)]
                if live:
                    if live != refs:
                        write_refs(root, key, live)
                    done.append(dict(entry, action="kept", why=_why(live)))
                    continue
                trash = set_dir.with_name(f".removing-{key}")
                os.rename(set_dir, trash)  # a killed gc leaves a hidden folder, never a half set
                (root / REFS / f"{key}.json").unlink(missing_ok=True)
                shutil.rmtree(trash)
                done.append(dict(entry, action="removed", why=_why(live)))
        except OutputError as err:  # a build took the lock since we looked
            done.append(dict(entry, action="skipped", why=str(err)))
    return done


def _why(live: list[str]) -> str:
    return f"{len(live)} live reference{'s' if len(live) != 1 else ''}" if live else "no live reference"


def human_size(n: int) -> str:
    """Bytes as '5.1 MB' (powers of 1000, as the pipeline's own summary line)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


__all__ = ["corpus_fingerprint", "content_key", "run_in_store", "ls", "gc", "human_size"]
