"""Every shipped general-distillation recipe (configs/recipes/*.yaml) trains from the cache alone.

Each recipe's objectives, layer map and initialisation run unchanged on a tiny teacher (4 layers,
width 32) and a transfer set caching what all of them read (hidden states 0-4, int8 Q/K/V of the
mapped layers, the pooled embedding), with no online teacher; only the depth is scaled (3 -> 2
student layers, teacher layer 6 -> 4) and the student starts from random weights. Over a few steps
on the same rows every objective falls.
"""

from __future__ import annotations


import pytest
import yaml

from kdlib.config import from_dict
from kdlib.runtime.metrics import read_metrics
from pretrain.config import PretrainConfig
from pretrain.train import train
from pretrain.validate import validate
from tests.transfer_fixture import base_config, build_transfer_set, free_port
from tests.paths import REPO_ROOT

REPO = REPO_ROOT
RECIPES = sorted(p for p in (REPO / "configs" / "recipes").glob("*.yaml") if p.stem != "transfer_set"
                 and not p.stem.startswith("shape_"))
STEPS = 8


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("recipes_fixture"), rows=48, teacher_steps=20,
                              hidden_layers=(0, 1, 2, 3, 4), qkv_layers=(2, 4), vector_encoding="int8", pooled="mean",
                              dropout=0.0)


def scaled(recipe: dict) -> dict:
    """The recipe's training choices for a 4-layer teacher and a 2-layer student (6 -> 4, 3 -> 2)."""
    layer_map = recipe.get("layer_map")
    if layer_map and layer_map.get("name") == "explicit":
        layer_map = dict(layer_map, pairs=[[4 if t == 6 else t, 2 if s == 3 else s] for t, s in layer_map["pairs"]])
    for objective in recipe["objectives"]:
        if objective["name"] == "minilmv2_relations":
            objective["params"] = {"relation_heads": 4}  # divides the tiny width 32
    return {"objectives": recipe["objectives"], "layer_map": layer_map,
            # random init: from every-other teacher layers a tiny student starts at the minimum of some terms
            # (its embeddings are the teacher's), and the test is whether each objective can be minimised
            "student": dict(recipe["student"], num_layers=2, init="random")}


def test_there_is_a_recipe_for_every_method_of_the_comparison():
    assert {p.stem for p in RECIPES} == {"distilbert", "tinybert", "minilm", "minilmv2", "bert_emd", "pooled",
                                          "sentence"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_from_the_cache_and_its_losses_fall(paths, tmp_path, monkeypatch, recipe_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe.get("online_teacher", False) is False  # the point: the cache alone serves every recipe
    settings = {**scaled(recipe), "steps": STEPS, "eval_rows": 8, "engine.zero_stage": 0, "engine.grad_accum": 1,
                "engine.micro_batch": 8, "engine.optim": {"learning_rate": 3e-3, "warmup_steps": 1, "decay_steps": 1000}}
    cfg = from_dict(PretrainConfig, base_config(paths, tmp_path / recipe_path.stem, **settings))
    # the same 8 rows every step (an epoch of one micro-batch), so the fall is the model's, not the data's
    cfg.eval_rows = len(validate(cfg, "test").transfer_set) - 8
    setup = validate(cfg, str(recipe_path))
    assert train(cfg, setup) == 0
    steps = [r for r in read_metrics(tmp_path / recipe_path.stem / "metrics.jsonl") if "loss" in r]
    assert len(steps) == STEPS
    for objective in recipe["objectives"]:
        name = objective["name"]
        first, last = steps[0][name], steps[-1][name]
        assert last < first, (recipe_path.stem, name, [r[name] for r in steps])
