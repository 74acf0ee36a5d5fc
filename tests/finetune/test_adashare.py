"""AdaShare: Gumbel-softmax policies, the regularisers against float64 hand computations, layer skipping equal to
a model without the layer, and the multi-task stage's search + retraining (policies and weights survive kill -9)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from finetune.__main__ import main
from kdlib.students.adashare import (AdaShareConfig, TaskPolicies, candidate_policies, fixed_policy, gated_bert_forward, gumbel_noise,
                            gumbel_softmax, keep_layers, learned_layers, temperature)
from kdlib.losses import get_loss
from kdlib.training.lr_groups import param_groups
from tests.finetune_fixture import base_config, kill_at_first_checkpoint, multitask_config, write_config


def tiny_classifier(layers: int = 4, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the attention mask must be built as BertModel builds it
    return ids, mask


# ---------------------------------------------------------------- sampling and schedule

def test_gumbel_softmax_is_softmax_of_noisy_logits_over_temperature():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, -0.4]], dtype=torch.float64)
    noise = gumbel_noise((3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for tau in (5.0, 1.0, 0.3):
        z = (logits.numpy() + noise.numpy()) / tau
        want = np.exp(z - z.max(-1, keepdims=True))
        want /= want.sum(-1, keepdims=True)
        assert np.abs(gumbel_softmax(logits, tau, noise).numpy() - want).max() <= 1e-12


def test_gumbel_softmax_at_temperature_towards_zero_picks_the_argmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 2, generator=g, dtype=torch.float64)
    noise = gumbel_noise((200, 2), generator=g, dtype=torch.float64)
    hard = gumbel_softmax(logits, 1e-4, noise)
    picked = (logits + noise).argmax(-1)
    gap = (logits + noise).diff(dim=-1).abs().squeeze(-1)
    clear = gap > 1e-2  # a pair closer than that may round either way at tau = 1e-4
    assert clear.sum() > 190
    assert torch.equal(hard[clear].argmax(-1), picked[clear]) and (hard[clear].max(-1).values > 1 - 1e-12).all()
    # noise is bounded for one draw; with logits far apart the noisy argmax is the plain argmax
    far = torch.tensor([[12.0, -12.0], [-12.0, 12.0]], dtype=torch.float64)
    small = gumbel_noise((2, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64).clamp(-5, 5)
    assert torch.equal(gumbel_softmax(far, 1e-6, small), torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


def test_hard_gumbel_draws_follow_the_policy_probabilities():
    logits = torch.tensor([0.8, -0.6])
    p = float(torch.softmax(logits, 0)[0])
    g = torch.Generator().manual_seed(11)
    draws = torch.stack([gumbel_softmax(logits, 1e-3, gumbel_noise((2,), generator=g))[0] for _ in range(4000)])
    assert abs(float((draws > 0.5).double().mean()) - p) < 5 * (p * (1 - p) / 4000) ** 0.5


def test_curriculum_learns_from_the_top_layer_down_after_the_warm_up():
    cfg = AdaShareConfig(enabled=True, search_steps=100, warmup_fraction=0.2, curriculum_fraction=0.5)
    counts = [learned_layers(step, 100, cfg, 4) for step in range(100)]
    assert counts[:20] == [0] * 20 and counts[20:30] == [1] * 10 and counts[30:40] == [2] * 10
    assert counts[40:50] == [3] * 10 and set(counts[50:]) == {4}
    assert temperature(20, 100, cfg) == 5.0 and abs(temperature(99, 100, cfg) - 0.5) < 1e-12
    policies = TaskPolicies(2, 4, cfg=cfg).train()
    policies.set_step(35, 100)
    assert policies.learned_mask().tolist() == [[False, False, True, True]] * 2
    gates = policies.gates(1)
    assert gates[:2] == [True, True] and all(torch.is_tensor(g) and 0 < float(g.detach()) < 1 for g in gates[2:])
    policies.set_step(5, 100)  # the warm-up: every layer executes, no policy learns
    assert policies.gates(0) == [True] * 4 and not policies.learned_mask().any()


def test_fixed_policy_draws_are_seeded_and_keep_a_layer():
    probs = np.array([[0.9, 0.1, 0.6, 0.45], [0.05, 0.2, 0.3, 0.1]])
    assert fixed_policy(probs, "argmax", seed=0) == [[True, False, True, False], [False, False, True, False]]
    assert fixed_policy(probs, "sample", seed=4) == fixed_policy(probs, "sample", seed=4)
    draws = np.array([fixed_policy(probs, "sample", seed=s, min_layers=0) for s in range(3000)], dtype=float)
    assert np.abs(draws.mean(0) - probs).max() < 5 * np.sqrt(0.25 / 3000)
    two = fixed_policy(np.array([[0.01, 0.3, 0.2, 0.02]]), "argmax", seed=0, min_layers=2)
    assert two == [[False, True, True, False]]


def test_candidates_are_the_most_probable_policy_then_draws_independent_per_fold():
    probs = np.full((2, 6), 0.5)
    cfg = AdaShareConfig(enabled=True, candidates=5)
    fold0, fold1 = candidate_policies(probs, cfg, seed=0, fold=0), candidate_policies(probs, cfg, seed=0, fold=1)
    assert len(fold0) == 5 and fold0[0] == fixed_policy(probs, "argmax", seed=0) == [[True] * 6] * 2
    assert fold0 == candidate_policies(probs, cfg, seed=0, fold=0) and fold0[1:] != fold1[1:]
    assert candidate_policies(probs, AdaShareConfig(enabled=True, policy="argmax"), seed=0, fold=0) == fold0[:1]


# ---------------------------------------------------------------- the regularisers, by hand in float64

def test_sparsity_and_sharing_equal_their_hand_computations():
    p = np.array([[0.7, 0.2, 0.55], [0.1, 0.9, 0.5], [0.3, 0.3, 0.99]])
    mask = np.array([[False, True, True]] * 3)
    probs, m = torch.tensor(p), torch.tensor(mask)
    want_sparsity = np.mean([-np.log(1 - p[k, l]) for k in range(3) for l in (1, 2)])
    assert abs(float(get_loss("adashare_sparsity")(probs, m)) - want_sparsity) <= 1e-12
    pairs = [(0, 1), (0, 2), (1, 2)]
    want_sharing = sum((3 - l) / 3 * abs(p[a, l] - p[b, l]) for a, b in pairs for l in (1, 2)) / 3
    assert abs(float(get_loss("adashare_sharing")(probs, m)) - want_sharing) <= 1e-12
    none = torch.zeros(3, 3, dtype=torch.bool)
    assert float(get_loss("adashare_sparsity")(probs, none)) == 0.0 == float(get_loss("adashare_sharing")(probs, none))


def test_the_regularisers_move_policies_towards_skipping_and_agreement():
    logits = torch.tensor([[[1.0, 0.0], [0.2, 0.0]], [[-0.5, 0.0], [0.9, 0.0]]], requires_grad=True)
    probs = torch.softmax(logits, -1)[..., 0]
    mask = torch.ones(2, 2, dtype=torch.bool)
    (grad,) = torch.autograd.grad(get_loss("adashare_sparsity")(probs, mask), logits)
    assert (grad[..., 0] > 0).all()  # descent lowers every execute logit
    (grad,) = torch.autograd.grad(get_loss("adashare_sharing")(torch.softmax(logits, -1)[..., 0], mask), logits)
    assert grad[0, 0, 0] > 0 > grad[1, 0, 0]  # layer 0: task 0 executes more, so it moves down and task 1 up


def test_policy_logits_get_their_own_rate_without_weight_decay():
    policies = TaskPolicies(2, 3, cfg=AdaShareConfig(enabled=True))
    module = torch.nn.ModuleDict({"student": torch.nn.ModuleDict({"policies": policies,
                                                                  "head": torch.nn.Linear(3, 2)})})
    groups = param_groups(module.named_parameters(), learning_rate=1e-4, weight_decay=0.01, num_layers=0,
                          rates={r"(^|\.)policy_logits$": 0.02})
    assert [len(g["params"]) for g in groups] == [1, 1, 1]
    assert groups[-1]["params"][0] is policies.policy_logits and groups[-1]["lr"] == 0.02
    assert groups[-1]["weight_decay"] == 0.0 and groups[0]["lr"] == 1e-4


# ---------------------------------------------------------------- skipping a layer

def test_all_layers_executed_equals_the_stock_encoder_exactly():
    model = tiny_classifier()
    ids, mask = batch()
    with torch.no_grad():
        stock = model.bert(input_ids=ids, attention_mask=mask)
        hidden, pooled = gated_bert_forward(model.bert, ids, mask, [True] * 4)
    assert torch.equal(hidden, stock.last_hidden_state) and torch.equal(pooled, stock.pooler_output)


@pytest.mark.slow
def test_a_skipped_layer_gives_the_outputs_of_the_model_without_it(tmp_path):
    from finetune.multitask_model import MultiTaskClassifier

    policy = [[True, False, True, True], [False, True, False, True]]
    student = MultiTaskClassifier(tiny_classifier(), {"a": 3, "b": 2}, seed=0,
                                  policies=TaskPolicies(2, 4, fixed=policy)).eval()
    ids, mask = batch(2)
    for task, name in enumerate(("a", "b")):
        student.current = task
        with torch.no_grad():
            routed = student(input_ids=ids, attention_mask=mask).logits
        # by hand: a plain 4-layer model with the skipped layers removed, and the task's head
        by_hand = BertForSequenceClassification(BertConfig(**{**student.config.to_dict(), "num_labels": 3})).eval()
        by_hand.load_state_dict({**student.base.state_dict(), **{f"classifier.{k}": v for k, v in
                                                                  student.heads["a"].state_dict().items()}},
                                strict=False)
        by_hand.classifier = student.heads[name]
        keep_layers(by_hand.bert, policy[task])
        assert len(by_hand.bert.encoder.layer) == sum(policy[task])
        exported = student.task_model(name, ["x", "y", "z"][: student.heads[name].out_features])
        exported.save_pretrained(tmp_path / name, safe_serialization=True)
        loaded = BertForSequenceClassification.from_pretrained(tmp_path / name).eval()
        assert loaded.config.num_hidden_layers == sum(policy[task])
        with torch.no_grad():
            plain = by_hand(input_ids=ids, attention_mask=mask).logits
            reloaded = loaded(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(routed, plain) and torch.equal(routed, reloaded)


def test_a_soft_gate_mixes_the_layer_with_its_input():
    model = tiny_classifier(layers=2)
    ids, mask = batch(3)
    gate = torch.tensor(0.3)
    with torch.no_grad():
        mixed, _ = gated_bert_forward(model.bert, ids, mask, [gate, True])
        embedded = model.bert.embeddings(input_ids=ids)
        ext, _ = model.bert._create_attention_masks(attention_mask=mask, encoder_attention_mask=None,
                                                   embedding_output=embedded, encoder_hidden_states=None,
                                                   past_key_values=None)
        first = model.bert.encoder.layer[0](embedded, ext)
        want = model.bert.encoder.layer[1](0.3 * first + 0.7 * embedded, ext)
    assert torch.allclose(mixed, want, rtol=0, atol=1e-6 * max(1.0, float(want.abs().max())))


# ---------------------------------------------------------------- the stage

def adashare_config(root):
    data = multitask_config(root)
    data["student"] = {"shape": {"num_layers": 3, "init": "explicit", "init_layers": [1, 2, 4]}}
    data["baseline"] = {"enabled": False}
    data["distill"]["eval_every"] = 10
    data["teacher"]["steps"] = 10  # the teachers' quality does not matter here; the tests time every run
    data["distill"]["steps"] = 16
    data["multitask"]["adashare"] = {"enabled": True, "search_steps": 70, "warmup_fraction": 0.1,
                                     "curriculum_fraction": 0.5, "policy_learning_rate": 0.05,
                                     "sparsity_weight": 0.2, "sharing_weight": 0.1}
    return data


@pytest.fixture(scope="module")
def adashare(tmp_path_factory):
    root = tmp_path_factory.mktemp("adashare")
    data = adashare_config(root)
    path = write_config(data, root / "config.yaml")
    assert main(["--config", str(path)]) == 0
    return root / "run", data


@pytest.mark.slow
def test_search_learns_policies_and_retraining_exports_only_the_selected_layers(adashare):
    run, _ = adashare
    for fold in (0, 1):
        search = json.loads((run / f"multitask/fold-{fold}/seed-0/adashare-search/policies.json").read_text())
        probs = np.array(search["select_probability"])
        assert probs.shape == (2, 3) and np.abs(probs - 0.5).min() > 1e-3  # every policy learned (none at 0.5)
        scores = search["candidate_validation_accuracy"]
        assert len(search["candidates"]) == len(scores) == 8  # the most probable policy is candidate 0
        assert search["candidates"][0] == fixed_policy(probs, "argmax", seed=0, min_layers=1)
        assert search["policy"] == search["candidates"][search["chosen"]] and search["chosen"] == int(np.argmax(scores))
        weights = load_file(str(run / f"multitask/fold-{fold}/seed-0/adashare-search/student.safetensors"))
        assert torch.allclose(torch.softmax(weights["policies.policy_logits"].double(), -1)[..., 0],
                              torch.tensor(probs), rtol=0, atol=1e-7)
        for task, name in enumerate(search["tasks"]):
            folder = run / name / f"fold-{fold}/seed-0/multitask-adashare"
            record = json.loads((folder / "eval.json").read_text())
            assert record["policy"] == search["policy"][task] and record["layers_executed"] == sum(record["policy"])
            model = BertForSequenceClassification.from_pretrained(folder / "export")
            assert model.config.num_hidden_layers == record["layers_executed"]
            assert record["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_each_task_report_shows_adashare_beside_the_dense_multitask_student(adashare):
    run, _ = adashare
    for task in ("polarity", "topic"):
        report = json.loads((run / task / "report/report.json").read_text())
        assert set(report["arms"]) == {"teacher", "multitask-kd", "multitask-adashare"}
        layers = [json.loads((run / task / f"fold-{f}/seed-0/multitask-adashare/eval.json").read_text())
                  ["layers_executed"] for f in (0, 1)]
        assert abs(report["arms"]["multitask-adashare"]["layers_executed"]["mean"] - np.mean(layers)) < 1e-12
        speed = json.loads((run / task / "fold-0/seed-0/multitask-adashare/eval.json").read_text())["speed"]
        assert speed["sequences_per_s"] > 0
        assert "Layers executed per task model" in (run / task / "report/report.md").read_text()


@pytest.mark.slow
def test_policies_and_weights_survive_kill_9_and_resume(adashare, tmp_path):
    run, data = adashare
    copy = tmp_path / "run"
    # the folds, teachers and transfer sets are reused; the multi-task runs (whose configs hash their parts'
    # folders) train again in the copy: the dense one first, then the search, killed after its first checkpoint
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("multitask", "multitask-*", "report"))
    path = write_config({**data, "output_dir": str(copy)}, tmp_path / "config.yaml")
    search = copy / "multitask/fold-0/seed-0/adashare-search"
    command = ["distill", "--config", str(path), "--fold", "0"]
    kill_at_first_checkpoint(command, search / "checkpoints", tmp_path / "killed.log")
    assert not (search / "policies.json").exists(), "killed after the search ended"
    assert main(command) == 0
    straight = load_file(str(run / "multitask/fold-0/seed-0/adashare-search/student.safetensors"))
    resumed = load_file(str(search / "student.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    want = json.loads((run / "multitask/fold-0/seed-0/adashare-search/policies.json").read_text())
    got = json.loads((search / "policies.json").read_text())
    assert got["select_probability"] == want["select_probability"] and got["policy"] == want["policy"]
    for name in ("polarity", "topic"):
        a = load_file(str(run / name / "fold-0/seed-0/multitask-adashare/export/model.safetensors"))
        b = load_file(str(copy / name / "fold-0/seed-0/multitask-adashare/export/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adashare_config_errors_name_the_field(tmp_path):
    from kdlib.config import load_config
    from kdlib.errors import ConfigError
    from finetune.config import FinetuneConfig

    single = base_config(tmp_path)
    single["multitask"] = {"adashare": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"multitask\.adashare\.enabled.*needs 'tasks'"):
        load_config(write_config(single, tmp_path / "single.yaml"), FinetuneConfig)
    bad = adashare_config(tmp_path)
    bad["multitask"]["adashare"]["curriculum_fraction"] = 0.0
    with pytest.raises(ConfigError, match=r"bad\.yaml.*multitask\.adashare\.curriculum_fraction"):
        load_config(write_config(bad, tmp_path / "bad.yaml"), FinetuneConfig)
    mapped = adashare_config(tmp_path)
    mapped["distill"]["layer_map"] = {"name": "skip"}
    with pytest.raises(ConfigError, match="remove distill.layer_map"):
        load_config(write_config(mapped, tmp_path / "mapped.yaml"), FinetuneConfig)
