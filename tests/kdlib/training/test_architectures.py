"""The per-architecture attention table: Q/K/V captured from each listed model type equal a hand recomputation
from the block's input, a user-registered naming works, a row given in a stage's config works (and leaves the
hashes of configs without rows as they were), and an unknown architecture fails in one line."""

from pathlib import Path

import pytest
import torch
import transformers as T
from torch import nn
from torch.nn import functional as F

from kdlib.training.architectures import ARCHITECTURES, Architecture, architecture_of, register_architecture
from kdlib.training.internals import AttentionViews, attention_blocks, capture_qkv

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 32, 4, 2, 2, 99


def _config(model_type: str):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "distilbert":
        return T.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64, **common)
    if model_type == "gpt2":
        return T.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, **common)
    if model_type == "mobilebert":
        return T.MobileBertConfig(hidden_size=HIDDEN, embedding_size=16, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=64, intra_bottleneck_size=16,
                                  true_hidden_size=16, **common)
    if model_type in ("llama", "qwen2"):
        cls = T.LlamaConfig if model_type == "llama" else T.Qwen2Config
        return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, intermediate_size=64, **common)
    cls = T.BertConfig if model_type == "bert" else T.RobertaConfig
    return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64, **common)


def _model(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    model = T.AutoModel.from_config(_config(model_type), attn_implementation="eager").eval()
    for p in model.parameters():  # random biases too (several initialise them to zero)
        nn.init.normal_(p, std=0.2)
    return model


def _block_inputs(blocks):
    """Each block's input per part {"query","key","value"}, by a pre-hook of our own: one hidden-state tensor
    (positional or keyword), or three (MobileBERT feeds its bottlenecked input to Q/K, the layer input to V)."""
    seen, handles = {}, []
    for i, block in enumerate(blocks, start=1):
        def hook(_m, args, kwargs, i=i):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) >= 3:
                seen[i] = dict(zip(("query", "key", "value"), tensors))
            else:
                x = tensors[0] if tensors else next(kwargs[k] for k in ("hidden_states", "query") if k in kwargs)
                seen[i] = dict.fromkeys(("query", "key", "value"), x)
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _by_hand(block, entry: Architecture, x: dict):
    if entry.fused:
        proj = block.get_submodule(entry.fused)  # Conv1D: weight (in, out)
        return dict(zip(("query", "key", "value"), (x["query"] @ proj.weight + proj.bias).chunk(3, dim=-1)))
    return {part: F.linear(x[part], block.get_submodule(path).weight, block.get_submodule(path).bias)
            for part, path in entry.parts.items()}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "mobilebert", "gpt2", "llama", "qwen2"])
def test_captured_qkv_equal_the_projections_of_each_blocks_input(model_type):
    model = _model(model_type)
    entry, blocks = architecture_of(model)
    assert entry is ARCHITECTURES[model_type] and len(blocks) == LAYERS
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    seen, handles = _block_inputs(blocks)
    try:
        with torch.no_grad(), capture_qkv(model) as store:
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    assert sorted(store) == list(range(1, LAYERS + 1)) and store.architecture is entry
    kv_width = HIDDEN // HEADS * KV_HEADS if model_type in ("llama", "qwen2") else None
    for layer, block in enumerate(blocks, start=1):
        expected = _by_hand(block, entry, seen[layer])
        for part in ("query", "key", "value"):
            got = store[layer][part]
            width = HIDDEN if part == "query" or kv_width is None else kv_width
            if model_type == "mobilebert":  # Q/K/V are the true (bottleneck) hidden size
                width = 16
            assert got.shape == (2, 7, width), (part, got.shape)
            torch.testing.assert_close(got, expected[part], rtol=1e-5, atol=1e-5)


def test_gqa_values_repeat_each_kv_head_over_its_query_heads_and_rope_maps_are_refused():
    model = _model("llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad(), capture_qkv(model) as store:
        model(input_ids=ids, attention_mask=mask)
    views = AttentionViews(store, HEADS, mask)
    assert views.kv_heads(1) == KV_HEADS
    d = HIDDEN // HEADS
    v = store[1]["value"].view(2, 5, KV_HEADS, d).transpose(1, 2)
    assert torch.equal(views.values(1), v[:, [0, 0, 1, 1]])  # head h reads kv head h // (HEADS / KV_HEADS)
    with pytest.raises(ValueError, match="RoPE"):
        views.probs(1)


def test_gpt2_probabilities_recomputed_from_the_fused_projection_match_the_models_causal_attention():
    model = _model("gpt2")
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad(), capture_qkv(model) as store:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    views = AttentionViews(store, HEADS, mask)
    for layer in range(1, LAYERS + 1):
        torch.testing.assert_close(views.probs(layer), out.attentions[layer - 1], rtol=1e-5, atol=1e-6)


class _Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return x + self.wq(x) + torch.cat([self.wk(x), self.wv(x)], -1)


class _Toy(nn.Module):
    def __init__(self, model_type: str):
        super().__init__()
        self.config = T.PretrainedConfig()
        self.config.model_type = model_type
        self.blocks = nn.ModuleList([nn.ModuleDict({"mixer": _Mixer()}) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = b["mixer"](x)
        return x


def test_a_registered_entry_finds_a_made_up_naming():
    try:
        register_architecture("toy-mixer", block="mixer", query="wq", key="wk", value="wv")
        model = _Toy("toy-mixer")
        assert len(attention_blocks(model)) == 3
        x = torch.randn(2, 5, 8)
        inputs, handles = _block_inputs(attention_blocks(model))
        with torch.no_grad(), capture_qkv(model) as store:
            model(x)
        for h in handles:
            h.remove()
        for layer, block in enumerate(attention_blocks(model), start=1):
            torch.testing.assert_close(store[layer]["key"], block.wk(inputs[layer]["key"]))
            assert store[layer]["query"].shape == (2, 5, 8) and store[layer]["value"].shape == (2, 5, 4)
    finally:
        ARCHITECTURES.pop("toy-mixer", None)


def test_an_unknown_architecture_fails_in_one_line_saying_how_to_add_it():
    with pytest.raises(ValueError) as err:
        attention_blocks(_Toy("mystery"))
    message = str(err.value)
    assert "\n" not in message and "model_type='mystery'" in message and "register_architecture('mystery'" in message
    with pytest.raises(ValueError):
        Architecture("attn", query="q", fused="qkv")  # both forms at once
    with pytest.raises(ValueError):
        Architecture("attn", query="q")  # neither complete


# ---------------------------------------------------------------- rows added in a stage's config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
MPNET_ROW = "architectures:\n  mpnet: {block: attention.attn, query: q, key: k, value: v}\n"


def test_a_config_row_makes_a_family_the_table_lacks_capturable(tmp_path):
    """MPNet keeps Q/K/V as attention.attn.{q,k,v}: no row and no BERT-style block, so capture fails; the row read
    from a pretrain config's `architectures` (as loop.run applies it) makes the captured Q/K/V equal the
    projections of each block's input."""
    from kdlib.config import load_config
    from kdlib.training.architectures import use_architectures
    from pretrain.config import PretrainConfig

    torch.manual_seed(0)
    model = T.AutoModel.from_config(T.MPNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                  num_attention_heads=HEADS, intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="model_type='mpnet'.*architectures: \\{mpnet: "):
        attention_blocks(model)
    path = tmp_path / "p.yaml"
    path.write_text((CONFIGS / "pretrain_demo.yaml").read_text() + MPNET_ROW)
    cfg = load_config(str(path), PretrainConfig)
    assert cfg.architectures == {"mpnet": Architecture("attention.attn", "q", "k", "v")}
    try:
        use_architectures(cfg.architectures)
        entry, blocks = architecture_of(model)
        assert entry == cfg.architectures["mpnet"] and len(blocks) == LAYERS
        ids = torch.randint(3, VOCAB, (2, 7))
        seen, handles = _block_inputs(blocks)
        try:
            with torch.no_grad(), capture_qkv(model) as store:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            for h in handles:
                h.remove()
        for layer, block in enumerate(blocks, start=1):
            want = _by_hand(block, entry, seen[layer])
            for part in ("query", "key", "value"):
                torch.testing.assert_close(store[layer][part], want[part], rtol=0, atol=1e-6)
    finally:
        ARCHITECTURES.pop("mpnet", None)


def test_config_rows_change_the_hash_only_when_given_and_a_bad_row_names_its_field(tmp_path):
    """No rows hash as before the field existed (values pinned from the commit before it), so older runs and sets
    stay resumable and found; a row with no projections is a ConfigError naming architectures.<type>.<field>."""
    from data_pipeline.config import PipelineConfig
    from data_pipeline.pipeline import content_hash
    from kdlib.config import load_config
    from kdlib.errors import ConfigError
    from pretrain.config import PretrainConfig

    pretrain = load_config(str(CONFIGS / "pretrain_demo.yaml"), PretrainConfig)
    pipeline = load_config(str(CONFIGS / "demo_pipeline.yaml"), PipelineConfig)
    assert pretrain.math_hash() == "040e53c4e498a8e72da855e7eabb0f8940cbaf65a561bd749da89a66531bc285"
    assert content_hash(pipeline) == "499e052c594289b79c659edd9048a4fd0c252e0bc6289fe27a4ac0d58bc7c072"
    path = tmp_path / "p.yaml"
    path.write_text((CONFIGS / "pretrain_demo.yaml").read_text() + MPNET_ROW)
    assert load_config(str(path), PretrainConfig).math_hash() != pretrain.math_hash()
    path.write_text((CONFIGS / "pretrain_demo.yaml").read_text() + "architectures:\n  mpnet: {block: attention.attn, query: q}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: field 'architectures.mpnet.key': expected the projection's attribute path"):
        load_config(str(path), PretrainConfig)
