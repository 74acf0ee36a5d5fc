"""Every registered loss, as the only objective of one real training step of the pretrain stage.

The stage runs in this process (one rank, real DeepSpeed on CPU, gloo); its logged first-step value
must equal the registered loss function called directly on tensors gathered here by hand: the
student's and the teacher's own forward passes, Q/K/V from our own hooks, the collated batch. A
wrong provider (another layer, the wrong tensor, a missing projection) changes the value. Dropout is
0 in the fixture teacher (students copy its config), so the hand forward is the trainer's forward.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdlib.config import from_dict
from kdlib.errors import ConfigError
from kdlib.students.layer_maps import EmdLayerWeights, pairwise_layer_cost
from kdlib.losses import get_loss, known_losses
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.training.sampler import DistributedBatchSampler
from pretrain.config import PretrainConfig
from pretrain.train import build_module, train
from pretrain.validate import validate
from tests.transfer_fixture import base_config, build_transfer_set, free_port
from tests.paths import REPO_ROOT

PAIRS = [(2, 1), (4, 2)]  # uniform map, teacher 4 layers -> student 2
PARAMS = {"minilmv2_relations": {"relation_heads": 4}}  # divides student width 16 and teacher width 32


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("losses_fixture"), rows=96, teacher_steps=20,
                              hidden_layers=(0, 2, 4), pooled="mean", dropout=0.0, sampled_tokens=16)


def one_step(paths, out, monkeypatch, objectives, **overrides):
    """Run `python -m pretrain`'s train() for one step in this process; returns (config, setup, first record)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    settings = {"online_teacher": True, "layer_map": {"name": "uniform"}, "objectives": objectives, "steps": 1,
                "eval_rows": 8, "student.hidden_size": 16, "student.intermediate_size": 32,
                "engine.zero_stage": 0, "engine.grad_accum": 1, **overrides}
    cfg = from_dict(PretrainConfig, base_config(paths, out, **settings))
    setup = validate(cfg, "test")
    assert train(cfg, setup) == 0
    return cfg, setup, read_metrics(out / "metrics.jsonl")[0]


def _qkv_hooks(model):
    """Our own capture of every layer's query/key/value outputs (independent of kdlib.training.internals)."""
    store, handles = {}, []
    for i, layer in enumerate(model.bert.encoder.layer, start=1):
        for part in ("query", "key", "value"):
            mod = getattr(layer.attention.self, part)
            handles.append(mod.register_forward_hook(lambda m, a, out, i=i, part=part: store.setdefault(i, {}).update({part: out})))
    return store, handles


def forward(model, batch):
    store, handles = _qkv_hooks(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    for h in handles:
        h.remove()
    return out, store


def heads(x, n):
    b, t, d = x.shape
    return x.view(b, t, n, d // n).transpose(1, 2)


def raw_tensors(cfg, setup):
    """The first step's tensors, gathered by hand: the same rows, the same fresh student, the teacher."""
    module = build_module(cfg, setup)  # seeded exactly as the trainer builds it
    ts = setup.transfer_set
    sampler = DistributedBatchSampler(len(ts) - cfg.eval_rows, micro_batch=cfg.engine.micro_batch, grad_accum=1,
                                      rank=0, world_size=1, seed=cfg.seed)
    batch = ts.collate(ts.rows(sampler.next_step()[0]), pad_id=0)
    teacher = load_model(ModelConfig(path=cfg.teacher.path, task="masked_lm")).eval()
    s_out, s_qkv = forward(module.student.train(), batch)
    with torch.no_grad():
        t_out, t_qkv = forward(teacher, batch)
    mask = batch["attention_mask"]
    keys = mask[:, None, None, :].bool()

    def attention(qkv, n):
        scores = {l: heads(qkv[l]["query"], n) @ heads(qkv[l]["key"], n).transpose(-1, -2) / math.sqrt(qkv[l]["query"].shape[-1] // n)
                  for l in qkv}
        probs = {l: torch.softmax(s.masked_fill(~keys, torch.finfo(s.dtype).min), -1) for l, s in scores.items()}
        return scores, probs

    s_scores, s_probs = attention(s_qkv, 4)
    t_scores, t_probs = attention(t_qkv, 4)
    m = mask.unsqueeze(-1).float()
    peer = module.peer(input_ids=batch["input_ids"], attention_mask=mask).logits if module.peer is not None else None
    return SimpleNamespace(
        batch=batch, mask=mask, labels=batch["mlm_labels"], s_logits=s_out.logits, t_logits=t_out.logits,
        s_h=s_out.hidden_states, t_h=t_out.hidden_states, s_qkv=s_qkv, t_qkv=t_qkv, s_scores=s_scores,
        t_scores=t_scores, s_probs=s_probs, t_probs=t_probs, peer=peer,
        s_pooled=(s_out.hidden_states[-1] * m).sum(1) / m.sum(1), t_pooled=(t_out.hidden_states[-1] * m).sum(1) / m.sum(1),
        proj=module.projections["hidden"] if "hidden" in module.projections else None,
        emb=module.projections["embeddings"] if "embeddings" in module.projections else None)


def mean_over_pairs(fn):
    return torch.stack([fn(t, s) for t, s in PAIRS]).mean()


def expected(name: str, r, cfg) -> torch.Tensor:
    """The registered function, called directly on the hand-gathered tensors (first step: step 0 of cfg.steps)."""
    f, p = get_loss(name), PARAMS.get(name, {})
    b = r.batch
    direct = {
        "kd_topk": lambda: f(r.s_logits, b["topk_ids"], b["topk_logits"], b["teacher_lse"], r.mask),
        "kd_sparse": lambda: f(r.s_logits, b["sparse_ids"], b["sparse_weights"], r.mask),
        "uld": lambda: f(r.s_logits, b["topk_logits"], b["teacher_lse"], r.mask),  # one tokenizer: every position aligned
        "mlm_ce": lambda: f(r.s_logits, r.labels, r.mask),
        "hard_ce": lambda: f(r.s_logits, r.labels, r.mask),
        "kd_kl": lambda: f(r.s_logits, r.t_logits, r.mask),
        "reverse_kl": lambda: f(r.s_logits, r.t_logits, r.mask),
        "jsd": lambda: f(r.s_logits, r.t_logits, r.mask),
        "tvd": lambda: f(r.s_logits, r.t_logits, r.mask),
        "kd_ce": lambda: f(r.s_logits, r.t_logits, r.mask),
        "logit_mse": lambda: f(r.s_logits, r.t_logits, r.mask),
        "kd_dynamic_temperature": lambda: f(r.s_logits, r.t_logits, r.mask),
        "kd_prob_shift": lambda: f(r.s_logits, r.t_logits, r.labels, r.mask),
        "teacher_annealing_ce": lambda: f(r.s_logits, r.t_logits, r.labels, r.mask, 0, cfg.steps),
        "dml": lambda: sum(f(r.s_logits, r.peer, r.labels, r.mask)),
        "rkd_distance": lambda: f(r.s_pooled, r.t_pooled),
        "rkd_angle": lambda: f(r.s_pooled, r.t_pooled),
        "pooled_mse": lambda: f(r.s_pooled, r.t_pooled, r.proj),
        "pooled_cosine": lambda: f(r.s_pooled, r.t_pooled, r.proj),
        "pooled_contrastive": lambda: f(r.s_pooled, r.t_pooled, r.proj),
        "pooled_relation_kl": lambda: f(r.s_pooled, r.t_pooled),
        "hidden_mse": lambda: mean_over_pairs(lambda t, s: f(r.s_h[s], r.t_h[t], r.mask, r.proj)),
        "distilbert_cosine": lambda: mean_over_pairs(lambda t, s: f(r.s_h[s], r.t_h[t], r.mask, r.proj)),
        "nst_mmd": lambda: mean_over_pairs(lambda t, s: f(r.s_h[s], r.t_h[t], r.mask)),
        "embedding_mse": lambda: f(r.s_h[0], r.t_h[0], r.mask, r.emb),
        "pkd_patient": lambda: f(torch.stack([r.s_h[s][:, 0] for _, s in PAIRS], 1),
                                 torch.stack([r.t_h[t][:, 0] for t, _ in PAIRS], 1), r.proj),
        "fsp": lambda: f(r.s_h[1], r.s_h[2], r.t_h[2], r.t_h[4], r.mask, r.proj),
        "attention_mse": lambda: mean_over_pairs(lambda t, s: f(r.s_scores[s], r.t_scores[t], r.mask)),
        "attention_kl": lambda: mean_over_pairs(lambda t, s: f(r.s_probs[s], r.t_probs[t], r.mask)),
        "value_relation_kl": lambda: mean_over_pairs(
            lambda t, s: f(heads(r.s_qkv[s]["value"], 4), heads(r.t_qkv[t]["value"], 4), r.mask)),
        "minilmv2_relations": lambda: mean_over_pairs(
            lambda t, s: f(*(r.s_qkv[s][k] for k in ("query", "key", "value")),
                           *(r.t_qkv[t][k] for k in ("query", "key", "value")), r.mask, **p)),
        "bert_emd": lambda: _emd(r, f),
    }
    return direct[name]()


def _emd(r, f):
    hidden_mse = get_loss("hidden_mse")
    cost = pairwise_layer_cost(list(r.t_h[1:]), list(r.s_h[1:]), lambda s, t: hidden_mse(s, t, r.mask, r.proj))
    return f(cost, EmdLayerWeights(4, 2).plan(cost.detach()))


# Losses a masked-LM run cannot feed (one output per sequence; next-token targets); each is tested, against a
# hand computation of a real step, by the stage it serves.
SEQUENCE_ONLY = {"hard_mse": "tests/finetune/test_regression.py", "next_token_ce": "tests/pretrain/test_causal.py",
                 "adashare_sparsity": "tests/finetune/test_adashare.py", "adashare_sharing": "tests/finetune/test_adashare.py"}
MASKED_LM_LOSSES = [n for n in known_losses() if n not in SEQUENCE_ONLY]


def test_every_registered_loss_has_a_hand_wiring_here():
    import inspect

    source = inspect.getsource(expected)
    assert [n for n in MASKED_LM_LOSSES if f'"{n}":' not in source] == []
    from pathlib import Path

    assert all(name in Path(test).read_text() for name, test in SEQUENCE_ONLY.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", MASKED_LM_LOSSES)
def test_each_loss_trains_one_step_and_logs_its_direct_value(paths, tmp_path, monkeypatch, name):
    overrides = {"layer_map": {"name": "emd"}} if name == "bert_emd" else {}
    cfg, setup, first = one_step(paths, tmp_path / name, monkeypatch, [{"name": name, "params": PARAMS.get(name, {})}],
                                 **overrides)
    want = float(expected(name, raw_tensors(cfg, setup), cfg).detach())
    # both sides are float32 sums of O(1)-sized terms: 1e-5 absolute (plus relative for large values)
    assert abs(first[name] - want) <= 1e-5 * (1 + abs(want)), (name, first[name], want)
    assert first["loss"] == first[name]
    assert math.isfinite(first[name])


@pytest.mark.slow
def test_cached_teacher_outputs_serve_losses_without_an_online_teacher(paths, tmp_path, monkeypatch):
    """hidden_mse reads the cached hidden_2 / hidden_4 (fp16) and rkd_distance the cached pooled embedding."""
    objectives = [{"name": "hidden_mse"}, {"name": "rkd_distance"}]
    cfg, setup, first = one_step(paths, tmp_path / "cached", monkeypatch, objectives, online_teacher=False)
    r = raw_tensors(cfg, setup)
    b = r.batch
    cached_hidden = float(mean_over_pairs(
        lambda t, s: get_loss("hidden_mse")(r.s_h[s], b[f"teacher_hidden_{t}"], r.mask, r.proj)).detach())
    assert abs(first["hidden_mse"] - float(cached_hidden)) <= 1e-5 * (1 + float(cached_hidden))
    online_hidden = float(expected("hidden_mse", r, cfg).detach())
    # the cache holds fp16-rounded states (so the run, with no teacher, can only have read those); the loss
    # moves by far less than the states themselves (a sum of signed rounding errors), and may even tie in float32
    real = r.mask.bool()
    assert not torch.equal(b["teacher_hidden_2"][real], r.t_h[2][real].float())
    assert torch.allclose(b["teacher_hidden_2"][real], r.t_h[2][real], atol=5e-3, rtol=1e-3)
    assert abs(first["hidden_mse"] - online_hidden) < 1e-2 * (1 + online_hidden)  # fp16 rounding of the targets
    cached_pooled = float(get_loss("rkd_distance")(r.s_pooled, b["teacher_pooled"]).detach())
    assert abs(first["rkd_distance"] - cached_pooled) <= 1e-5 * (1 + cached_pooled)


@pytest.mark.slow
@pytest.mark.parametrize("objective, overrides, message", [
    ("attention_mse", {"online_teacher": False},
     "objectives[0]': attention_mse needs teacher attention scores (teacher_attention_scores): set online_teacher: true, "
     "or make the transfer set with teacher_outputs.qkv_layers including ["),
    ("kd_kl", {"online_teacher": False}, "kd_kl needs dense teacher logits (teacher_logits): set online_teacher: true, "
     "or make the transfer set with teacher_outputs.dense_logits: true"),
    ("hidden_mse", {"online_teacher": False, "layer_map": {"name": "explicit", "pairs": [[3, 1]]}},
     "teacher_outputs.hidden_layers including [3]"),
    ("hidden_mse", {"layer_map": None}, "hidden_mse needs a layer map with at least one pair"),
    ("hidden_mse", {"layer_map": {"name": "emd"}}, "with emd use bert_emd"),
    ("bert_emd", {}, "set layer_map: {name: emd}"),
    ("fsp", {"layer_map": {"name": "explicit", "pairs": [[4, 2]]}}, "at least two pairs"),
])
def test_missing_inputs_are_named_with_where_to_get_them(paths, tmp_path, objective, overrides, message):
    settings = {"online_teacher": True, "layer_map": {"name": "uniform"}, "objectives": [{"name": objective}],
                **overrides}
    cfg = from_dict(PretrainConfig, base_config(paths, tmp_path / "x", **settings))
    with pytest.raises(ConfigError) as err:
        validate(cfg, "run.yaml")
    assert message in str(err.value) and str(err.value).startswith("run.yaml: field 'objectives[0]'"), str(err.value)


def test_no_stage_dispatches_on_loss_names():
    """Loss names appear in kdlib/losses (their registration) and nowhere in stage or core code."""

    root = REPO_ROOT
    code = [p for folder in ("pretrain", "kdlib/training") for p in (root / folder).rglob("*.py")]
    for path in code:
        text = path.read_text()
        named = [n for n in known_losses() if f'"{n}"' in text or f"'{n}'" in text]
        assert not named, (path, named)
