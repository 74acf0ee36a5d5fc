"""The content-addressed store (data_pipeline/store.py): the key follows the values, a second output_dir reuses the
set without running the teacher, links are made or refused by rule, `ls` and `gc` count sizes and live links.

Fast tests drive `run_in_store` with a stand-in build (a one-shard set); the slow ones run the real pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.config import PipelineConfig
from data_pipeline.pipeline import content_hash
from data_pipeline.store import content_key, corpus_fingerprint, gc, human_size, ls, run_in_store
from kdlib.cache import Manifest, ShardInfo, read_manifest, write_manifest
from kdlib.config import load_config, to_dict
from kdlib.errors import OutputError
from kdlib.runtime.io import sha256_file
from kdlib.runtime.models import ModelConfig
from kdlib.runtime.outputs import output_lock
from kdlib.schemas import TeacherOutputsConfig
from kdlib.text.readers import CorpusConfig, gensim_test_data
from tests.data_pipeline.test_causal import SHIPPED
from tests.data_pipeline.test_pipeline import corpus_config, run_pipeline
from tests.paths import REPO_ROOT
from tests.tiny_models import make_tiny_bert

FAKE = {"fingerprint": "a" * 64, "tokenizer_fingerprint": "b" * 64}


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def config(tmp: Path, out: str, **over) -> PipelineConfig:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("the first line\nthe second line\n")
    fields = dict(teacher=ModelConfig(path=str(tmp / "teacher"), task="masked_lm"), output_dir=str(tmp / out),
                  corpus=CorpusConfig(kind="text", path=str(corpus)), cache_root=str(tmp / "store"))
    return PipelineConfig(**{**fields, **over})


def info(cfg: PipelineConfig) -> dict:
    return dict(FAKE, config_hash=content_hash(cfg))


class FakeBuild:
    """Stands in for the pipeline: writes a one-shard set (the bytes name its config hash) and counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, beam_args, source):
        self.calls.append(cfg)
        out = Path(cfg.output_dir)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        data = f"rows of {content_hash(cfg)}".encode()
        (out / "shards" / "shard-00000-of-00001.parquet").write_bytes(data)
        shard = ShardInfo(name="shard-00000-of-00001", file="shards/shard-00000-of-00001.parquet", rows=3, tokens=30,
                          sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        manifest = Manifest(format_version=1, teacher={"ref": cfg.teacher.path, "fingerprint": FAKE["fingerprint"],
                                                       "model_type": "bert"},
                            tokenizer_fingerprint=FAKE["tokenizer_fingerprint"], config=to_dict(cfg),
                            config_hash=content_hash(cfg), cached={"top_k": cfg.teacher_outputs.top_k}, dtypes={},
                            max_length=cfg.max_length, shards=[shard],
                            totals={"rows": 3, "tokens": 30, "bytes": len(data)},
                            fidelity={}, created="2026-01-01T00:00:00+00:00")
        write_manifest(out, manifest)
        return manifest


def test_cache_root_leaves_the_content_hash_of_existing_configs_as_it_was():
    for name, expected in SHIPPED.items():
        assert content_hash(load_config(REPO_ROOT / name, PipelineConfig, {"cache_root": "/any/store"})) == expected


def test_the_key_follows_values_inputs_and_models_not_paths_or_threads(tmp_path):
    cfg = config(tmp_path, "a")
    corpus = Path(cfg.corpus.path)
    by_hand = hashlib.sha256(f"corpus.txt\0{hashlib.sha256(corpus.read_bytes()).hexdigest()}\n".encode()).hexdigest()
    assert corpus_fingerprint(cfg) == by_hand
    key = content_key(cfg, info(cfg))
    expected = {"teacher": "a" * 64, "tokenizer": "b" * 64, "inputs": by_hand, "config": content_hash(cfg)}
    assert key == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()
    for where in (dict(output_dir=str(tmp_path / "b")), dict(torch_threads=3), dict(overwrite=True),
                  dict(cache_root=str(tmp_path / "other"))):
        other = config(tmp_path, "a", **where)
        assert content_key(other, info(other)) == key, where
    other = config(tmp_path, "a", teacher_outputs=TeacherOutputsConfig(top_k=4))
    assert content_key(other, info(other)) != key
    assert content_key(cfg, dict(info(cfg), fingerprint="c" * 64)) != key
    corpus.write_text("the first line\nthe second linE\n")  # one byte
    assert content_key(cfg, info(cfg)) != key
    # a folder corpus: each file's name relative to it counts, hidden files (not read) do not
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "one.txt").write_text("one\n")
    (folder / ".hidden").write_text("never read\n")
    foldered = config(tmp_path, "a", corpus=CorpusConfig(kind="text", path=str(folder)))
    first, one_digest = corpus_fingerprint(foldered), hashlib.sha256(b"one\n").hexdigest()
    assert first == hashlib.sha256(f"sub/one.txt\0{one_digest}\n".encode()).hexdigest()
    (folder / ".hidden").write_text("changed\n")
    assert corpus_fingerprint(foldered) == first
    (folder / "sub" / "one.txt").rename(folder / "sub" / "two.txt")
    assert corpus_fingerprint(foldered) != first
    gensim = config(tmp_path, "a", corpus=CorpusConfig(kind="text", path="gensim:lee_background.cor"))
    lee = gensim_test_data("lee_background.cor")
    by_hand = hashlib.sha256(f"lee_background.cor\0{sha256_file(lee)}\n".encode()).hexdigest()
    assert corpus_fingerprint(gensim) == by_hand


def test_the_augment_models_weights_are_part_of_the_key(tmp_path):
    model = make_tiny_bert(tmp_path / "mlm", seed=0)
    cfg = config(tmp_path, "a", augment_model=ModelConfig(path=str(model), task="masked_lm"))
    key, plain = content_key(cfg, info(cfg)), config(tmp_path, "a")
    assert key != content_key(plain, dict(info(plain), config_hash=content_hash(cfg)))
    make_tiny_bert(model, seed=1)  # same path and config: only the weights differ
    assert content_key(cfg, info(cfg)) != key


def test_links_are_made_reused_relinked_only_with_overwrite_and_never_over_other_files(tmp_path, capsys):
    build = FakeBuild()
    cfg = config(tmp_path, "a")
    key = content_key(cfg, info(cfg))
    store, set_dir = tmp_path / "store", tmp_path / "store" / "sets" / key
    run_in_store(cfg, [], "x.yaml", build, info(cfg))
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"[data_pipeline] built {key[:12]} in the store")
    assert os.readlink(tmp_path / "a") == str(set_dir) and len(build.calls) == 1
    assert build.calls[0].output_dir == str(set_dir) and build.calls[0].cache_root is None
    shard = set_dir / "shards" / "shard-00000-of-00001.parquet"
    before = (shard.stat().st_ino, shard.stat().st_mtime_ns)
    for out in ("b", "a"):  # another output_dir, then the same one again: the set is reused, nothing rebuilt
        manifest = run_in_store(config(tmp_path, out), [], "x.yaml", build, info(cfg))
        assert capsys.readouterr().out.splitlines()[-1].startswith(
            f"[data_pipeline] reused {key[:12]} from the store, teacher not run")
        assert manifest.totals["rows"] == 3 and len(build.calls) == 1
    assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == before
    assert json.loads((store / "refs" / f"{key}.json").read_text()) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert json.loads((store / "STORE.json").read_text()) == {"store": "transfer-sets", "format_version": 1}
    # a link to another set of the store: refused naming both keys, relinked with overwrite
    other = config(tmp_path, "a", teacher_outputs=TeacherOutputsConfig(top_k=4))
    key2 = content_key(other, info(other))
    with pytest.raises(OutputError, match=f"links to set {key[:12]} .* give set {key2[:12]}; nothing was changed"):
        run_in_store(other, [], "x.yaml", build, info(other))
    assert os.readlink(tmp_path / "a") == str(set_dir) and len(build.calls) == 1
    run_in_store(config(tmp_path, "a", teacher_outputs=TeacherOutputsConfig(top_k=4), overwrite=True), [], "x.yaml",
                 build, info(other))
    assert os.readlink(tmp_path / "a") == str(store / "sets" / key2) and len(build.calls) == 2
    # a real folder, a file, a link elsewhere: refused untouched
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    os.symlink(tmp_path / "real", tmp_path / "elsewhere")
    for out, what in (("real", "a folder"), ("file", "a file"), ("elsewhere", "a link outside the store")):
        digest = tree_digest(tmp_path / "real")
        with pytest.raises(OutputError, match=f"output_dir: {tmp_path / out} is {what}; .*nothing was changed"):
            run_in_store(config(tmp_path, out, overwrite=True), [], "x.yaml", build, info(cfg))
        assert tree_digest(tmp_path / "real") == digest and (tmp_path / "file").read_text() == "keep"
    assert os.readlink(tmp_path / "elsewhere") == str(tmp_path / "real") and len(build.calls) == 2
    # a corrupted shard: the set is not complete, so it is built again
    shard.write_bytes(b"damaged")
    run_in_store(config(tmp_path, "b"), [], "x.yaml", build, info(cfg))
    assert len(build.calls) == 3 and "is built again" in capsys.readouterr().out


def test_a_cache_root_that_is_not_a_store_is_refused_untouched(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    digest = tree_digest(foreign)
    cfg = config(tmp_path, "a", cache_root=str(foreign))
    with pytest.raises(OutputError, match=f"^x.yaml: field 'cache_root': {foreign} holds files that are not a "
                                          "transfer-set store \\(notes.txt, no STORE.json\\); nothing was changed"):
        run_in_store(cfg, [], "x.yaml", FakeBuild(), info(cfg))
    assert tree_digest(foreign) == digest and not (tmp_path / "a").exists()


def test_gc_removes_only_sets_without_a_live_link_and_never_one_being_built(tmp_path, capsys):
    build = FakeBuild()
    one, two = config(tmp_path, "a"), config(tmp_path, "c", teacher_outputs=TeacherOutputsConfig(top_k=4))
    for cfg in (one, config(tmp_path, "b"), two):
        run_in_store(cfg, [], "x.yaml", build, info(cfg))
    k1, k2 = content_key(one, info(one)), content_key(two, info(two))
    sets = tmp_path / "store" / "sets"
    listed = {s["key"]: s for s in ls(str(tmp_path / "store"))}
    assert listed[k1]["references"] == [str(tmp_path / "a"), str(tmp_path / "b")] and listed[k2]["state"] == "complete"
    assert listed[k1]["bytes"] == folder_bytes(sets / k1) and listed[k1]["rows"] == 3
    assert listed[k2]["cached"] == {"top_k": 4} and listed[k2]["input"] == one.corpus.path
    (tmp_path / "a").unlink()
    (tmp_path / "a").mkdir()  # a folder where the link was: not a live reference
    assert [(d["key"], d["action"]) for d in gc(str(tmp_path / "store"))] == [(k, "kept") for k in sorted((k1, k2))]
    assert json.loads((tmp_path / "store" / "refs" / f"{k1}.json").read_text()) == [str(tmp_path / "b")]  # pruned
    (tmp_path / "c").unlink()
    digest = tree_digest(tmp_path / "store")
    assert {d["key"]: d["action"] for d in gc(str(tmp_path / "store"), dry_run=True)}[k2] == "would remove"
    with output_lock(sets / k2, "python -m data_pipeline"):  # a build in progress (a rebuild of k2)
        action = {d["key"]: (d["action"], d["why"]) for d in gc(str(tmp_path / "store"))}[k2]
        assert action == ("skipped", f"being built by python -m data_pipeline (pid {os.getpid()} on host "
                                     f"{os.uname().nodename})")
    assert tree_digest(tmp_path / "store") == digest
    size = folder_bytes(sets / k2)
    removed = [d for d in gc(str(tmp_path / "store")) if d["action"] == "removed"]
    assert [(d["key"], d["bytes"]) for d in removed] == [(k2, size)]
    assert not (sets / k2).exists() and not (tmp_path / "store" / "refs" / f"{k2}.json").exists()
    assert [s["key"] for s in ls(str(tmp_path / "store"))] == [k1]
    # a build that has not written its manifest yet: "building" while its lock is held, else "incomplete"
    (sets / ("f" * 64)).mkdir()
    (sets / ("f" * 64) / "resolved_config.yaml").write_text(
        f"teacher: {{path: /t}}\ncorpus: {{path: {one.corpus.path}}}\n")
    with output_lock(sets / ("f" * 64), "python -m data_pipeline"):
        building = ls(str(tmp_path / "store"))[-1]
    assert (building["state"], building["teacher"], building["input"]) == ("building", "/t", one.corpus.path)
    assert ls(str(tmp_path / "store"))[-1]["state"] == "incomplete"
    assert human_size(999) == "999 B" and human_size(1000) == "1.0 kB" and human_size(5_140_000) == "5.1 MB"


# ---------------------------------------------------------------- the real pipeline


ONE_WORKER = ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"]  # tiny sets: no worker start-up
SMALL = {"num_shards": 2, "corpus": {"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line",
                                     "max_documents": 30}}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A plain run, then the same config with a store at two output_dirs (the second run's shards' inode and
    mtime taken before it)."""
    work = tmp_path_factory.mktemp("store")
    teacher = make_tiny_bert(work / "teacher", task="masked_lm", layers=2, hidden=32, heads=4, seed=0)
    run_pipeline(work, corpus_config(teacher, work / "plain", **SMALL), beam_args=ONE_WORKER)
    store = work / "cache"
    first = run_pipeline(work, corpus_config(teacher, work / "a", cache_root=str(store), **SMALL), beam_args=ONE_WORKER)
    shards = sorted((work / "a" / "shards").glob("*.parquet"))
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in shards]
    second = run_pipeline(work, corpus_config(teacher, work / "b", cache_root=str(store), torch_threads=2, **SMALL),
                          beam_args=["--runner", "dask", "--local-workers", "1"])  # a reuse starts no cluster
    return {"work": work, "teacher": teacher, "store": store, "first": first, "second": second, "shards": shards,
            "stamps": stamps}


@pytest.mark.slow
def test_the_same_config_at_a_second_output_dir_reuses_the_set_without_the_teacher(built):
    work, store = built["work"], built["store"]
    key = (store / "sets").iterdir().__next__().name
    assert f"[data_pipeline] built {key[:12]} in the store" in built["first"].stdout
    assert f"[data_pipeline] reused {key[:12]} from the store, teacher not run" in built["second"].stdout
    assert " rows, " in built["first"].stdout and " rows, " not in built["second"].stdout  # a Beam build's summary
    assert "runner: a local Dask cluster" not in built["second"].stdout
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in built["shards"]] == built["stamps"]
    assert os.path.realpath(work / "a") == os.path.realpath(work / "b") == str(store / "sets" / key)
    plain, stored = read_manifest(work / "plain"), read_manifest(work / "b")
    assert [(s.name, s.sha256) for s in stored.shards] == [(s.name, s.sha256) for s in plain.shards]
    for s in plain.shards:  # byte for byte
        assert sha256_file(work / "b" / s.file) == sha256_file(work / "plain" / s.file) == s.sha256
    assert stored.config_hash == plain.config_hash and stored.config["cache_root"] is None


@pytest.mark.slow
def test_a_foreign_cache_root_and_a_real_output_folder_are_refused_untouched(built):
    work, teacher = built["work"], built["teacher"]
    foreign, real = work / "foreign", work / "real"
    for folder in (foreign, real):
        folder.mkdir()
        (folder / "results.csv").write_text("a,b\n1,2\n")
    digests = {f: tree_digest(f) for f in (foreign, real, built["store"])}
    for cfg, start in ((corpus_config(teacher, work / "c", cache_root=str(foreign), **SMALL),
                        f"error: {work}/config-"),  # the config file, then the field
                       (corpus_config(teacher, real, cache_root=str(built["store"]), **SMALL),
                        f"error: output_dir: {real} is a folder"),
                       (corpus_config(teacher, work / "b", overwrite=True, **dict(SMALL, num_shards=3)),
                        f"error: {work}/config-")):  # a link into the store, without cache_root: refused
        proc = run_pipeline(work, cfg, beam_args=ONE_WORKER, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # (Beam's import warns)
        assert len(lines) == 1 and lines[0].startswith(start), proc.stderr[-2000:]
        if "cache_root" not in cfg:
            assert f"field 'output_dir': {work / 'b'} is a link" in lines[0]
        elif "foreign" in cfg["cache_root"]:
            assert f".yaml: field 'cache_root': {foreign} holds files that are not a transfer-set store" in lines[0]
    assert {f: tree_digest(f) for f in digests} == digests and not (work / "c").exists()


@pytest.mark.slow
def test_ls_lists_references_and_sizes_and_gc_follows_the_links(built):
    work, store = built["work"], str(built["store"])
    listed = json.loads(cli("ls", "--cache-root", store, "--json").stdout)
    assert len(listed) == 1
    (entry,) = listed
    set_dir = built["store"] / "sets" / entry["key"]
    manifest = read_manifest(set_dir)
    assert entry["references"] == [str(work / "a"), str(work / "b")] and entry["state"] == "complete"
    assert entry["bytes"] == folder_bytes(set_dir) > manifest.totals["bytes"]
    assert (entry["rows"], entry["tokens"]) == (manifest.totals["rows"], manifest.totals["tokens"])
    assert entry["cached"]["top_k"] == 8 and entry["model_type"] == "bert"
    table = cli("ls", "--cache-root", store).stdout
    print(table)
    assert human_size(entry["bytes"]) in table and f"<- {work / 'a'}" in table and f"<- {work / 'b'}" in table
    (work / "a").unlink()
    proc = cli("gc", "--cache-root", store)
    assert proc.returncode == 0 and set_dir.is_dir() and "kept" in proc.stdout
    (work / "b").unlink()
    digest = tree_digest(built["store"])
    proc = cli("gc", "--cache-root", store, "--dry-run")
    print(proc.stdout)
    assert f"would remove  {entry['key'][:12]}" in proc.stdout and tree_digest(built["store"]) == digest
    proc = cli("gc", "--cache-root", store)
    print(proc.stdout)
    assert proc.returncode == 0 and f"removed       {entry['key'][:12]}" in proc.stdout and not set_dir.exists()
    assert json.loads(cli("ls", "--cache-root", store, "--json").stdout) == []
