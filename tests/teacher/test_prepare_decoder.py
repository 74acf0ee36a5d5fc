"""Decoder teacher preparation (python -m teacher.decoder) on a tiny setting: 2 Wikipedia pages, a 300-entry BPE,
a 2-layer 32-wide GPT-2, 30 steps.

Values, not "it ran": the folder loads with plain transformers offline; the held-out rows are rebuilt by hand
from the saved tokenizer (documents + eos, cut every max_length) and match the report's digest; the
perplexities and accuracies in the report equal a float64 recomputation from the saved weights (after) and
from the seeded initialisation (before), and training lowered the perplexity; a second run with the same seed
writes byte-identical weights; a rerun is a no-op; bad fields are refused naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from kdlib.config import load_config
from kdlib.errors import ConfigError
from kdlib.text.readers import CorpusConfig, normalize_text, read_corpus
from teacher.decoder import main as decoder_main
from teacher.prepare_decoder import DecoderPrepConfig, initial_model

TINY = {"corpus": {"kind": "wikipedia_xml", "max_documents": 2}, "tokenizer": "bpe", "vocab_size": 300,
        "family": "gpt2", "layers": 2, "hidden": 32, "heads": 4, "intermediate": 64, "max_length": 32,
        "steps": 30, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5, "eval_rows": 16, "seed": 3,
        "threads": 1}


def write_config(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return path


def prep(tmp_path, name: str, **extra):
    config = write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), **TINY, **extra)
    assert decoder_main(["--config", str(config)]) == 0
    return tmp_path / name, config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("decoder")
    try:
        folder, config = prep(root, "teacher", student_tokenizers=[
            {"kind": "wordpiece", "vocab_size": 200, "output_dir": str(root / "student_tokenizer")}])
        again, _ = prep(root, "again")
    finally:
        torch.set_num_threads(threads)
    return root, folder, config, again


def held_out_rows(tokenizer, max_length: int, count: int) -> np.ndarray:
    """By hand: each page normalised and tokenized, eos after it, the stream cut every max_length; the last rows."""
    stream = []
    for doc in read_corpus(CorpusConfig(kind="wikipedia_xml", max_documents=TINY["corpus"]["max_documents"])):
        stream += tokenizer(normalize_text(doc.text), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = np.asarray(stream[: len(stream) // max_length * max_length]).reshape(-1, max_length)
    return rows[-count:]


def next_token_by_hand(model, rows: np.ndarray) -> dict:
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows).long()).logits[:, :-1].double().numpy()
    logits -= logits.max(-1, keepdims=True)
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = rows[:, 1:]
    nll = -np.take_along_axis(log_q, targets[..., None], -1).mean()
    return {"perplexity": float(np.exp(nll)), "next_token_accuracy": float((log_q.argmax(-1) == targets).mean()),
            "tokens": targets.size}


@pytest.mark.slow
def test_the_prepared_teacher_loads_offline_and_its_report_recomputes(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, config, _ = prepared
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "decoder_report.json",
            "resolved_config.yaml"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2 and model.config.n_embd == 32
    assert model.config.vocab_size == len(tokenizer) == 300 and tokenizer.eos_token == "<|endoftext|>"
    report = json.loads((folder / "decoder_report.json").read_text())
    rows = held_out_rows(tokenizer, 32, 16)
    assert hashlib.sha256(rows.astype("<i4").tobytes()).hexdigest() == report["held_out"]["sha256"]
    assert report["held_out"]["rows"][1] - report["held_out"]["rows"][0] == 16
    after = next_token_by_hand(model, rows)
    cfg = load_config(config, DecoderPrepConfig)
    before = next_token_by_hand(initial_model(cfg, tokenizer).eval(), rows)
    for want, got in ((before, report["before"]), (after, report["after"])):
        assert got["tokens"] == want["tokens"] == 16 * 31
        assert abs(got["perplexity"] - want["perplexity"]) <= 1e-5 * want["perplexity"], (got, want)
        assert got["next_token_accuracy"] == pytest.approx(want["next_token_accuracy"], abs=1e-12)
    # a random 300-way model starts near uniform; 30 steps of a tiny model learn byte statistics
    assert 0.7 * 300 < before["perplexity"] < 1.5 * 300
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)
    assert report["train_loss_last20"] < report["train_loss_first20"]
    assert "| trained |" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_the_student_tokenizer_is_a_plain_folder_trained_on_the_same_pages(prepared):
    from transformers import AutoTokenizer

    root = prepared[0]
    tokenizer = AutoTokenizer.from_pretrained(str(root / "student_tokenizer"), local_files_only=True)
    assert len(tokenizer) <= 200 and tokenizer.unk_token == "[UNK]" and tokenizer.eos_token == "[SEP]"
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = tokenizer.tokenize("Anarchism is a political philosophy")
    assert tokenizer.convert_tokens_to_string(pieces) == "anarchism is a political philosophy"
    assert "[UNK]" not in pieces


@pytest.mark.slow
def test_the_same_seed_gives_byte_identical_weights_and_a_rerun_does_nothing(prepared, capsys):
    root, folder, config, again = prepared
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    mine = json.loads((folder / "decoder_report.json").read_text())
    theirs = json.loads((again / "decoder_report.json").read_text())
    assert mine["before"] == theirs["before"] and mine["after"] == theirs["after"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert decoder_main(["--config", str(config)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("fields, path, words", [
    ({"heads": 3}, "heads", "expected a divisor of hidden (32), got 3"),
    ({"family": "llama", "heads": 8, "hidden": 24}, "heads", "head width hidden / heads must be even"),
    ({"family": "bert"}, "family", "expected one of 'gpt2', 'llama'"),
    ({"vocab_size": 100}, "vocab_size", "expected an integer >= 300 for a bpe tokenizer, got 100"),
    ({"steps": 0}, "steps", "expected a positive integer, got 0"),
    ({"student_tokenizers": [{"kind": "wordpiece", "vocab_size": 10, "output_dir": "x"}]},
     "student_tokenizers[0].vocab_size", "expected an integer >= 100 for a wordpiece tokenizer"),
    ({"student_tokenizers": [{"kind": "bpe", "vocab_size": 400, "output_dir": "OUT/tok"}]},
     "student_tokenizers[0].output_dir", "expected a folder apart from output_dir"),
])
def test_bad_fields_are_refused_naming_the_file_and_the_field(tmp_path, fields, path, words):
    out = str(tmp_path / "out")
    if "student_tokenizers" in fields:
        fields = {"student_tokenizers": [{**s, "output_dir": s["output_dir"].replace("OUT", out)}
                                         for s in fields["student_tokenizers"]]}
    config = write_config(tmp_path / "bad.yaml", **{**TINY, "output_dir": out, **fields})
    with pytest.raises(ConfigError) as info:
        load_config(config, DecoderPrepConfig)
    message = str(info.value)
    assert message.startswith(f"{config}: field '{path}': ") and words in message, message
    assert decoder_main(["--config", str(config)]) == 2
    assert not (tmp_path / "out").exists()


def test_folders_this_stage_did_not_write_are_refused_even_with_overwrite(tmp_path, capsys):
    """A masked-LM teacher (python -m teacher) records its own teacher_report.json: not this stage's claim."""
    out = tmp_path / "mlm_teacher"
    out.mkdir()
    (out / "teacher_report.json").write_text(json.dumps({"config_hash": "another-config"}))
    config = write_config(tmp_path / "c.yaml", **{**TINY, "output_dir": str(out), "overwrite": True})
    assert decoder_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "output_dir:" in err and "did not write (teacher_report.json)" in err, err
    assert [p.name for p in out.iterdir()] == ["teacher_report.json"]
