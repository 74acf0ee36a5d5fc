"""Export the trained student as a plain Hugging Face folder that loads with no project code.

Weights come from the final checkpoint: for ZeRO 1-3 through DeepSpeed's own fp32 consolidation
(zero_to_fp32), which gathers every rank's partition of the fp32 master weights; for ZeRO 0 from
the module itself. They load into the class the student was built as (`student_config`: the
teacher's family, or MobileBERT for architecture=bottleneck). Projection weights (training-only)
are stripped; the tokenizer files are copied from the teacher folder; README.md is a model card
naming the teacher, the transfer set, the objectives and the steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlib.config import to_dict
from kdlib.training.checkpoints import consolidated_fp32_state_dict
from kdlib.runtime.io import atomic_directory
from kdlib.runtime.models import copy_tokenizer_files
from kdlib.training.export import student_state_dict
from kdlib.students.shape import student_config
from pretrain.student import student_class, student_task


def export_student(cfg, setup, checkpoint_folder: Path, module_state: dict | None, folder: Path, step: int) -> Path:
    """Write config.json, model.safetensors, tokenizer files and README.md into `folder` (rank 0 only)."""
    full = module_state if module_state is not None else consolidated_fp32_state_dict(checkpoint_folder)
    state = student_state_dict(full)
    model = student_class(cfg.teacher).from_config(student_config(setup.teacher_config, cfg.student))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"export: weights do not fit the student (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    with atomic_directory(folder, replace=True) as tmp:  # inside the run folder this run holds the lock of
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(setup.student_tokenizer_folder, tmp)
        (tmp / "README.md").write_text(model_card(cfg, setup, step, model))
    return folder


def model_card(cfg, setup, step: int, model: torch.nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    objectives = "\n".join(f"| `{o.name}` | {o.weight} | `{json.dumps(o.params)}` |" for o in cfg.objectives)
    return f"""# Distilled student ({model.config.model_type}, {cfg.student.num_layers} layers, {params:,} parameters)

General-distillation student trained by `python -m pretrain` (knowledge distillation from a cached
transfer set{' plus an online teacher' if cfg.online_teacher else ''}).

| | |
|---|---|
| teacher | `{cfg.teacher.path}` |
| teacher fingerprint (sha256 of weights + config.json) | `{setup.teacher_fingerprint}` |
| tokenizer fingerprint | `{setup.tokenizer_fingerprint}` |
| transfer set | `{cfg.transfer_set}` |
| transfer-set manifest sha256 | `{setup.manifest_sha256}` |
| optimizer steps | {step} |
| global batch (sequences) | {cfg.engine.global_batch_for(setup.place.world_size)} |
| initialisation | {cfg.student.init} |
| architecture | {cfg.student.architecture} (width {model.config.hidden_size}) |
| config hash | `{cfg.math_hash()}` |

## Objectives

| loss | weight | params |
|---|---|---|
{objectives}

Layer map: `{json.dumps(to_dict(cfg.layer_map))}`

{_loading(cfg)}
"""


def _loading(cfg) -> str:
    if student_task(cfg.teacher) == "causal_lm":
        return ("Load with `transformers.AutoModelForCausalLM.from_pretrained(folder)` and the tokenizer with "
                "`AutoTokenizer.from_pretrained(folder)`; `model.generate(...)` needs no project code.")
    return "Load with `transformers.AutoModelForMaskedLM.from_pretrained(folder)` (or `AutoModel` for the encoder)."
