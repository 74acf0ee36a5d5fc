"""Offline, safe model loading: local folders or installed packages, safetensors only.

A model reference is either a folder path or `package:<python_module>`, which resolves to the
model folder shipped inside that installed package (`<module>.get_model_path()` if the package
provides it, else `<module>/model`). Nothing is ever fetched from a hub, pickle weights are
refused, and `trust_remote_code` stays off unless a config turns it on. transformers (~1 s to import) is
imported inside the functions that load, so that checking a folder or a config does not pay for it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: we pass local_files_only too
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from kdlib.errors import ModelLoadError, ReaderError  # noqa: E402
from kdlib.runtime.fingerprints import MASKED_LM, TOKENIZER_FILES  # noqa: E402
from kdlib.runtime.jsonl import json_document, text_of  # noqa: E402

ModelTask = Literal["base", "masked_lm", "causal_lm", "sequence_classification"]
HEADS = (("ForMaskedLM", "masked_lm"), ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"),
         ("ForSequenceClassification", "sequence_classification"))  # class-name suffix -> ModelTask
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5")


@dataclass
class ModelConfig:
    """Where a model comes from and how to load it."""

    path: str  # a local folder, or package:<module> for a model shipped inside an installed package
    task: ModelTask = "base"  # which head to load: base encoder, masked_lm, causal_lm, sequence_classification
    trust_remote_code: bool = False  # run Python code shipped with the model folder (off: never by default)
    attn_implementation: Optional[Literal["eager", "sdpa"]] = None  # eager is needed to return attention maps

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ValueError("path: expected a folder or package:<module>, got an empty string")
        if self.path.startswith("package:") and not self.path[len("package:"):].strip():
            raise ValueError("path: expected package:<module>, got no module name")


def resolve_model_path(ref: str) -> Path:
    """Turn a folder path or `package:<module>` into an existing model folder."""
    if ref.startswith("package:"):
        module_name = ref[len("package:"):].strip()
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ModelLoadError(f"{ref}: package '{module_name}' is not installed ({err})") from None
        if hasattr(module, "get_model_path"):
            folder = Path(module.get_model_path())
        else:
            folder = Path(module.__file__).parent / "model"
    else:
        folder = Path(ref).expanduser()
    if folder.is_file():
        raise ModelLoadError(f"{ref}: {folder} is a file; expected a model folder (config.json + *.safetensors)")
    if not folder.is_dir():
        raise ModelLoadError(f"{ref}: model folder {folder} does not exist")
    return folder.resolve()


def check_model_folder(folder: Path) -> dict:
    """Refuse folders we cannot load safely; return the parsed config.json."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json, so this is not a transformers model folder")
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
        if pickles:
            raise ModelLoadError(
                f"{folder}: only pickle weights ({', '.join(pickles)}); we load safetensors only because "
                "unpickling runs arbitrary code. Convert once in a trusted environment with "
                "model.save_pretrained(folder, safe_serialization=True)."
            )
        raise ModelLoadError(f"{folder}: no *.safetensors weight file")
    try:
        return json_document(config_file, hint="")
    except ReaderError as err:
        raise ModelLoadError(str(err)) from None


def head_of(architecture: str) -> Optional[ModelTask]:
    """The task of one config.json `architectures` name: a head we load (HEADS), "base" for a bare model
    (`BertModel`, `LlamaModel`), None for any other head (multiple choice, token classification, question
    answering, pre-training, double heads ...), which loading as "base" would silently drop."""
    if not isinstance(architecture, str):
        return None
    for suffix, task in HEADS:
        if architecture.endswith(suffix):
            return task
    if architecture.endswith("Model") and not re.search(r"For[A-Z]|Head", architecture):
        return "base"
    return None


def architectures_of(model_config: dict) -> list:
    """config.json's `architectures` as a list (one name written as a string counts as a list of one)."""
    names = model_config.get("architectures") or []
    return [names] if isinstance(names, str) else list(names) if isinstance(names, list) else [names]


def task_of(model_config: dict) -> ModelTask:
    """The head a model folder was saved with, from config.json's `architectures` (base when it names none of
    HEADS; `head_of` tells a bare model from a head we do not know)."""
    for name in architectures_of(model_config):
        task = head_of(name)
        if task not in (None, "base"):
            return task
    return "base"


def task_folder(folder: Path, task: ModelTask) -> Path:
    """The folder `task`'s model loads from. A general student keeps its encoder at the top (what AutoModel and
    SentenceTransformer load with nothing missing or unexpected) and its whole masked-LM model in masked_lm/
    (kdlib.students.portable); any other folder holds one model."""
    head = folder / MASKED_LM
    return head if task == "masked_lm" and (head / "config.json").is_file() else folder


def saved_task(folder: Path, model_config: dict) -> ModelTask:
    """The head a model folder was saved with: its config.json's (`task_of`), or masked_lm for an encoder whose
    masked_lm/ subfolder holds the head."""
    task = task_of(model_config)
    return "masked_lm" if task == "base" and task_folder(folder, "masked_lm") != folder else task


def quiet_transformers() -> None:
    """Our own messages say what matters; transformers' load reports and bars only add noise."""
    from transformers.utils import logging as hf_logging  # ~1 s to import (module docstring)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _auto_class(task: ModelTask):
    import transformers  # ~1 s to import (module docstring)

    return {
        "base": transformers.AutoModel,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "causal_lm": transformers.AutoModelForCausalLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
    }[task]


def load_model(cfg: ModelConfig, *, allow_new_head: bool = False, dtype=None):
    """Load a model folder offline with safetensors. Returns the model in eval mode.

    A head whose weights are missing from the folder would be freshly random; that is refused
    unless `allow_new_head` (teacher preparation trains exactly such a head).
    """
    folder = task_folder(resolve_model_path(cfg.path), cfg.task)
    check_model_folder(folder)
    quiet_transformers()
    kwargs = dict(
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        output_loading_info=True,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = _auto_class(cfg.task).from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder}: cannot load as {cfg.task}: {err}") from None
    missing = list(info.get("missing_keys", []))
    if missing and not allow_new_head:
        hint = " (prepare a masked-LM teacher with `python -m teacher`)" if cfg.task == "masked_lm" else ""
        raise ModelLoadError(
            f"{folder}: {len(missing)} weights of the {cfg.task} model are not in the folder and would be random, "
            f"e.g. {', '.join(missing[:3])}{hint}"
        )
    if missing:
        print(f"{folder.name}: initialising {len(missing)} new {cfg.task} head weights ({', '.join(missing[:2])}, ...)")
    model.eval()
    return model


def load_tokenizer(ref: str, model_config: dict | None = None):
    """Load a fast tokenizer offline and check it fits the model's vocabulary."""
    from transformers import AutoTokenizer  # ~1 s to import (module docstring)

    folder = resolve_model_path(ref)
    for name in TOKENIZER_FILES:  # a bad byte named by file and line, not by the tokenizers library's traceback
        if not name.endswith(".model") and (folder / name).is_file():
            try:
                text_of(folder / name)
            except ReaderError as err:
                raise ModelLoadError(f"cannot load a tokenizer: {err}") from None
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder}: cannot load a tokenizer: {err}") from None
    if model_config is None and (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text())
    if model_config is not None:
        check_tokenizer_matches(tokenizer, model_config, folder)
    return tokenizer


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy every tokenizer file `source` has (the set the tokenizer fingerprint covers) into `target`."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def check_tokenizer_matches(tokenizer, model_config: dict, where: Path | str) -> None:
    """A tokenizer whose ids exceed the embedding table would index out of range: refuse it."""
    vocab_size = model_config.get("vocab_size")
    if vocab_size is None:
        return
    if len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            "they do not belong together"
        )
    special = [t for t in (tokenizer.mask_token_id, tokenizer.pad_token_id) if t is not None]
    if any(t >= vocab_size for t in special):
        raise ModelLoadError(f"{where}: special token ids {special} exceed the model's vocab_size {vocab_size}")
