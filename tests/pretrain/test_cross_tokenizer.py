"""A student with its own tokenizer, distilled from a cached causal teacher: a GPT-2 teacher with a byte-level
BPE, a Llama student with a WordPiece, the transfer set built by the real pipeline with char_offsets.

Values, not "it ran": every aligned position of a batch closes the same characters in both tokenizations and
carries exactly the teacher's cached values from the matching teacher position; the run's uld and total
loss fall; the export loads with plain transformers and the student's own tokenizer; objectives that read the
teacher's ids and sets without offsets are refused, naming the field.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdlib.cache import TransferSet
from kdlib.config import from_dict
from kdlib.errors import ConfigError
from kdlib.runtime.metrics import read_metrics
from kdlib.training.cross_tokenizer import AlignedBatches
from pretrain.config import PretrainConfig
from pretrain.validate import validate
from tests.causal_fixture import build_causal_set, causal_config
from tests.data_pipeline.test_pipeline import run_pipeline
from tests.tiny_models import make_tiny_decoder
from tests.transfer_fixture import run_pretrain, stage_env, write_config

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

STUDENT = {"student.config": None, "student.tokenizer": None, "student.num_layers": 2, "student.init": "random"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The trained fixture teacher, its char_offsets transfer set from the real pipeline, a WordPiece Llama."""
    root = tmp_path_factory.mktemp("cross")
    causal = build_causal_set(root / "fixture", family="gpt2", rows=64)
    transfer = root / "transfer"
    run_pipeline(root, {
        "teacher": {"path": str(causal["teacher"]), "task": "causal_lm"}, "output_dir": str(transfer),
        "corpus": {"kind": "wikipedia_xml", "max_documents": 3}, "max_length": 32, "min_length": 8,
        "char_offsets": True, "teacher_outputs": {"top_k": 8, "fidelity_positions": 64}, "num_shards": 2,
        "pack_groups": 2, "batch_size": 32, "torch_threads": 1})
    student = make_tiny_decoder(root / "student", family="llama", tokenizer="wordpiece", layers=2, seed=5)
    paths = {"teacher": causal["teacher"], "transfer": transfer, "offsetless": causal["transfer"]}
    return paths, str(student)


def cross_config(world, out, **overrides) -> dict:
    paths, student = world
    settings = {**STUDENT, "student.config": student, "student.tokenizer": student,
                "objectives": [{"name": "uld"}, {"name": "next_token_ce", "weight": 0.5}], **overrides}
    return causal_config(paths, out, **settings)


def nonspace(text: str) -> str:
    return "".join(c for c in text if not c.isspace())


def test_aligned_positions_close_the_same_characters_and_carry_the_teachers_values(world):
    from transformers import AutoTokenizer

    paths, student = world
    tokenizer = AutoTokenizer.from_pretrained(student)
    ts = TransferSet(paths["transfer"])
    teacher = ts.batch(list(range(16)), pad_id=0, text=True)
    aligner = AlignedBatches(tokenizer, max_length=128)
    batch = aligner(teacher)
    checked = 0
    for b in range(16):
        text, offsets = teacher["texts"][b], teacher["char_offsets"][b]
        # the student's ids: each document piece of the text encoded alone, its eos between pieces
        cuts = [0, *teacher["text_breaks"][b].tolist(), len(text)]
        ids, spans = [], []
        for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
            if i:
                ids.append(tokenizer.eos_token_id)
                spans.append((start, start))
            enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            spans += [(start + x, start + y) for x, y in enc["offset_mapping"]]
        assert batch["input_ids"][b, :len(ids)].tolist() == ids and int(batch["attention_mask"][b].sum()) == len(ids)
        # each aligned student position ends the same characters as a teacher token, whose values it holds: the
        # last teacher token with content ending there (several byte pieces of one character share its end)
        teacher_ends = {nonspace(text[:end]): t for t, (start, end) in enumerate(offsets.tolist())
                        if nonspace(text[start:end])}
        for s in batch["aligned_mask"][b].nonzero().squeeze(-1).tolist():
            t = teacher_ends[nonspace(text[:spans[s][1]])]
            assert torch.equal(batch["topk_logits"][b, s], teacher["topk_logits"][b, t])
            assert batch["teacher_lse"][b, s] == teacher["teacher_lse"][b, t]
            assert batch["aligned_teacher_top1"][b, s] == teacher["topk_ids"][b, t, 0]
            checked += 1
    assert checked == int(batch["aligned_mask"].sum()) > 100
    assert 0.3 < aligner.aligned_fraction < 1.0  # most student positions close a common span, not all


def test_a_cross_tokenizer_run_learns_and_exports_the_student_with_its_own_tokenizer(world, tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(write_config(cross_config(world, out, steps=30, checkpoint_every=100), tmp_path / "c.yaml"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    train = read_metrics(out / "metrics.jsonl")
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    for key, factor in (("uld", 0.8), ("loss", 0.9)):  # 30 steps of a random student: the total falls ~15%
        first, last = np.mean([r[key] for r in train[:3]]), np.mean([r[key] for r in train[-3:]])
        assert last < factor * first, (key, first, last)
    assert evals[-1]["perplexity"] < evals[0]["perplexity"] and evals[-1]["top1_agreement"] > evals[0]["top1_agreement"]
    script = ("import sys, json\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "ids = m.generate(**t('the city', return_tensors='pt'), max_new_tokens=4, do_sample=False)\n"
              "print(json.dumps({'class': type(m).__name__, 'vocab': m.config.vocab_size, 'tokens': len(t),"
              " 'unk': t.unk_token, 'new': ids.shape[1]}))\n")
    env = {k: v for k, v in stage_env().items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script, str(out / "export")], cwd="/", env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"] == "LlamaForCausalLM" and result["vocab"] == result["tokens"] == 512
    assert result["unk"] == "[UNK]"  # the student's WordPiece, not the teacher's byte-level BPE


@pytest.mark.parametrize("overrides, field, words", [
    ({"objectives": [{"name": "kd_topk"}]}, "objectives[0]", "mean nothing to a student with its own tokenizer"),
    ({"objectives": [{"name": "uld"}], "transfer_set": "OFFSETLESS"}, "transfer_set", "char_offsets: true"),
    ({"online_teacher": True}, "online_teacher", "cached, aligned teacher outputs"),
])
def test_what_cannot_cross_tokenizers_is_refused_naming_the_field(world, tmp_path, overrides, field, words):
    if overrides.get("transfer_set") == "OFFSETLESS":
        overrides = {**overrides, "transfer_set": str(world[0]["offsetless"])}
    cfg = from_dict(PretrainConfig, cross_config(world, tmp_path / "run", **overrides))
    with pytest.raises(ConfigError, match=f"field {re.escape(repr(field))}.*{words}"):
        validate(cfg, "cross.yaml")
