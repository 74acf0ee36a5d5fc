"""manifest.json: what a transfer set holds and who made it. Written last, atomically.

A directory without a manifest is not a transfer set (it may be a killed build). Consumers check the
teacher and tokenizer fingerprints against what they were told to use and stop, naming both, when
they differ; `verify_shards` re-hashes every shard and names a corrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from kdlib import __version__
from kdlib.cache.shards import ShardInfo
from kdlib.errors import CacheError, FingerprintMismatch, ReaderError
from kdlib.runtime.io import atomic_write_text, sha256_file
from kdlib.runtime.jsonl import text_of

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    format_version: int
    teacher: dict  # ref, fingerprint, task, vocab_size, num_layers, hidden_size
    tokenizer_fingerprint: str
    config: dict  # the resolved pipeline config
    config_hash: str
    cached: dict  # top_k, dense_logits, hidden_layers, pooled, labels, mlm, text, char_offsets, packing
    dtypes: dict  # column -> stored dtype
    max_length: int
    shards: list[ShardInfo]
    totals: dict  # rows, tokens, bytes
    fidelity: dict  # mean_kept_mass, mean_kl, positions (top-k vs full distribution)
    tool_version: str = __version__
    created: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def teacher_fingerprint(self) -> str:
        return self.teacher["fingerprint"]

    @property
    def packing(self) -> Optional[str]:
        """How corpus rows were packed (kdlib/text/packing.py): "cls" or "causal"; None for a task set. Manifests
        written before causal packing existed hold "cls" rows when they are corpus sets."""
        if "packing" in self.cached:
            return self.cached["packing"]
        return "cls" if self.config.get("corpus") is not None else None

    @property
    def char_offsets(self) -> bool:
        """Whether rows store their text, each token's character span and the document breaks."""
        return bool(self.cached.get("char_offsets"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as err:
            raise CacheError(f"{where}: not a valid transfer-set manifest ({err})") from None


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write_text(path, manifest.to_json())
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    path = Path(directory) / MANIFEST
    if Path(directory).is_file():
        raise CacheError(f"{directory}: is a file; expected a transfer-set folder (manifest.json + shards/)")
    if not Path(directory).exists():
        raise CacheError(f"{directory}: no such transfer-set folder")
    if not path.is_file():
        raise CacheError(f"{directory}: no {MANIFEST}, so this is not a complete transfer set "
                         "(a build may have been interrupted: rerun the pipeline with the same config)")
    try:
        text = text_of(path)
    except ReaderError as err:
        raise CacheError(str(err)) from None
    manifest = Manifest.from_json(text, str(path))
    if manifest.format_version != 1:
        raise CacheError(f"{path}: format_version {manifest.format_version} is not supported (expected 1)")
    return manifest


def check_fingerprints(manifest: Manifest, where: str, *, teacher: Optional[str] = None,
                       tokenizer: Optional[str] = None) -> None:
    """Refuse a transfer set made by another teacher or tokenizer, naming both fingerprints."""
    if teacher is not None and teacher != manifest.teacher_fingerprint:
        raise FingerprintMismatch(f"{where}: the transfer set was made by teacher {manifest.teacher_fingerprint} "
                                  f"but this run uses teacher {teacher}")
    if tokenizer is not None and tokenizer != manifest.tokenizer_fingerprint:
        raise FingerprintMismatch(f"{where}: the transfer set was tokenized with tokenizer {manifest.tokenizer_fingerprint} "
                                  f"but this run uses tokenizer {tokenizer}")


def missing_shard(path: Path) -> CacheError:
    return CacheError(f"{path}: shard listed in the manifest is missing")


def check_shard_digest(path: Path, actual: str, expected: str) -> None:
    """A shard whose bytes hash to something other than the manifest's record is named, with both hashes."""
    if actual != expected:
        raise CacheError(f"{path}: shard is corrupted (sha256 {actual} differs from the manifest's {expected})")


def verify_shards(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Re-hash every shard; a missing or changed one is named."""
    for shard in manifest.shards:
        path = Path(directory) / shard.file
        if not path.is_file():
            raise missing_shard(path)
        check_shard_digest(path, sha256_file(path), shard.sha256)
