"""A student folder that loads everywhere: with `transformers.AutoModel` and, when its teacher is a
sentence-transformers model, with `SentenceTransformer(folder)`, with nothing missing, nothing unexpected and nothing
random (transformers 5 prints a load report for any of those); and its masked-LM model with
`AutoModelForMaskedLM.from_pretrained(folder, subfolder="masked_lm")`, just as clean.

`save_portable` writes a masked-LM student in two parts: its encoder at the top and its whole self (head included)
in masked_lm/. One folder cannot serve both: AutoModel reports a head it does not build (`cls.predictions.*`, as for
bert-base-uncased) and AutoModelForMaskedLM a pooler it does not build. So the encoder's weights are stored twice,
the price of two clean loads. Our own loaders take masked_lm/ whenever they load a masked LM
(kdlib.runtime.models.task_folder), and the model fingerprint covers it.
A causal student (GPT-2, Llama) is saved whole at the top: AutoModelForCausalLM is how it is used.

The encoder lacks what its task model leaves out: BertForMaskedLM builds BERT without the pooler, so AutoModel would
report `pooler.*` missing and draw them at random. `add_portable` writes, beside the student's own weights,
whatever AutoModel builds for the student's config that the student lacks, from the first source that has it:

1. the teacher's weights (a bare encoder's `pooler.*` or a BERT checkpoint's `bert.pooler.*`), of the student's
   shape; for init=svd's narrower student, compressed into the basis its layers were (U^T W U and U^T b,
   kdlib.students.width);
2. the encoder the teacher was made from, when the teacher folder names one (`python -m teacher`'s
   teacher_report.json: the demo's masked-LM teacher is all-MiniLM-L6-v2's frozen encoder plus a trained head)
   and holds every base-model weight of the teacher, equal;
3. otherwise AutoModel's own initialisation under the run's seed: what loading would have drawn, but fixed,
   and named in the model card.

The sentence-transformers files come when the teacher (or that encoder) has a modules.json: Transformer +
mean Pooling over the student's width, which is exactly the evaluation's pooled embedding (the last hidden state
averaged over real tokens: evaluate/scores.py, kdlib.training.internals.pool). The teacher's later modules
(Normalize, Dense) are left out because the evaluation applies none; cosine similarity is unchanged by the
Normalize. max_seq_length (capped at the student's positions) and do_lower_case are the teacher's; its prompts
are kept, none applied by default. Files use the classic layout, which sentence-transformers 2 to 6 all read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdlib.errors import KDError
from kdlib.runtime.fingerprints import MASKED_LM
from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.models import copy_tokenizer_files, head_of, resolve_model_path
from kdlib.students.width import residual_basis

TEACHER_REPORT = "teacher_report.json"  # python -m teacher: {"encoder": the folder its masked-LM teacher was made from}
INDEX = "model.safetensors.index.json"
EXTRA_SHARD = "model-base-extras.safetensors"  # a sharded save: the added weights go to a shard of their own
_SQUARE = re.compile(r"pooler\.dense\.(weight|bias)$")  # reads and writes the residual stream: U^T W U, U^T b


@dataclass
class Portable:
    """What `add_portable` wrote, for the model card."""

    added: list[str] = field(default_factory=list)  # weight names added to the student's (export naming)
    source: str = ""  # where they came from, one line
    sentence_transformers: bool = False  # the sentence-transformers files were written
    max_seq_length: Optional[int] = None  # their truncation length
    left_out: list[str] = field(default_factory=list)  # the teacher's sentence-transformers modules not carried


def _weights(folder: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def base_prefix(config, default: str) -> str:
    """`bert.`: how a task model of `config`'s family names its base model's weights (`default` for a family
    transformers does not map)."""
    try:
        return transformers.AutoModel._model_mapping[type(config)].base_model_prefix + "."
    except KeyError:
        return default


def base_part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A checkpoint's base-model weights by base-model name: a task model's `bert.*` without the prefix (its head
    left out), or all of a bare encoder's."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def base_model_shapes(config) -> dict[str, torch.Size]:
    """Every weight `transformers.AutoModel` builds for `config` (on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        base = transformers.AutoModel.from_config(config)
    return {k: v.shape for k, v in base.state_dict().items()}


def missing_base_weights(model) -> dict[str, torch.Size]:
    """The base-model weights AutoModel would build that `model` (a task model) has not, by base-model name."""
    prefix = model.base_model_prefix + "."
    own = {k[len(prefix):] for k in model.state_dict() if k.startswith(prefix)}
    return {k: s for k, s in base_model_shapes(model.config).items() if k not in own}


def teacher_origin(teacher_folder: Path, teacher: dict[str, Tensor], prefix: str):
    """(folder, its base-model weights) of the encoder the teacher was made from (its teacher_report.json), when
    every base-model weight of the teacher is in it and equal: then that encoder's pooler and files are the
    teacher's own. None otherwise (no report, a folder that moved or changed)."""
    try:
        encoder = json.loads((teacher_folder / TEACHER_REPORT).read_text())["encoder"]
        folder = resolve_model_path(str(encoder))
    except (OSError, ValueError, KeyError, TypeError, KDError):
        return None
    if folder == teacher_folder.resolve() or not teacher or not any(folder.glob("*.safetensors")):
        return None
    theirs = base_part(_weights(folder), prefix)
    if any(k not in theirs or theirs[k].shape != v.shape or not torch.equal(theirs[k], v) for k, v in teacher.items()):
        return None
    return folder, theirs


def _compressed(value: Tensor, shape: torch.Size, teacher: dict[str, Tensor]) -> Tensor:
    """init=svd: the teacher's square weight in the student's basis (the one its layers were compressed into)."""
    basis = residual_basis(teacher, shape[0])
    return basis.T @ value.double() @ basis if value.ndim == 2 else basis.T @ value.double()


def base_model_extras(model, missing: dict[str, torch.Size], sources: list, *, init: str, seed: int,
                      prefix: str) -> tuple[dict[str, Tensor], str]:
    """{export name (`prefix` + base-model name): tensor} for the `missing` base-model weights, and where they came
    from: the first of `sources` ([(folder, base-model weights)], the teacher's first) that has them all (see the
    top), else a seeded init."""
    if not missing:
        return {}, ""
    dtype = next(model.parameters()).dtype
    for n, (folder, state) in enumerate(sources):
        if not all(k in state for k in missing):
            continue
        origin = " (the encoder the teacher was made from, whose weights the teacher shares)" if n else ""
        if all(state[k].shape == shape for k, shape in missing.items()):
            return {prefix + k: state[k].to(dtype).contiguous() for k in missing}, f"copied from `{folder}`{origin}"
        if init == "svd" and all(_SQUARE.search(k) for k in missing):
            teacher = sources[0][1]
            return ({prefix + k: _compressed(state[k], shape, teacher).to(dtype).contiguous()
                     for k, shape in missing.items()},
                    f"compressed from `{folder}`{origin} into the student's width (init=svd's basis: U^T W U)")
    with torch.random.fork_rng(devices=[]):  # the run's own random stream is untouched
        torch.manual_seed(seed)
        fresh = transformers.AutoModel.from_config(model.config).state_dict()
    return ({prefix + k: fresh[k].to(dtype).contiguous() for k in missing},
            f"initialised as `AutoModel` would (seed {seed}), untrained: the teacher has no such weights")


def add_weights(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Add `tensors` to a saved model folder (model.safetensors, or a shard of their own in a sharded save)."""
    if not tensors:
        return
    index = folder / INDEX
    if index.is_file():
        save_file(tensors, str(folder / EXTRA_SHARD), metadata={"format": "pt"})
        doc = json.loads(index.read_text())
        doc["weight_map"].update({k: EXTRA_SHARD for k in tensors})
        atomic_write_text(index, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    state = load_file(str(path))
    state.update(tensors)
    save_file(state, str(path), metadata=metadata)


def _json(path: Path) -> Optional[object]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pooling_mode(config: dict) -> str:
    """A Pooling config's mode, in either layout (`pooling_mode`, or sentence-transformers < 6's flags)."""
    if isinstance(config.get("pooling_mode"), str):
        return config["pooling_mode"]
    flags = [k[len("pooling_mode_"):].removesuffix("_tokens").removesuffix("_token")
             for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    return "+".join(flags) or "mean"


def sentence_files(folders: list[Path], model) -> tuple[dict[str, str], Portable]:
    """{relative path: text} of the sentence-transformers files for `model` (mean pooling, see the top), from the
    first of `folders` with a modules.json; ({}, Portable()) when none has one."""
    source = next((f for f in folders if isinstance(_json(f / "modules.json"), list)), None)
    if source is None:
        return {}, Portable()
    modules = [m for m in _json(source / "modules.json") if isinstance(m, dict)]
    kinds = [(str(m.get("type", "?")).rsplit(".", 1)[-1], str(m.get("path") or ".")) for m in modules]
    left_out = [f"{kind} ({path})" for kind, path in kinds if kind not in ("Transformer", "Pooling")]
    for kind, path in kinds:
        theirs = _json(source / path / "config.json") if kind == "Pooling" else None
        mode = _pooling_mode(theirs) if isinstance(theirs, dict) else "mean"
        if mode != "mean":
            left_out.append(f"{mode} pooling ({path}: the student pools by mean)")
    bert = _json(source / "sentence_bert_config.json")
    bert = bert if isinstance(bert, dict) else {}
    length = bert.get("max_seq_length")
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(length, int) and isinstance(positions, int):
        length = min(length, positions)
    settings = {k: v for k, v in (("max_seq_length", length if isinstance(length, int) else None),
                                  ("do_lower_case", bool(bert.get("do_lower_case", False)))) if v is not None}
    extra = _json(source / "config_sentence_transformers.json")
    extra = dict(extra) if isinstance(extra, dict) else {}
    extra["default_prompt_name"] = None  # encode(texts) = the evaluation's pooling, with no prompt prepended
    pooling = {"word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
        "sentence_bert_config.json": settings, "config_sentence_transformers.json": extra,
        "1_Pooling/config.json": pooling}
    text = {name: json.dumps(doc, indent=2) + "\n" for name, doc in files.items()}
    return text, Portable(sentence_transformers=True, max_seq_length=settings.get("max_seq_length"), left_out=left_out)


def splits_head(model) -> bool:
    """A masked-LM student: saved as its encoder at the top and its whole self in masked_lm/ (see the top)."""
    return head_of(type(model).__name__) == "masked_lm" and model.base_model is not model


def save_portable(model, folder: Path, tokenizer_folder: Path, teacher_folder: Path, teacher_config, *, init: str,
                  seed: int) -> Portable:
    """Save `model` and its tokenizer files into `folder` (a staging folder) so that it loads everywhere (see the
    top); returns what was added, for the model card."""
    folder = Path(folder)
    if splits_head(model):
        architectures = model.config.architectures
        model.save_pretrained(folder / MASKED_LM, safe_serialization=True)
        copy_tokenizer_files(tokenizer_folder, folder / MASKED_LM)
        model.base_model.save_pretrained(folder, safe_serialization=True)  # writes architectures [BertModel] ...
        model.config.architectures = architectures  # ... into the config the two share: put it back
    else:
        model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer_files(tokenizer_folder, folder)
    return add_portable(folder, model, teacher_folder, teacher_config, init=init, seed=seed)


def add_portable(folder: Path, model, teacher_folder: Path, teacher_config, *, init: str, seed: int) -> Portable:
    """After `save_portable`'s save (the encoder of a masked-LM `model`, else `model` whole): add what AutoModel lacks
    and the sentence-transformers files; returns what was written, for the model card. The teacher's weights are
    read only when something is missing or the teacher names the encoder it was made from."""
    teacher_folder = Path(teacher_folder)
    missing = missing_base_weights(model)
    sources: list = []
    if missing or (teacher_folder / TEACHER_REPORT).is_file():
        prefix = base_prefix(teacher_config, default=model.base_model_prefix + ".")
        sources.append((teacher_folder, base_part(_weights(teacher_folder), prefix)))
        origin = teacher_origin(teacher_folder, sources[0][1], prefix)
        if origin is not None:
            sources.append(origin)
    named = "" if splits_head(model) else model.base_model_prefix + "."  # the folder holds the encoder, or the task model
    extras, source = base_model_extras(model, missing, sources, init=init, seed=seed, prefix=named)
    add_weights(folder, extras)
    files, done = sentence_files([teacher_folder] + [f for f, _ in sources[1:]], model)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / name, text)
    done.added, done.source = sorted(extras), source
    return done
