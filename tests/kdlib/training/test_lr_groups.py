"""Layer-wise learning-rate decay: depths of real BertForSequenceClassification names, per-group rates equal
lr * decay ** (L + 1 - depth), layer_decay = 1 gives kdlib.training.deepspeed_engine.initialize's two groups (an AdamW step
on them is bit-identical), and DeepSpeed's WarmupDecayLR keeps the per-group rates only with the
rewritten scheduler block (without it, it flattens them: the reason scheduler_with_group_lrs exists)."""

import copy

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR
from torch import nn
from transformers import BertForSequenceClassification

from kdlib.training.deepspeed_engine import EngineConfig, OptimConfig, deepspeed_config
from kdlib.training.lr_groups import layer_depth, param_groups, scheduler_with_group_lrs
from tests.tiny_models import make_tiny_bert

LAYERS, LR, WD = 3, 1e-3, 0.01
EPS = torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_bert(tmp_path_factory.mktemp("clf") / "m", task="sequence_classification", layers=LAYERS)
    return BertForSequenceClassification.from_pretrained(str(folder))


def hand_depth(name: str) -> int:
    """Depth by reading the name as a person would: bert.embeddings / bert.encoder.layer.<i> / the rest."""
    parts = name.split(".")
    if parts[:2] == ["bert", "embeddings"]:
        return 0
    if parts[:3] == ["bert", "encoder", "layer"]:
        return int(parts[3]) + 1
    assert parts[0] in ("classifier",) or parts[:2] == ["bert", "pooler"], name
    return LAYERS + 1


def test_depths_of_real_bert_classifier_names(model):
    names = [n for n, _ in model.named_parameters()]
    assert {layer_depth(n, LAYERS) for n in names} == {0, 1, 2, 3, 4}
    for name in names:
        assert layer_depth(name, LAYERS) == hand_depth(name), name
        # as DistillModule names them (`student.` / `peer.` prefix): same depth
        assert layer_depth(f"student.{name}", LAYERS) == layer_depth(f"peer.{name}", LAYERS) == hand_depth(name)
    wrapped = nn.ModuleDict({"student": model})
    assert [layer_depth(n, LAYERS) for n, _ in wrapped.named_parameters()] == [hand_depth(n) for n in names]
    assert layer_depth("bert.embeddings.LayerNorm.weight", LAYERS) == 0
    assert layer_depth("bert.encoder.layer.2.output.LayerNorm.bias", LAYERS) == 3
    assert layer_depth("classifier.weight", LAYERS) == layer_depth("bert.pooler.dense.bias", LAYERS) == 4
    assert layer_depth("electra.embeddings_project.weight", 12) == 0
    assert layer_depth("distilbert.transformer.layer.5.ffn.lin1.weight", 6) == 6
    assert layer_depth("projections.hidden.weight", LAYERS) == 4


def test_a_layer_beyond_num_layers_names_the_field():
    with pytest.raises(ValueError, match=r"^num_layers: parameter 'bert.encoder.layer.3.output.dense.weight' is in "
                                         r"layer 3, so the model has more than num_layers=3"):
        layer_depth("bert.encoder.layer.3.output.dense.weight", 3)
    with pytest.raises(ValueError, match=r"^num_layers: expected an integer >= 0"):
        layer_depth("classifier.weight", -1)


def test_group_rates_equal_the_hand_computation(model):
    decay = 0.5
    groups = param_groups(model.named_parameters(), learning_rate=LR, weight_decay=WD, layer_decay=decay,
                          num_layers=LAYERS)
    name_of = {id(p): n for n, p in model.named_parameters()}
    # by hand: depths 0..4, each with matrices (weight decay) then vectors (none)
    expected = []
    for depth in range(LAYERS + 2):
        for matrices in (True, False):
            members = [n for n, p in model.named_parameters() if hand_depth(n) == depth and (p.ndim >= 2) == matrices]
            expected.append((members, LR * 0.5 ** (LAYERS + 1 - depth), WD if matrices else 0.0))
    assert len(groups) == len(expected) == 10
    for group, (members, lr, wd) in zip(groups, expected):
        assert [name_of[id(p)] for p in group["params"]] == members
        assert group["lr"] == pytest.approx(lr, rel=4 * EPS) and group["weight_decay"] == wd
        assert set(group) == {"params", "lr", "weight_decay"}
    assert groups[0]["lr"] == pytest.approx(LR / 16, rel=4 * EPS) and groups[-1]["lr"] == LR
    assert [name_of[id(p)] for p in groups[0]["params"]] == ["bert.embeddings.word_embeddings.weight",
                                                             "bert.embeddings.position_embeddings.weight",
                                                             "bert.embeddings.token_type_embeddings.weight"]
    assert sorted(name_of[id(p)] for g in groups for p in g["params"]) == sorted(name_of.values())


def test_frozen_parameters_are_left_out_and_empty_groups_dropped(model):
    frozen = copy.deepcopy(model)
    for p in frozen.bert.embeddings.parameters():
        p.requires_grad = False
    groups = param_groups(frozen.named_parameters(), learning_rate=LR, weight_decay=WD, layer_decay=0.8,
                          num_layers=LAYERS)
    assert len(groups) == 8  # depth 0 had only embeddings: both its groups are gone
    assert groups[0]["lr"] == pytest.approx(LR * 0.8 ** 3, rel=4 * EPS)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in frozen.parameters())


def engine_groups(module) -> list[dict]:
    """kdlib.training.deepspeed_engine.initialize's grouping, line for line (it builds them inside deepspeed.initialize's call)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def test_layer_decay_one_is_the_engines_two_groups(model):
    ours = param_groups(model.named_parameters(), learning_rate=LR, weight_decay=WD, num_layers=LAYERS)
    theirs = engine_groups(model)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert a["weight_decay"] == b["weight_decay"] and a["lr"] == LR
    # the same AdamW step from the same state gives bit-identical weights
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    opt1 = torch.optim.AdamW(param_groups(m1.named_parameters(), learning_rate=LR, weight_decay=WD, num_layers=LAYERS),
                             lr=LR)
    opt2 = torch.optim.AdamW(engine_groups(m2), lr=LR)
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    mask = (ids != 0).long()
    for m, opt in ((m1, opt1), (m2, opt2)):
        m.train(False)
        loss = m(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss
        loss.backward()
        opt.step()
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), name
    assert not torch.equal(next(m1.parameters()), next(model.parameters()))  # the step did move the weights


def test_invalid_arguments_name_the_field(model):
    for kwargs, field in [({"layer_decay": 0.0}, "layer_decay"), ({"layer_decay": 1.5}, "layer_decay"),
                          ({"learning_rate": 0.0}, "learning_rate"), ({"weight_decay": -0.1}, "weight_decay"),
                          ({"num_layers": 2}, "num_layers")]:
        args = dict(learning_rate=LR, weight_decay=WD, layer_decay=0.9, num_layers=LAYERS) | kwargs
        with pytest.raises(ValueError, match=rf"^{field}: "):
            param_groups(model.named_parameters(), **args)


def hand_warmup_decay(t: int, peak: float, warmup: int, total: int) -> float:
    """DeepSpeed WarmupDecayLR (linear warmup) at last_batch_iteration t (-1 before the first step(), so the
    first two optimizer steps run at the minimum): min + (max - min) * gamma, min = peak / (warmup + 1)."""
    low = peak / (warmup + 1)
    warmup = max(2, warmup)
    if t < 0:
        return low
    gamma = t / warmup if t < warmup else max(0.0, (total - t) / max(1.0, total - warmup))
    return low + (peak - low) * gamma


def test_deepspeed_warmup_decay_keeps_group_rates_only_with_the_rewritten_block(model):
    warmup, total, decay = 3, 10, 0.5
    block = deepspeed_config(EngineConfig(optim=OptimConfig(learning_rate=LR, warmup_steps=warmup)), world_size=1,
                             total_steps=total)["scheduler"]
    assert block["type"] == "WarmupDecayLR"
    groups = param_groups(model.named_parameters(), learning_rate=LR, weight_decay=WD, layer_decay=decay,
                          num_layers=LAYERS)
    peaks = [g["lr"] for g in groups]

    flat = WarmupDecayLR(torch.optim.AdamW(copy.deepcopy(groups), lr=LR), **block["params"])
    flat.step()
    assert len({g["lr"] for g in flat.optimizer.param_groups}) == 1  # the layer decay is gone

    rewritten = scheduler_with_group_lrs(block, groups, LR)
    assert block["params"]["warmup_max_lr"] == LR  # the input block is not modified
    opt = torch.optim.AdamW(groups, lr=LR)
    scheduler = WarmupDecayLR(opt, **rewritten["params"])
    for steps in range(total + 2):  # after `steps` calls of step(), last_batch_iteration = steps - 1
        if steps:
            scheduler.step()
        assert scheduler.last_batch_iteration == steps - 1
        for g, peak in zip(opt.param_groups, peaks):
            assert g["lr"] == pytest.approx(hand_warmup_decay(steps - 1, peak, warmup, total), rel=16 * EPS,
                                            abs=1e-18), steps
    # at total_num_steps gamma is 0: each group ends at its own warmup_min_lr (DeepSpeed decays to the minimum, not 0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([p / (warmup + 1) for p in peaks], rel=16 * EPS)
    # a resumed scheduler (DeepSpeed saves only last_batch_iteration) lands on the same per-group rates
    again = WarmupDecayLR(torch.optim.AdamW(copy.deepcopy(groups), lr=LR), **rewritten["params"])
    again.load_state_dict({"last_batch_iteration": 4})
    again.step(5)
    assert [g["lr"] for g in again.optimizer.param_groups] == pytest.approx(
        [hand_warmup_decay(5, p, warmup, total) for p in peaks], rel=16 * EPS)


def test_scheduler_block_is_unchanged_without_decay_and_for_cosine(model):
    block = deepspeed_config(EngineConfig(), world_size=1, total_steps=10)["scheduler"]
    plain = param_groups(model.named_parameters(), learning_rate=5e-4, weight_decay=WD, num_layers=LAYERS)
    assert scheduler_with_group_lrs(block, plain, 5e-4) == block
    decayed = param_groups(model.named_parameters(), learning_rate=5e-4, weight_decay=WD, layer_decay=0.7,
                           num_layers=LAYERS)
    cosine = {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}}
    assert scheduler_with_group_lrs(cosine, decayed, 5e-4) == cosine
    opt = torch.optim.AdamW(decayed, lr=5e-4)
    cos = WarmupCosineLR(opt, **cosine["params"])
    cos.step(5)  # one ratio for all groups, times each group's own peak
    ratio = cos.get_lr_ratio()
    assert 0 < ratio < 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4 * 0.7 ** (4 - d) * ratio for d in range(5)
                                                                for _ in (0, 1)], rel=16 * EPS)
    with pytest.raises(ValueError, match=r"^scheduler.type: per-group learning rates"):
        scheduler_with_group_lrs({"type": "OneCycle", "params": {}}, decayed, 5e-4)
    with pytest.raises(ValueError, match=r"^scheduler.params.warmup_max_lr: expected one number"):
        scheduler_with_group_lrs({"type": "WarmupLR", "params": {"warmup_max_lr": [1e-3]}}, decayed, 5e-4)
