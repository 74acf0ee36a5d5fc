"""Students that load everywhere (issue 32, item 5): the export's top is the encoder, which `AutoModel` and
`SentenceTransformer` load with no load report (nothing missing or unexpected), and masked_lm/ the whole masked-LM
model, which `AutoModelForMaskedLM(subfolder="masked_lm")` loads as cleanly; the encoder holds what `AutoModel`
builds beyond a masked-LM student (BERT's pooler), copied from the teacher, or from the encoder the teacher was
made from, or else initialised under the run's seed; a student of a sentence-transformers teacher carries that library's files, and
`SentenceTransformer(export).encode` is the evaluation's mean pooling; the model card holds the held-out
evaluation (metrics.jsonl's numbers) and the command.

The unit tests build tiny students directly; the run tests train one in-process rank (ZeRO 0) on the shared tiny
transfer set, under a teacher that is a sentence-transformers folder (a) itself, (b) through the
teacher_report.json of `python -m teacher` (the demo's path: all-MiniLM-L6-v2 plus a trained head).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from evaluate.scores import pooled
from kdlib.cache import read_manifest, write_manifest
from kdlib.config import from_dict
from kdlib.runtime.fingerprints import model_fingerprint
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.models import ModelConfig
from kdlib.schemas import StudentConfig
from kdlib.students.portable import TEACHER_REPORT, base_part, save_portable
from kdlib.students.width import residual_basis
from pretrain.config import PretrainConfig
from pretrain.export import command_line
from pretrain.init_export import export_init
from pretrain.student import build_student
from pretrain.train import train
from pretrain.validate import validate
from tests.tiny_models import make_tiny_bert
from tests.transfer_fixture import base_config, build_transfer_set, free_port

POOLER = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")  # in a masked-LM teacher with a pooler
EXPORTED = ("pooler.dense.weight", "pooler.dense.bias")  # the same in the export's encoder
TEXTS = ["the government said on tuesday", "police in sydney were searching for a man after the fire in the city",
         "hi", "a storm hit the coast and thousands of people were left without power for days"]
ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
              {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
              {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def write_st_files(folder: Path, width: int, cls: bool = False) -> None:
    """A sentence-transformers teacher's files as all-MiniLM-L6-v2 ships them (`cls`: pooling the first token
    instead), plus a default prompt (which the export must not apply: the evaluation pools the bare text)."""
    (folder / "modules.json").write_text(json.dumps(ST_MODULES))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": "query", "similarity_fn_name": "cosine"}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": width, "pooling_mode_cls_token": cls, "pooling_mode_mean_tokens": not cls}))


def add_pooler(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """Give a saved BertForMaskedLM a pooler (as bert-base-uncased's checkpoint has one); returns it."""
    state = load_file(str(folder / "model.safetensors"))
    width = state["bert.embeddings.word_embeddings.weight"].shape[1]
    gen = torch.Generator().manual_seed(seed)
    pooler = {POOLER[0]: torch.randn(width, width, generator=gen), POOLER[1]: torch.randn(width, generator=gen)}
    save_file({**state, **pooler}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return pooler


def encoder_with_pooler(teacher: Path, folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """What `python -m teacher` starts from: a bare encoder (BertModel naming) whose every weight the masked-LM
    teacher shares, plus a pooler and the sentence-transformers files; returns the pooler."""
    shutil.copytree(teacher, folder)
    (folder / "model.safetensors").unlink()
    state = base_part(load_file(str(teacher / "model.safetensors")), "bert.")
    gen = torch.Generator().manual_seed(seed)
    width = state["embeddings.word_embeddings.weight"].shape[1]
    pooler = {"pooler.dense.weight": torch.randn(width, width, generator=gen),
              "pooler.dense.bias": torch.randn(width, generator=gen)}
    save_file({**state, **pooler}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    write_st_files(folder, width)
    return pooler


def save_student(model, teacher: Path, out: Path, init: str, seed: int = 0):
    out.mkdir(parents=True)
    return save_portable(model, out, teacher, teacher, AutoConfig.from_pretrained(str(teacher)), init=init, seed=seed)


@contextmanager
def no_warnings():
    """Fails when transformers, sentence-transformers or `warnings` report anything at WARNING or above inside (a
    load report is a warning), with transformers' verbosity set to warning for the while (our loaders quiet it)."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger("transformers"), logging.getLogger("sentence_transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    hf_logging.set_verbosity_warning()
    loggers[1].setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert not records and not caught, [r.getMessage()[:300] for r in records] + [str(w.message) for w in caught]


def loading_info(folder: Path, cls=AutoModel, **kwargs):
    with no_warnings():
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    return model.eval(), info


def assert_loads_whole(folder: Path) -> torch.nn.Module:
    """AutoModel on the folder and AutoModelForMaskedLM on its masked_lm/: nothing missing, unexpected or mismatched,
    and no warning; the two share every encoder weight. Returns the AutoModel."""
    base, info = loading_info(folder)
    assert not any(info.values()), info
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]
    mlm, info = loading_info(folder, AutoModelForMaskedLM, subfolder="masked_lm")
    assert not any(info.values()), info
    theirs = mlm.base_model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in base.state_dict().items() if not k.startswith("pooler."))
    return base


def assert_encodes_as_the_evaluation_pools(folder: Path) -> None:
    """SentenceTransformer(folder).encode == evaluate.scores.pooled (float64 mean of the last hidden state over real
    tokens) of the same model, within float32 rounding: T tokens summed in float32 err by <= T eps |h|max."""
    from sentence_transformers import SentenceTransformer  # the interop under test; ~4 s to import

    with no_warnings():
        st = SentenceTransformer(str(folder), device="cpu")
    got = torch.from_numpy(st.encode(TEXTS, batch_size=2)).double()  # batches of 2: other padding than below
    tokens = AutoTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(str(folder)).eval()
    want = pooled(model, tokens["input_ids"], tokens["attention_mask"])
    with torch.no_grad():
        hidden = model(**{k: tokens[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    tol = 4 * tokens["input_ids"].shape[1] * torch.finfo(torch.float32).eps * float(hidden.abs().max())
    assert got.shape == want.shape and float((got - want).abs().max()) <= tol, (float((got - want).abs().max()), tol)
    cls = hidden[:, 0].double()
    assert float((got - cls).abs().max()) > 100 * tol  # mean pooling, not the first token
    assert float((got.norm(dim=1) - 1).abs().max()) > 0.1  # not normalised: the evaluation does not normalise


# ---------------------------------------------------------------- unit tests: no training


def test_a_student_of_a_teacher_without_a_pooler_gets_a_seeded_one_and_no_sentence_files(tmp_path):
    teacher = make_tiny_bert(tmp_path / "teacher", layers=4)
    config = AutoConfig.from_pretrained(str(teacher))
    model = build_student(ModelConfig(path=str(teacher)), config, StudentConfig(num_layers=2, init="every_other"), 0)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    done = save_student(model, teacher, tmp_path / "a", "every_other", seed=7)
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    assert done.added == sorted(EXPORTED) and "seed 7" in done.source and not done.sentence_transformers
    assert not (tmp_path / "a" / "modules.json").exists()
    base = assert_loads_whole(tmp_path / "a")
    again = save_student(model, teacher, tmp_path / "b", "every_other", seed=7)
    assert again.added == done.added
    first, second = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in EXPORTED)  # the same seed, the same pooler
    assert torch.equal(base.pooler.dense.weight, first[EXPORTED[0]])
    # what AutoModel's own init draws: normal(0, initializer_range) weights, zero bias
    assert float(first[EXPORTED[1]].abs().max()) == 0.0
    assert abs(float(first[EXPORTED[0]].std()) - config.initializer_range) < 0.3 * config.initializer_range


def test_a_student_of_a_sentence_transformers_teacher_takes_its_pooler_and_encodes_as_the_evaluation(tmp_path):
    teacher = make_tiny_bert(tmp_path / "teacher", layers=4)
    pooler = add_pooler(teacher, seed=3)
    write_st_files(teacher, 32, cls=True)
    model = build_student(ModelConfig(path=str(teacher)), AutoConfig.from_pretrained(str(teacher)),
                          StudentConfig(num_layers=2, init="every_other"), 0)
    done = save_student(model, teacher, tmp_path / "out", "every_other")
    assert done.sentence_transformers and done.max_seq_length == 128  # the teacher's 256, capped at 128 positions
    assert done.left_out == ["Normalize (2_Normalize)", "cls pooling (1_Pooling: the student pools by mean)"]
    assert f"copied from `{teacher}`" == done.source
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(weights[e], pooler[k]) for k, e in zip(POOLER, EXPORTED))
    assert_loads_whole(tmp_path / "out")
    assert_encodes_as_the_evaluation_pools(tmp_path / "out")


def test_the_encoder_a_teacher_was_made_from_lends_its_pooler_and_files(tmp_path):
    teacher = make_tiny_bert(tmp_path / "teacher", layers=4)
    pooler = encoder_with_pooler(teacher, tmp_path / "encoder", seed=1)
    (teacher / TEACHER_REPORT).write_text(json.dumps({"encoder": str(tmp_path / "encoder")}))
    model = build_student(ModelConfig(path=str(teacher)), AutoConfig.from_pretrained(str(teacher)),
                          StudentConfig(num_layers=2, init="every_other"), 0)
    done = save_student(model, teacher, tmp_path / "out", "every_other")
    assert "the encoder the teacher was made from" in done.source and done.sentence_transformers
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in pooler.items())
    assert_loads_whole(tmp_path / "out")
    assert_encodes_as_the_evaluation_pools(tmp_path / "out")


def test_a_narrower_svd_student_gets_the_teachers_pooler_in_its_basis(tmp_path):
    teacher = make_tiny_bert(tmp_path / "teacher", layers=4)
    pooler = add_pooler(teacher, seed=3)
    config = AutoConfig.from_pretrained(str(teacher))
    shape = StudentConfig(num_layers=2, init="svd", hidden_size=16, num_attention_heads=2, intermediate_size=32)
    model = build_student(ModelConfig(path=str(teacher)), config, shape, 0)
    done = save_student(model, teacher, tmp_path / "out", "svd")
    assert done.added == sorted(EXPORTED) and "compressed" in done.source
    basis = residual_basis(base_part(load_file(str(teacher / "model.safetensors")), "bert."), 16).numpy()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    w, b = pooler[POOLER[0]].double().numpy(), pooler[POOLER[1]].double().numpy()
    np.testing.assert_allclose(got[EXPORTED[0]].double().numpy(), basis.T @ w @ basis, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[EXPORTED[1]].double().numpy(), basis.T @ b, rtol=0, atol=1e-6)
    assert_loads_whole(tmp_path / "out")


def test_an_encoder_that_is_not_the_teachers_lends_nothing(tmp_path):
    """teacher_report.json names an encoder, but one weight differs from the teacher's: neither its pooler nor its
    sentence-transformers files are taken."""
    teacher = make_tiny_bert(tmp_path / "teacher", layers=4)
    origin = tmp_path / "encoder"
    encoder_with_pooler(teacher, origin, seed=1)
    state = load_file(str(origin / "model.safetensors"))
    state["encoder.layer.0.output.dense.bias"] = state["encoder.layer.0.output.dense.bias"] + 1e-3
    save_file(state, str(origin / "model.safetensors"), metadata={"format": "pt"})
    (teacher / TEACHER_REPORT).write_text(json.dumps({"encoder": str(origin)}))
    model = build_student(ModelConfig(path=str(teacher)), AutoConfig.from_pretrained(str(teacher)),
                          StudentConfig(num_layers=2, init="every_other"), 0)
    done = save_student(model, teacher, tmp_path / "out", "every_other")
    assert "seed 0" in done.source and not done.sentence_transformers


def test_the_command_is_the_one_typed_and_shell_quoted():
    argv = ["/repo/pretrain/__main__.py", "--local_rank=1", "--config", "my runs/a.yaml", "--set", "steps=2",
            "--local-rank", "0"]
    assert command_line(argv) == "python -m pretrain --config 'my runs/a.yaml' --set steps=2"
    assert command_line(argv, world_size=2).startswith("python -m pretrain --config 'my runs/a.yaml' --set steps=2  # ")
    assert command_line(["pytest", "-k", "a b"]) == "pytest -k 'a b'"


# ---------------------------------------------------------------- a real run: one in-process rank, ZeRO 0


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("portable"), rows=192, teacher_steps=30)


def st_teacher(paths: dict, root: Path) -> tuple[dict, dict]:
    """(a) The fixture's teacher as a sentence-transformers folder with a pooler, and the transfer set's manifest
    re-signed for it (the pooler changes the weights' fingerprint, not a cached value)."""
    teacher, transfer = root / "st_teacher", root / "st_transfer"
    shutil.copytree(paths["teacher"], teacher)
    shutil.copytree(paths["transfer"], transfer)
    pooler = add_pooler(teacher, seed=11)
    write_st_files(teacher, 32)
    manifest = read_manifest(transfer)
    manifest.teacher = {**manifest.teacher, "fingerprint": model_fingerprint(teacher)}
    write_manifest(transfer, manifest)
    return {"teacher": teacher, "transfer": transfer}, pooler


def run_in_process(paths: dict, out: Path, monkeypatch, argv: list[str], **overrides):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setattr(sys, "argv", argv)
    settings = {"steps": 2, "engine.zero_stage": 0, "engine.grad_accum": 1, "student.init": "every_other",
                "eval_rows": 32, **overrides}
    cfg = from_dict(PretrainConfig, base_config(paths, out, **settings))
    setup = validate(cfg, "test")
    assert train(cfg, setup) == 0
    return cfg, setup


def card_rows(card: str) -> dict[str, dict[str, float]]:
    """The evaluation table of a model card: {row label: {metric: value}}."""
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    names = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(names, map(float, cells[1:])))
    return rows


@pytest.mark.slow
def test_a_student_of_a_sentence_transformers_teacher_loads_everywhere(fixture_paths, tmp_path, monkeypatch):
    paths, pooler = st_teacher(fixture_paths, tmp_path)
    out = tmp_path / "run"
    argv = [str(Path(__file__).parents[2] / "pretrain" / "__main__.py"), "--config", "my runs/st.yaml", "--set",
            "steps=2"]
    run_in_process(paths, out, monkeypatch, argv)
    folder = out / "export"
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(weights[e], pooler[k]) for k, e in zip(POOLER, EXPORTED))  # the teacher's, copied
    base = assert_loads_whole(folder)
    assert torch.equal(base.pooler.dense.weight, pooler[POOLER[0]])
    # the masked-LM logits are still the trained student's
    probe = load_file(str(out / "probe_logits.safetensors"))
    mlm = AutoModelForMaskedLM.from_pretrained(str(folder), subfolder="masked_lm").eval()
    with torch.no_grad():
        logits = mlm(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert float((logits - probe["logits"]).abs().max()) <= 1e-5
    # sentence-transformers: mean pooling at the student's width, cut at its 128 positions, no Normalize, no prompt
    assert [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())] == \
        ["Transformer", "Pooling"]
    assert json.loads((folder / "sentence_bert_config.json").read_text()) == {"max_seq_length": 128,
                                                                              "do_lower_case": False}
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["default_prompt_name"] is None
    assert_encodes_as_the_evaluation_pools(folder)
    # the card: the command as typed (quoted), and the held-out evaluation = metrics.jsonl's
    card = (folder / "README.md").read_text()
    assert "\npython -m pretrain --config 'my runs/st.yaml' --set steps=2\n" in card
    assert "| shape | 2 layers, width 32, 4 heads, feed-forward 64, vocabulary" in card
    assert "Normalize (2_Normalize) is left out" in card and f"copied from `{paths['teacher']}`" in card
    evals = {r["step"]: r for r in read_metrics(out / "metrics.jsonl", kind="eval")}
    rows = card_rows(card)
    assert set(rows) == {"step 0 (as initialised)", "step 2 (exported)"}
    for label, step in (("step 0 (as initialised)", 0), ("step 2 (exported)", 2)):
        assert rows[label] == {"top1_agreement": float(format(evals[step]["top1_agreement"], ".6g"))}
    assert rows["step 0 (as initialised)"] != rows["step 2 (exported)"]
    # --export-init writes the same portable folder for the baseline
    cfg = from_dict(PretrainConfig, base_config(paths, tmp_path / "unused", **{"student.init": "every_other",
                                                                                 "eval_rows": 32}))
    init = export_init(cfg, validate(cfg, "test"), tmp_path / "init")
    assert all(torch.equal(load_file(str(init / "model.safetensors"))[e], pooler[k]) for k, e in zip(POOLER, EXPORTED))
    assert_loads_whole(init)
    assert_encodes_as_the_evaluation_pools(init)
    assert "python -m pretrain --config 'my runs/st.yaml' --set steps=2" in (init / "README.md").read_text()


@pytest.mark.slow
def test_the_demo_path_takes_pooler_and_files_from_the_encoder_the_teacher_was_made_from(fixture_paths, tmp_path,
                                                                                         monkeypatch):
    """(b) A masked-LM teacher without a pooler whose teacher_report.json names the sentence-transformers encoder it
    was made from (fingerprints unchanged: the report is not a weight)."""
    teacher = tmp_path / "teacher_mlm"
    shutil.copytree(fixture_paths["teacher"], teacher)
    pooler = encoder_with_pooler(teacher, tmp_path / "encoder", seed=5)
    (teacher / TEACHER_REPORT).write_text(json.dumps({"encoder": str(tmp_path / "encoder"), "steps": 30}))
    out = tmp_path / "run"
    run_in_process({"teacher": teacher, "transfer": fixture_paths["transfer"]}, out, monkeypatch,
                   ["/x/pretrain/__main__.py", "--config", "demo.yaml"])
    folder = out / "export"
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in pooler.items())
    assert_loads_whole(folder)
    assert (folder / "1_Pooling" / "config.json").is_file()
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert_encodes_as_the_evaluation_pools(folder)
    card = (folder / "README.md").read_text()
    assert "the encoder the teacher was made from" in card and "\npython -m pretrain --config demo.yaml\n" in card
