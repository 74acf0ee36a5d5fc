"""Export the trained student as a plain Hugging Face folder that loads with no project code.

Weights come from the final checkpoint: for ZeRO 1-3 through DeepSpeed's own fp32 consolidation
(zero_to_fp32), which gathers every rank's partition of the fp32 master weights; for ZeRO 0 from
the module itself. They load into the class the student was built as (`student_config`: the
teacher's family, or MobileBERT for architecture=bottleneck). Projection weights (training-only)
are stripped; the tokenizer files are copied from the teacher folder. The folder loads everywhere
(kdlib.students.portable): a masked-LM student's encoder at the top and its whole masked-LM model in masked_lm/,
the weights `AutoModel` builds beyond the student's (BERT's pooler, which a *ForMaskedLM leaves out) added,
copied from the teacher where it has them, and a student of a
sentence-transformers teacher carries that library's files, set to the evaluation's mean pooling.
README.md is a model card: the student's shape, the teacher, the transfer set, the objectives, the held-out
evaluation at step 0 and at the exported weights' step (metrics.jsonl's own numbers), and the command that
made it.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from kdlib.config import to_dict
from kdlib.runtime.metrics import read_metrics
from kdlib.students.portable import Portable, save_portable
from kdlib.training.early_stop import EarlyStopping
from kdlib.training.checkpoints import consolidated_fp32_state_dict
from kdlib.runtime.io import atomic_directory
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
    evaluations = evaluation_rows(cfg, step, trained_state=module_state is not None)
    with atomic_directory(folder, replace=True) as tmp:  # inside the run folder this run holds the lock of
        portable = save_portable(model, tmp, setup.student_tokenizer_folder, setup.teacher_folder,
                                 setup.teacher_config, init=cfg.student.init, seed=cfg.seed)
        (tmp / "README.md").write_text(model_card(cfg, setup, step, model, portable, evaluations,
                                                  command_line(world_size=setup.place.world_size)))
    return folder


def command_line(argv: Optional[list[str]] = None, world_size: int = 1) -> str:
    """The command as the user typed it, shell-quoted: `python -m <stage>` for a stage's __main__.py (what a
    launcher runs on each rank too; its own `--local_rank` left out), else argv as it is."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]) if argv else Path("")
    words = ["python", "-m", head.parent.name] if head.name == "__main__.py" else argv[:1]
    rest, skip = [], False
    for word in argv[1:]:
        if skip:
            skip = False
        elif word in ("--local_rank", "--local-rank"):
            skip = True
        elif not word.startswith(("--local_rank=", "--local-rank=")):
            rest.append(word)
    line = shlex.join(words + rest)
    return line if world_size == 1 else f"{line}  # on each of {world_size} ranks (under torchrun, deepspeed or srun)"


def evaluation_rows(cfg, step: int, trained_state: bool) -> list[tuple[str, dict]]:
    """(label, held-out metrics) from the run's metrics.jsonl: step 0 (the student as initialised) and the step
    whose weights are exported (with early stopping and ZeRO 0 the best one, which the loop restored)."""
    evals = {r["step"]: r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl", kind="eval")}
    exported = step
    if cfg.early_stopping is not None and trained_state:
        stopper = EarlyStopping(cfg.early_stopping, Path(cfg.output_dir))
        for at in sorted(evals):
            if cfg.early_stopping.metric in evals[at]:
                stopper.update(evals[at], at)
        exported = stopper.best_step if stopper.best_step >= 0 else step
    rows = [("step 0 (as initialised)", evals[0])] if 0 in evals and exported != 0 else []
    if exported in evals:
        rows.append((f"step {exported} (exported)", evals[exported]))
    return [(label, {k: v for k, v in r.items() if k not in ("kind", "step")}) for label, r in rows]


def _evaluation(evaluations: list[tuple[str, dict]]) -> str:
    if not evaluations:
        return "No held-out evaluation was recorded for these weights (metrics.jsonl)."
    names = list(dict.fromkeys(k for _, r in evaluations for k in r))
    rows = "\n".join(f"| {label} | " + " | ".join(_number(r.get(k)) for k in names) + " |" for label, r in evaluations)
    return (f"Held-out rows of the transfer set (the last `eval_rows`, never trained on), against the teacher; the "
            f"run folder's metrics.jsonl (`kind: eval`) holds every evaluation.\n\n"
            f"| weights | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n{rows}")


def _number(value) -> str:
    return "n/a" if value is None else format(value, ".6g") if isinstance(value, float) else str(value)


def _portable(cfg, portable: Portable) -> str:
    lines = [_loading(cfg)]
    if portable.added:
        lines.append(f"`AutoModel.from_pretrained(folder)` misses no weight: {', '.join(f'`{k}`' for k in portable.added)} "
                     f"{portable.source}.")
    if portable.sentence_transformers:
        length = f", inputs cut at {portable.max_seq_length} tokens" if portable.max_seq_length else ""
        left = (f" The teacher's {', '.join(portable.left_out)} {'is' if len(portable.left_out) == 1 else 'are'} left "
                "out: the evaluation applies none (cosine similarity is the same).") if portable.left_out else ""
        lines.append("`sentence_transformers.SentenceTransformer(folder)` works as well: `encode(texts)` is the mean of the "
                     f"last hidden state over real tokens, the evaluation's pooled embedding{length}.{left}")
    return "\n\n".join(lines)


def model_card(cfg, setup, step: int, model: torch.nn.Module, portable: Optional[Portable] = None,
               evaluations: Optional[list] = None, command: str = "") -> str:
    params = sum(p.numel() for p in model.parameters())
    c = model.config
    shape = (f"{c.num_hidden_layers} layers, width {c.hidden_size}, {c.num_attention_heads} heads, feed-forward "
             f"{getattr(c, 'intermediate_size', None) or getattr(c, 'n_inner', None) or 4 * c.hidden_size}, "
             f"vocabulary {c.vocab_size}")
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
| architecture | {cfg.student.architecture} (`{type(model).__name__}`) |
| shape | {shape} |
| config hash | `{cfg.math_hash()}` |

## Evaluation

{_evaluation(evaluations or [])}

## Objectives

| loss | weight | params |
|---|---|---|
{objectives}

Layer map: `{json.dumps(to_dict(cfg.layer_map))}`

## Loading

{_portable(cfg, portable or Portable())}

## Command

```
{command or "(not recorded)"}
```
"""


def _loading(cfg) -> str:
    if student_task(cfg.teacher) == "causal_lm":
        return ("Load with `transformers.AutoModelForCausalLM.from_pretrained(folder)` and the tokenizer with "
                "`AutoTokenizer.from_pretrained(folder)`; `model.generate(...)` needs no project code.")
    return ("Load the encoder with `transformers.AutoModel.from_pretrained(folder)` and the masked-LM model with "
            "`AutoModelForMaskedLM.from_pretrained(folder, subfolder=\"masked_lm\")`; neither reports a missing or an "
            "unexpected weight (the masked-LM head lives in masked_lm/, which holds the whole model).")
