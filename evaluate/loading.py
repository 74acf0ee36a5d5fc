"""Model folders for the evaluation: found and checked before any work, then loaded with the right head.

A folder is loaded as a masked LM only when its safetensors hold masked-LM head weights: a bare encoder
(the packaged all-MiniLM-L6-v2 has embeddings, layers and a pooler, no `cls.predictions.*`) would get a
random head from AutoModelForMaskedLM, and its "agreement" would be noise. Such a model is scored on
everything else and shows n/a for the masked-LM metrics. Detection reads only the safetensors headers;
`kdlib.runtime.models.load_model` then refuses a head that is only partly present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from kdlib.runtime.fingerprints import model_fingerprint
from kdlib.runtime.models import (ModelConfig, check_model_folder, load_model, load_tokenizer, resolve_model_path,
                                  task_folder, task_of)

# Key prefixes of masked-LM heads in the architectures transformers ships (BERT and its relatives, RoBERTa
# and XLM-R, DistilBERT, ALBERT, ELECTRA's generator). A causal LM's `lm_head.` is excluded by task_of.
MLM_HEAD_PREFIXES = ("cls.predictions.", "lm_head.", "vocab_projector.", "vocab_transform.", "predictions.",
                     "generator_lm_head.")


@dataclass
class ModelEntry:
    """A checked model folder, not loaded yet."""

    name: str
    ref: str  # as written in the config
    folder: Path  # resolved
    config: dict  # config.json
    has_mlm_head: bool
    fingerprint: str  # sha256 over weights and config.json (kdlib.runtime.fingerprints)

    @property
    def hidden_size(self) -> int | None:
        return self.config.get("hidden_size") or self.config.get("dim") or self.config.get("d_model")

    @property
    def num_layers(self) -> int | None:
        return self.config.get("num_hidden_layers") or self.config.get("n_layers")

    def describe(self) -> dict:
        return {"path": self.ref, "folder": str(self.folder), "fingerprint": self.fingerprint,
                "architectures": self.config.get("architectures"), "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "has_mlm_head": self.has_mlm_head}


@dataclass
class LoadedModel:
    """A loaded model: `model` with its masked-LM head when it has one, `encoder` its base model."""

    entry: ModelEntry
    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any

    @property
    def encoder(self):
        """The base model (embeddings + layers): what word similarity, pooling and the timing run."""
        return self.model.base_model


def safetensors_keys(folder: Path) -> list[str]:
    """Every tensor name in the folder's safetensors files (headers only; no weights are read)."""
    keys: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def has_mlm_head(folder: Path, config: dict) -> bool:
    """True when the folder's weights (or its masked_lm/ subfolder's, for a general student) include a masked-LM head
    (and it is not a causal LM)."""
    if task_of(config) in ("causal_lm", "sequence_classification"):
        return False
    return any(key.startswith(MLM_HEAD_PREFIXES) for key in safetensors_keys(task_folder(folder, "masked_lm")))


def find_model(name: str, ref: str) -> ModelEntry:
    """Resolve and check one folder (ModelLoadError when it is absent or unsafe); nothing is loaded."""
    folder = resolve_model_path(ref)
    config = check_model_folder(folder)
    return ModelEntry(name, ref, folder, config, has_mlm_head(folder, config), model_fingerprint(folder))


def load(entry: ModelEntry) -> LoadedModel:
    """The model (masked-LM head included when present) and its tokenizer, offline, safetensors only."""
    task = "masked_lm" if entry.has_mlm_head else "base"
    model = load_model(ModelConfig(path=str(entry.folder), task=task))
    return LoadedModel(entry, model, load_tokenizer(str(entry.folder), entry.config))
