"""BERT-of-Theseus (kdlib.students.theseus): replacement semantics, what trains, curriculum, draws, export.

Equalities between the Theseus model and the exported successor are checked bit-exact
(torch.equal): at p = 1 both run the very same modules with the same weights, in the same order,
on the same inputs, on CPU, so every floating-point operation is identical; any tolerance would
only hide a difference in what runs (a wrong layer, mask or frozen part).
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import BertForSequenceClassification

from kdlib.students.theseus import TheseusConfig, TheseusModel, replacement_probability_at, successor_state_dict
from tests.tiny_models import make_tiny_bert

N_LAYERS = 6
SUCCESSOR = 3  # k = 2 predecessor layers per successor module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("theseus_teacher"), task="sequence_classification",
                          layers=N_LAYERS, num_labels=3, seed=7)


def load_predecessor(folder) -> BertForSequenceClassification:
    """Dropout off so that training and eval forwards are deterministic functions of the weights."""
    return BertForSequenceClassification.from_pretrained(folder, hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0)


def batch():
    """A fixed batch with padding in one row, so the attention mask is not all ones."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = torch.tensor([0, 2, 1, 2])
    return ids, mask, labels


def theseus(folder, p: float, **extra) -> TheseusModel:
    cfg = TheseusConfig(successor_layers=SUCCESSOR, replacement_start=p, replacement_end=p, **extra)
    return TheseusModel(load_predecessor(folder), cfg)


def train(model, params, steps: int = 3):
    ids, mask, labels = batch()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_successor_starts_as_copies_of_first_layers_and_predecessor_is_frozen(folder):
    model = theseus(folder, 0.3)
    assert model.ratio == 2
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (3, 32, 4)
    assert model.predecessor_config.num_hidden_layers == N_LAYERS
    for i in range(SUCCESSOR):
        mine, theirs = model.successor_layers[i].state_dict(), model.predecessor_layers[i].state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key])
            assert mine[key].data_ptr() != theirs[key].data_ptr()  # a copy, not shared storage
    assert not any(p.requires_grad for p in model.predecessor_layers.parameters())
    assert all(p.requires_grad for p in model.successor_layers.parameters())
    for part in (model.embeddings, model.pooler, model.classifier):  # frozen as in the official code
        assert not any(p.requires_grad for p in part.parameters())
    opened = theseus(folder, 0.3, train_embeddings=True, train_head=True)
    for part in (opened.embeddings, opened.pooler, opened.classifier):
        assert all(p.requires_grad for p in part.parameters())


@pytest.mark.parametrize("open_parts", [False, True])
def test_training_at_p1_equals_training_the_successor_alone(folder, open_parts):
    model = theseus(folder, 1.0, train_embeddings=open_parts, train_head=open_parts)
    alone = model.successor_model()  # built before training: same initial weights, independent tensors
    initial = snapshot(alone)
    for name, p in alone.named_parameters():  # freeze in the plain model exactly what Theseus freezes
        p.requires_grad_(open_parts or name.startswith("bert.encoder."))
    train(model, [p for p in model.parameters() if p.requires_grad])
    train(alone, [p for p in alone.parameters() if p.requires_grad])
    got, want = successor_state_dict(model), alone.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    moved = {k for k in want if not torch.equal(want[k], initial[k])}
    layer_keys = {k for k in want if k.startswith("bert.encoder.")}
    assert layer_keys <= moved  # training did something, so the equality above is not vacuous
    if open_parts:
        assert "classifier.weight" in moved and "bert.embeddings.word_embeddings.weight" in moved
    else:
        assert moved == layer_keys


def test_p0_leaves_successor_untouched(folder):
    for open_parts in (False, True):
        model = theseus(folder, 0.0, train_embeddings=open_parts, train_head=open_parts)
        before = snapshot(model)
        train(model, [p for p in model.parameters() if p.requires_grad])
        after = model.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        # never in the graph: grad None (not zeros), so AdamW's moments and weight decay skip them too;
        # with nothing trainable in the graph (the paper's freezing) backward still runs and does nothing
        assert all(p.grad is None for p in model.successor_layers.parameters())
        assert not any(k.startswith("successor_layers.") for k in moved)
        assert not any(k.startswith("predecessor_layers.") for k in moved)
        if open_parts:  # the parts the user opened are trained through the predecessor path
            assert {"embeddings.word_embeddings.weight", "pooler.dense.weight", "classifier.weight"} <= moved
        else:  # the paper trains only the successor, which never ran
            assert moved == set()


def test_forward_at_p1_and_in_eval_is_the_successor(folder):
    ids, mask, _ = batch()
    model = theseus(folder, 1.0)
    alone = model.successor_model()
    with torch.no_grad():
        want = alone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for training in (True, False):
            model.train(training)
            got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            assert got.logits.shape == (4, 3)
            assert torch.equal(got.logits, want.logits)
            assert len(got.hidden_states) == len(want.hidden_states) == SUCCESSOR + 1
            for a, b in zip(got.hidden_states, want.hidden_states):
                assert torch.equal(a, b)
        assert model(input_ids=ids, attention_mask=mask).hidden_states is None
        # eval ignores p: a p = 0 model evaluates as its successor too
        zero = theseus(folder, 0.0).eval()
        assert torch.equal(zero(input_ids=ids, attention_mask=mask).logits, want.logits)


def test_training_forward_at_p0_is_the_predecessor(folder):
    ids, mask, _ = batch()
    model = theseus(folder, 0.0).train()
    teacher = load_predecessor(folder).eval()  # dropout is 0, so train/eval modes compute the same
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        want = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert model.last_choices == (False,) * SUCCESSOR
    assert torch.equal(got.logits, want.logits)
    assert len(got.hidden_states) == SUCCESSOR + 1
    for i in range(SUCCESSOR + 1):  # position i ends after predecessor layer 2i
        assert torch.equal(got.hidden_states[i], want.hidden_states[2 * i])


def test_curriculum_values():
    cfg = TheseusConfig(successor_layers=3, replacement_start=0.3, replacement_end=1.0, replacement_steps=10)
    # hand computed: 0.3 + 0.7 * step / 10 below step 10, then 1
    for step, want in [(0, 0.3), (1, 0.37), (5, 0.65), (9, 0.93), (10, 1.0), (11, 1.0), (500, 1.0)]:
        assert replacement_probability_at(cfg, step, 20) == pytest.approx(want, abs=1e-12)
    model_cfg = TheseusConfig(successor_layers=3, replacement_start=0.2, replacement_end=0.6)  # phase = whole run
    for step, want in [(0, 0.2), (10, 0.4), (15, 0.5), (19, 0.58), (20, 1.0), (25, 1.0)]:
        assert replacement_probability_at(model_cfg, step, 20) == pytest.approx(want, abs=1e-12)
    const = TheseusConfig(successor_layers=3, replacement_start=0.5, replacement_end=0.5, replacement_steps=4)
    assert [replacement_probability_at(const, s, 100) for s in range(6)] == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]


def test_set_step_drives_the_model(folder):
    cfg = TheseusConfig(successor_layers=SUCCESSOR, replacement_start=0.3, replacement_end=1.0)
    model = TheseusModel(load_predecessor(folder), cfg)
    assert model.replacement_probability() == pytest.approx(0.3, abs=1e-12)
    model.set_step(25, 100)
    assert model.replacement_probability() == pytest.approx(0.475, abs=1e-12)  # 0.3 + 0.7 * 0.25
    model.set_step(150, 100)
    assert model.replacement_probability() == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        model.set_step(1, 0)
    with pytest.raises(ValueError, match="step: expected"):
        model.set_step(-1, 10)


@pytest.mark.parametrize("kwargs, field", [
    ({"successor_layers": 0}, "successor_layers"),
    ({"replacement_start": 1.5}, "replacement_start"),
    ({"replacement_end": -0.1, "replacement_start": 0.0}, "replacement_end"),
    ({"replacement_start": 0.8, "replacement_end": 0.5}, "replacement_end"),
    ({"replacement_steps": -1}, "replacement_steps"),
    ({"train_head": 1}, "train_head"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        TheseusConfig(**kwargs)


def test_non_divisible_layer_count_is_rejected(folder):
    predecessor = load_predecessor(folder)
    for bad in (4, 5, 7):
        with pytest.raises(ValueError, match=rf"successor_layers: expected a divisor of the predecessor's "
                                             rf"{N_LAYERS} layers, got {bad}"):
            TheseusModel(predecessor, TheseusConfig(successor_layers=bad))


@pytest.mark.slow
def test_draws_are_reproducible_and_binomial(folder):
    ids, mask, _ = batch()
    model = theseus(folder, 0.5).train()

    def run(n):
        out = []
        with torch.no_grad():
            for _ in range(n):
                model(input_ids=ids[:1], attention_mask=mask[:1])
                out.append(model.last_choices)
        return out

    torch.manual_seed(11)
    first = run(400)
    torch.manual_seed(11)
    head = run(150)
    state = torch.get_rng_state()  # resume mid-run from the saved RNG state
    run(5)
    torch.set_rng_state(state)
    assert head + run(250) == first
    torch.manual_seed(12)
    assert run(400) != first  # another seed gives another sequence (equal with probability 2**-1200)
    n = 400 * SUCCESSOR
    used = sum(sum(c) for c in first)
    sd = math.sqrt(n * 0.5 * 0.5)  # binomial(n, 0.5): sd = 17.3 draws; 5 sd leaves a 6e-7 chance of a false alarm
    assert abs(used - n * 0.5) <= 5 * sd
    assert len({c for c in first}) == 2 ** SUCCESSOR  # all 8 module combinations occur


@pytest.mark.slow
def test_mixed_choice_runs_the_chosen_modules(folder):
    ids, mask, _ = batch()
    model = theseus(folder, 0.5).train()
    seen = set()
    with torch.no_grad():
        for seed in range(40):
            torch.manual_seed(seed)
            got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            choices = model.last_choices
            seen.add(choices)
            torch.manual_seed(seed)
            assert model.draw_choices() == choices  # the choice is the first use of the RNG in a forward
            # rebuild by hand: embeddings, then per position the successor layer or predecessor layers 2i, 2i+1
            hidden = model.embeddings(input_ids=ids)
            ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            want = [hidden]
            for i, use in enumerate(choices):
                for layer in ([model.successor_layers[i]] if use else model.predecessor_layers[2 * i:2 * i + 2]):
                    hidden = layer(hidden, ext)
                want.append(hidden)
            assert len(got.hidden_states) == SUCCESSOR + 1
            for a, b in zip(got.hidden_states, want):
                # the hand-built mask is additive float, the model's may be bool (sdpa): softmax inputs can
                # differ by rounding only; ~8 fp32 ulps (eps 1.2e-7) of the largest |value| (LayerNorm outputs, ~3)
                tol = 1e-6 * max(1.0, float(b.abs().max()))
                assert float((a - b).abs().max()) <= tol
    assert len(seen) >= 4  # the check above covered genuinely mixed compositions


def test_successor_model_round_trips_through_safetensors(folder, tmp_path):
    ids, mask, _ = batch()
    model = theseus(folder, 0.5)
    with torch.no_grad():  # make the successor differ from the predecessor's first layers
        for p in model.successor_layers.parameters():
            p.add_(0.01)
    alone = model.successor_model()
    assert isinstance(alone, BertForSequenceClassification) and not alone.training
    assert alone.config.num_hidden_layers == SUCCESSOR and len(alone.bert.encoder.layer) == SUCCESSOR
    alone.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = alone(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)
        assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask).logits, want)
        teacher = load_predecessor(folder).eval()
        assert not torch.equal(teacher(input_ids=ids, attention_mask=mask).logits, want)
